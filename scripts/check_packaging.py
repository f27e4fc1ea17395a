#!/usr/bin/env python3
"""Packaging checks (run by scripts/check-packaging, itself run by scripts/test).

Helm chart: lint --strict and render for every variant in charts/shop/ci, for Kubernetes
1.29 and the newest version kubernetes-validate bundles; every rendered manifest and both
kustomize overlays validated strictly; values.schema.json must reject wrong types and
unknown keys; k8s/base must equal a fresh render; checkov and hadolint with zero failures
(exceptions live in .checkov.yaml with reasons); skaffold.yaml and docker-compose.yml
against their vendored JSON schemas. Then the contract between packaging and binaries:
ports, probe paths, environment variable names and grace periods in the chart, kustomize
and compose are compared with what each binary says about itself (`<binary> describe`),
and the binaries are started with the rendered environment and probed on the rendered
paths, including the helm test's own `smoke` run through the gateway.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SHOP_CI_CACHE", Path.home() / ".cache" / "shop-ci"))
HELM = os.environ.get("HELM", str(CACHE / "bin" / "helm"))
KUSTOMIZE = os.environ.get("KUSTOMIZE", str(CACHE / "bin" / "kustomize"))
SKAFFOLD = os.environ.get("SKAFFOLD", str(CACHE / "bin" / "skaffold"))
VENV_BIN = Path(sys.executable).parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
BIN = TARGET / "debug"
CHART = ROOT / "charts" / "shop"
COMPONENTS = ["gateway", "product", "order", "user"]
DB_SERVICES = ["product", "order", "user"]
KUBE_VERSIONS = ["1.29.0", "1.37.0"]  # the oldest supported, and the newest bundled
VARIANTS = {"default": None} | {
    p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))
}

failures: list[str] = []
counts = {"checks": 0}


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def check(ok: bool, what: str) -> bool:
    counts["checks"] += 1
    if not ok:
        failures.append(what)
        print(f"  FAIL {what}", flush=True)
    return ok


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kw)


def tool(name: str) -> str:
    return str(VENV_BIN / name)


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def helm_template(variant: str, kube: str, *extra: str) -> subprocess.CompletedProcess:
    values = VARIANTS.get(variant)
    args = [HELM, "template", "shop", str(CHART), "--namespace", "shop", "--kube-version", kube]
    if values:
        args += ["-f", str(values)]
    return run(args + list(extra))


def seconds(duration: str) -> float:
    """The binaries' duration syntax: 250ms, 5s, 2m, 1h, or bare seconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|h)?\s*", duration)
    if not m:
        raise ValueError(f"not a duration: {duration!r}")
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return float(m.group(1)) * factor


# ---------------------------------------------------------------------------------------
# Chart, manifests, linters


def lint_and_render(outdir: Path) -> dict[tuple[str, str], list[dict]]:
    step(f"helm lint --strict and render: variants {', '.join(VARIANTS)} x Kubernetes {', '.join(KUBE_VERSIONS)}")
    rendered = {}
    for variant, values in VARIANTS.items():
        for kube in KUBE_VERSIONS:
            args = [HELM, "lint", "--strict", str(CHART), "--kube-version", kube]
            if values:
                args += ["-f", str(values)]
            lint = run(args)
            check(lint.returncode == 0 and "0 chart(s) failed" in lint.stdout,
                  f"helm lint --strict {variant} (k8s {kube}): {lint.stdout[-400:]}{lint.stderr[-400:]}")
            out = helm_template(variant, kube)
            if not check(out.returncode == 0, f"helm template {variant} (k8s {kube}): {out.stderr[-600:]}"):
                continue
            path = outdir / f"{variant}-{kube}.yaml"
            path.write_text(out.stdout)
            rendered[(variant, kube)] = docs_of(out.stdout)
        print(f"  ok   {variant}: {len(rendered.get((variant, KUBE_VERSIONS[0]), []))} objects")
    return rendered


def schema_rejects_bad_values() -> None:
    step("values.schema.json: accepts valid overrides, rejects wrong types and unknown keys")
    good = helm_template("default", KUBE_VERSIONS[0], "--set", "components.gateway.replicas=3",
                         "--set", "components.user.env.RUST_LOG=debug")
    check(good.returncode == 0, f"a valid override was refused: {good.stderr[-400:]}")
    bad = {
        "wrong type (replicas: string)": (["--set-string", "components.gateway.replicas=two"], "replicas"),
        "unknown top-level key": (["--set", "replicaCount=2"], "replicaCount"),
        "unknown nested key (typo)": (["--set", "components.order.imag.tag=x"], "imag"),
        "unknown component": (["--set", "components.cart.port=8084"], "cart"),
        "out of range (negative delay)": (["--set", "shutdown.delaySeconds=-1"], "delaySeconds"),
        "enum (log format)": (["--set", "logging.format=xml"], "format"),
        "bad env name": (["--set", "components.user.env.lower-case=1"], "lower-case"),
        "SLO threshold not a bucket": (["--set-string", "monitoring.prometheusRule.slos.order.latency.thresholdSeconds=0.3"],
                                       "thresholdSeconds"),
        "SLO target of 100%": (["--set", "monitoring.prometheusRule.slos.user.availability=100"], "availability"),
        "broker URL over TLS (not supported)": (["--set", "rabbitmq.enabled=false", "--set", "externalBroker.url=amqps://u:p@mq:5671"],
                                                "url"),
        "broker memory watermark not an amount": (["--set", "rabbitmq.memoryHighWatermark=lots"], "memoryHighWatermark"),
    }
    for what, (args, needle) in bad.items():
        out = helm_template("default", KUBE_VERSIONS[0], *args)
        check(out.returncode != 0 and "schema" in out.stderr and needle in out.stderr,
              f"schema did not reject {what}: rc={out.returncode} {out.stderr[-300:]}")
        lint = run([HELM, "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSIONS[0], *args])
        check(lint.returncode != 0, f"helm lint accepted {what}")
    # No bundled broker and none named: the services could not hear each other's events.
    out = helm_template("default", KUBE_VERSIONS[0], "--set", "rabbitmq.enabled=false")
    check(out.returncode != 0 and "externalBroker.url (or .existingSecret) is required" in out.stderr,
          f"rabbitmq.enabled=false without an external broker was not refused: rc={out.returncode} {out.stderr[-300:]}")
    print(f"  ok   1 valid override accepted, {len(bad)} invalid ones rejected by template and lint; no broker at all refused")


def chart_rules(rendered: dict[tuple[str, str], list[dict]]) -> None:
    step("chart rules: selectors, pod security, probes, grace periods, per-variant objects")
    for (variant, kube), docs in rendered.items():
        where = f"{variant} (k8s {kube})"
        for doc in docs:
            name = f"{doc['kind']}/{doc['metadata']['name']}"
            for key, selector in selectors(doc.get("spec", {})):
                check("helm.sh/chart" not in json.dumps(selector), f"{where} {name}: helm.sh/chart in a {key}")
            check(doc["metadata"].get("namespace") == "shop", f"{where} {name}: namespace not set")
            pod = pod_spec(doc)
            if pod is None:
                continue
            sc = pod.get("securityContext", {})
            check(sc.get("runAsNonRoot") is True and sc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
                  f"{where} {name}: pod securityContext not restricted")
            # Only the gateway calls the API server, and only when it watches EndpointSlices
            # (then a Role allows exactly that).
            watches = name == "Deployment/shop-gateway" and any(
                d["kind"] == "RoleBinding" and d["metadata"]["name"] == "shop-gateway" for d in docs)
            check(pod.get("automountServiceAccountToken") is watches,
                  f"{where} {name}: token {'not ' if watches else ''}mounted")
            for c in pod["containers"]:
                csc = c.get("securityContext", {})
                check(csc.get("readOnlyRootFilesystem") is True and csc.get("allowPrivilegeEscalation") is False
                      and csc.get("capabilities", {}).get("drop") == ["ALL"] and csc.get("runAsNonRoot") is True,
                      f"{where} {name}/{c['name']}: container securityContext not restricted")
                check("limits" in c.get("resources", {}) and "requests" in c.get("resources", {}),
                      f"{where} {name}/{c['name']}: resources missing")
            if doc["kind"] == "Deployment":
                c = pod["containers"][0]
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    check(probe in c, f"{where} {name}: no {probe}")
                pre = c.get("lifecycle", {}).get("preStop")
                if kube >= "1.30" and pre:
                    check("sleep" in pre, f"{where} {name}: preStop should use the native sleep action")
                elif pre:
                    check(pre.get("exec", {}).get("command", [None])[1:2] == ["sleep"],
                          f"{where} {name}: preStop should run the binary's sleep before 1.30")
                annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
                check("checksum/config" in annotations, f"{where} {name}: no config checksum annotation")
        kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
        has = lambda kind: any(k == kind for k, _ in kinds)  # noqa: E731
        if variant == "production":
            check(sum(k == "HorizontalPodAutoscaler" for k, _ in kinds) == 4, f"{where}: expected 4 HPAs")
            check(all("replicas" not in d["spec"] for d in docs if d["kind"] == "Deployment"),
                  f"{where}: Deployments with an HPA must leave replicas to it")
            check(has("Ingress") and has("HTTPRoute"), f"{where}: Ingress and HTTPRoute expected")
            check(all("@sha256:" in c["image"] for d in docs if (p := pod_spec(d)) for c in p["containers"]),
                  f"{where}: every image should be pinned by digest")
        if variant == "external-db":
            check(not has("StatefulSet"), f"{where}: no bundled database or broker expected")
            amqp = {d["metadata"]["name"]: [e["valueFrom"]["secretKeyRef"] for e in d["spec"]["template"]["spec"]["containers"][0].get("env", [])
                                            if e["name"] == "AMQP_URL"]
                    for d in docs if d["kind"] == "Deployment"}
            want = {"name": "events-broker", "key": "url"}
            check(amqp == {"shop-gateway": [], "shop-product": [want], "shop-order": [want], "shop-user": [want]},
                  f"{where}: AMQP_URL secret references wrong: {amqp}")
            egress = [r for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "shop-order"
                      for r in d["spec"]["egress"] if {"port": 5672, "protocol": "TCP"} in r.get("ports", [])]
            check(len(egress) == 1 and egress[0].get("to") == [{"ipBlock": {"cidr": "10.30.0.0/16"}}],
                  f"{where}: order's egress to the external broker wrong: {egress}")
            refs = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
                    for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] != "shop-gateway"}
            check(refs.get("shop-order") == {"name": "orders-db", "key": "url"}
                  and refs.get("shop-user") == {"name": "users-db", "key": "DATABASE_URL"}
                  and refs.get("shop-product") == {"name": "shop-product-database", "key": "database-url"},
                  f"{where}: DATABASE_URL secret references wrong: {refs}")
        if variant == "minimal":
            check(not has("NetworkPolicy") and not has("PodDisruptionBudget") and not has("Pod"),
                  f"{where}: minimal should have no policies, budgets or test pod")
        if variant == "ingress":
            ing = [d for d in docs if d["kind"] == "Ingress"]
            check(len(ing) == 1 and ing[0]["spec"].get("ingressClassName") == "traefik",
                  f"{where}: one Ingress with the configured class expected")
        if variant == "monitoring":
            monitoring_objects(docs, where)
        else:
            check(not any(has(k) for k in ("ServiceMonitor", "PodMonitor", "PrometheusRule")),
                  f"{where}: Prometheus Operator objects are opt-in")
        for d in docs:
            if d["kind"] == "Deployment":
                ann = d["spec"]["template"]["metadata"].get("annotations", {})
                port = str(d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"])
                check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == port
                      and ann.get("prometheus.io/path") == "/metrics",
                      f"{where} {d['metadata']['name']}: prometheus.io annotations missing or wrong: {ann}")
        if variant == "default":
            check(not has("Ingress") and not has("HTTPRoute") and not has("HorizontalPodAutoscaler"),
                  f"{where}: ingress, route and HPAs are opt-in")
            check(sum(k == "StatefulSet" for k, _ in kinds) == 4 and sum(k == "Secret" for k, _ in kinds) == 5,
                  f"{where}: one PostgreSQL StatefulSet and Secret per service, RabbitMQ's, and the token key Secret expected")
            database_wiring(docs, where)
            broker_wiring(docs, where)
    print(f"  ok   {sum(len(d) for d in rendered.values())} rendered objects checked")
    # HTTPRoute is a CRD kubernetes-validate has no schema for: check its shape here.
    for (variant, kube), docs in rendered.items():
        for d in docs:
            if d["kind"] == "HTTPRoute":
                spec = d["spec"]
                check(d["apiVersion"] == "gateway.networking.k8s.io/v1" and spec["parentRefs"]
                      and spec["rules"][0]["backendRefs"][0] == {"name": "shop-gateway", "port": 8080},
                      f"{variant} (k8s {kube}): HTTPRoute malformed: {spec}")


def monitoring_objects(docs: list[dict], where: str) -> None:
    """ServiceMonitors, PodMonitors, PrometheusRule and dashboard ConfigMaps: CRDs that
    kubernetes-validate has no schema for, so their shape is checked here."""
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for kind, key in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        monitors = [d for d in docs if d["kind"] == kind]
        check(sorted(m["metadata"]["name"] for m in monitors) == sorted([*deployments, "shop-rabbitmq"]),
              f"{where}: one {kind} per component and one for RabbitMQ expected")
        for m in monitors:
            if m["metadata"]["name"] == "shop-rabbitmq":
                ep = m["spec"][key][0]
                check(ep["port"] == "metrics" and m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "rabbitmq",
                      f"{where} {kind}/shop-rabbitmq: malformed: {m['spec']}")
                continue
            ep = m["spec"][key][0]
            dep = deployments.get(m["metadata"]["name"])
            pod_labels = dep["spec"]["template"]["metadata"]["labels"] if dep else {}
            check(m["apiVersion"] == "monitoring.coreos.com/v1" and ep["port"] == "http"
                  and ep["path"] == "/metrics" and ep["honorLabels"] is True
                  and m["metadata"]["labels"].get("release") == "kube-prometheus-stack"
                  and m["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(),
                  f"{where} {kind}/{m['metadata']['name']}: malformed: {m['spec']}")
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    alerts = {r["alert"] for d in rules for g in d["spec"]["groups"] for r in g["rules"] if "alert" in r}
    check(len(rules) == 1 and {"ShopInstanceDown", "ShopNoReadyEndpoint", "ShopAvailabilityBudgetBurnFast",
                               "ShopLatencyBudgetBurnSlow"} <= alerts,
          f"{where}: PrometheusRule missing or incomplete: {sorted(alerts)}")
    boards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    check(len(boards) == len(list((CHART / "dashboards").glob("*.json"))),
          f"{where}: one dashboard ConfigMap per charts/shop/dashboards/*.json expected")
    for b in boards:
        (name, text), = b["data"].items()
        check(name.endswith(".json") and json.loads(text).get("uid"), f"{where} {b['metadata']['name']}: not a dashboard")


def selectors(node, key=None):
    """Every selector in a spec, at any depth (Deployment, Service, PDB, NetworkPolicy peers, spread)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("selector", "podSelector", "labelSelector", "namespaceSelector"):
                yield k, v
            yield from selectors(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from selectors(v, key)


def secrets_of(docs: list[dict]) -> dict[str, dict[str, str]]:
    """Every Secret's keys, decoded."""
    return {d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
            | (d.get("stringData") or {}) for d in docs if d["kind"] == "Secret"}


def database_wiring(docs: list[dict], where: str) -> None:
    """Each service's DATABASE_URL names its own PostgreSQL: host, role, database, password."""
    secrets = secrets_of(docs)
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    for sts in (d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"].endswith("-postgresql")):
        c = sts["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "password")
        secret = secrets.get(volume["secret"]["secretName"])
        if not check(secret is not None, f"{where} {sts['metadata']['name']}: password Secret missing"):
            continue
        url = urlsplit(secret["database-url"])
        check(url.scheme == "postgres" and url.hostname == sts["spec"]["serviceName"] and url.hostname in services
              and url.port == 5432 and url.username == env["POSTGRES_USER"] and url.password == secret["password"]
              and url.path == f"/{env['POSTGRES_DB']}",
              f"{where} {sts['metadata']['name']}: database-url does not match the StatefulSet ({url.hostname}, {url.username})")


def broker_wiring(docs: list[dict], where: str) -> None:
    """The services' AMQP_URL names the bundled RabbitMQ with the account it creates; the
    gateway has none."""
    secrets = secrets_of(docs)
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    sts = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "shop-rabbitmq"]
    if not check(len(sts) == 1, f"{where}: one RabbitMQ StatefulSet expected"):
        return
    env = {e["name"]: e for e in sts[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    ref = env["RABBITMQ_DEFAULT_PASS"]["valueFrom"]["secretKeyRef"]
    secret = secrets.get(ref["name"])
    if not check(secret is not None and ref["key"] == "password", f"{where}: RabbitMQ password Secret missing: {ref}"):
        return
    url = urlsplit(secret["amqp-url"])
    check(url.scheme == "amqp" and url.hostname == sts[0]["spec"]["serviceName"] and url.hostname in services
          and url.port == 5672 and url.username == env["RABBITMQ_DEFAULT_USER"]["value"]
          and url.password == secret["password"],
          f"{where}: amqp-url does not match the RabbitMQ StatefulSet ({url.hostname}, {url.username})")
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        amqp = [e["valueFrom"]["secretKeyRef"] for c in d["spec"]["template"]["spec"]["containers"]
                for e in c.get("env", []) if e["name"] == "AMQP_URL"]
        want = [] if d["metadata"]["name"] == "shop-gateway" else [{"name": ref["name"], "key": "amqp-url"}]
        check(amqp == want, f"{where} {d['metadata']['name']}: AMQP_URL {amqp}, expected {want}")


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


def kubernetes_validate(outdir: Path) -> None:
    step(f"kubernetes-validate --strict (Kubernetes {', '.join(KUBE_VERSIONS)}) on every render and overlay")
    for kube in KUBE_VERSIONS:
        files = sorted(str(p) for p in outdir.glob(f"*-{kube}.yaml")) + sorted(str(p) for p in outdir.glob("kustomize-*.yaml"))
        out = run([tool("kubernetes-validate"), "--strict", "-k", kube, "--quiet", *files])
        # The only tolerated warnings: no schema for the Gateway API and Prometheus Operator
        # CRDs (their shape is checked in chart_rules; rules by scripts/check-observability).
        noise = [line for line in (out.stdout + out.stderr).splitlines()
                 if line.strip() and not re.search(r"Couldn't find schema for kind "
                                                    r"(HTTPRoute|ServiceMonitor|PodMonitor|PrometheusRule)", line)]
        check(out.returncode == 0 and not noise, f"kubernetes-validate {kube}: {chr(10).join(noise)[-2000:]}")
        print(f"  ok   {len(files)} files valid for {kube}")


def kustomize(outdir: Path) -> None:
    step("k8s/: base equals a fresh render of the chart; overlays build")
    out = run([str(ROOT / "scripts" / "render-k8s"), "--check"], env=os.environ | {"HELM": HELM, "PYTHON": sys.executable})
    check(out.returncode == 0, f"k8s/base is stale: {out.stdout[-1500:]}{out.stderr[-500:]}")
    for overlay in ("dev", "prod"):
        built = run([KUSTOMIZE, "build", f"k8s/overlays/{overlay}"])
        if not check(built.returncode == 0, f"kustomize build {overlay}: {built.stderr[-500:]}"):
            continue
        (outdir / f"kustomize-{overlay}.yaml").write_text(built.stdout)
        docs = docs_of(built.stdout)
        deployments = [d for d in docs if d["kind"] == "Deployment"]
        secret_names = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
        if overlay == "dev":
            check(all(d["spec"].get("replicas") == 1 for d in deployments), "dev: one replica each")
            check(all(d["data"].get("RUST_LOG") == "debug" for d in docs
                      if d["kind"] == "ConfigMap" and "RUST_LOG" in d["data"]), "dev: debug logs")
            refs = {c["env"][0]["valueFrom"]["secretKeyRef"]["name"] for d in deployments
                    for c in d["spec"]["template"]["spec"]["containers"] if c.get("env")}
            check(refs and refs <= secret_names, f"dev: DATABASE_URL secrets {refs} not generated ({secret_names})")
            database_wiring(docs, "k8s/overlays/dev")
            broker_wiring(docs, "k8s/overlays/dev")
        else:
            check(all("replicas" not in d["spec"] for d in deployments), "prod: replicas left to the HPAs")
            hpas = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
            check(hpas == {d["metadata"]["name"] for d in deployments}, f"prod: HPA per Deployment, got {hpas}")
        print(f"  ok   overlays/{overlay}: {len(docs)} objects")


def checkov(outdir: Path) -> None:
    step("checkov (kubernetes, helm, kustomize, dockerfile): zero failed checks")
    env = os.environ | {"BC_SKIP_MAPPING": "TRUE", "PATH": f"{Path(HELM).parent}:{VENV_BIN}:{os.environ['PATH']}",
                        "LOG_LEVEL": "ERROR"}
    scans = {
        "rendered manifests": ["-d", str(outdir), "--framework", "kubernetes"],
        "helm chart": ["--config-file", ".checkov-helm.yaml", "-d", "charts", "--framework", "helm"],
        "kustomize overlays": ["-d", "k8s", "--framework", "kustomize"],
        "Dockerfile": ["-f", "Dockerfile", "--framework", "dockerfile"],
    }
    for what, args in scans.items():
        config = [] if "--config-file" in args else ["--config-file", ".checkov.yaml"]
        out = run([tool("checkov"), "--skip-download", *config, "-o", "json", *args], env=env)
        try:
            reports = json.loads(out.stdout)
        except json.JSONDecodeError:
            check(False, f"checkov {what}: no JSON report: {out.stdout[-500:]} {out.stderr[-500:]}")
            continue
        reports = reports if isinstance(reports, list) else [reports]
        passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
        failed = [f"{c['check_id']} {c['resource']} ({c.get('file_path')})" for r in reports
                  for c in r.get("results", {}).get("failed_checks", [])]
        skipped = sum(r.get("summary", {}).get("skipped", 0) for r in reports)
        check(passed > 0, f"checkov {what}: nothing was scanned")
        check(not failed, f"checkov {what}: {len(failed)} failed: " + "; ".join(failed[:20]))
        print(f"  ok   {what}: {passed} passed, {len(failed)} failed, {skipped} skipped (exceptions in .checkov.yaml)")


def hadolint_and_yamllint() -> None:
    step("hadolint Dockerfile, yamllint")
    out = run([tool("hadolint"), "--config", ".hadolint.yaml", "Dockerfile"])
    check(out.returncode == 0, f"hadolint: {out.stdout}{out.stderr}")
    files = ["charts/shop/Chart.yaml", "charts/shop/values.yaml", *map(str, sorted((CHART / "ci").glob("*.yaml"))),
             "skaffold.yaml", "docker-compose.yml", *map(str, sorted(ROOT.glob("observability/**/*.y*ml"))),
             ".checkov.yaml", ".checkov-helm.yaml", ".hadolint.yaml", ".yamllint.yaml",
             *map(str, sorted(ROOT.glob("k8s/**/*.yaml")))]
    yamllint = shutil.which("yamllint") or tool("yamllint")
    out = run([yamllint, "--strict", "-c", ".yamllint.yaml", *files])
    check(out.returncode == 0, f"yamllint: {out.stdout[-2000:]}{out.stderr[-500:]}")
    print(f"  ok   hadolint clean; yamllint clean on {len(files)} files")


def config_schemas() -> None:
    step("skaffold.yaml and docker-compose.yml against their schemas (.ci/schemas)")
    for doc, schema in (("skaffold.yaml", "skaffold-v4beta13.json"), ("docker-compose.yml", "compose-spec.json")):
        validator = jsonschema.Draft7Validator(json.loads((ROOT / ".ci" / "schemas" / schema).read_text()))
        value = yaml.safe_load((ROOT / doc).read_text())
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        check(error is None, f"{doc}: {error.message if error else ''} at {list(error.path) if error else ''}")
        # And the schema is not vacuous: a misspelt key in the same document is refused.
        broken = json.loads(json.dumps(value))
        if doc == "skaffold.yaml":
            broken["build"]["artifacts"][0]["dockerfil"] = "Dockerfile"
        else:
            broken["services"]["gateway"]["healthchek"] = {}
        check(next(validator.iter_errors(broken), None) is not None, f"{schema} accepted a misspelt key")
    sk = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    check(sk["apiVersion"] == "skaffold/v4beta13", "skaffold.yaml: apiVersion must be skaffold/v4beta13")
    arts = {a["image"]: a["docker"]["buildArgs"]["SERVICE"] for a in sk["build"]["artifacts"]}
    check(arts == {f"shop-{c}": c for c in COMPONENTS}, f"skaffold: one artifact per component: {arts}")
    # The buildah profile builds the same four images with scripts/skaffold-buildah.
    buildah = next(p for p in sk["profiles"] if p["name"] == "buildah")["build"]
    built = {a["image"]: (a["custom"]["buildCommand"], "Dockerfile" in a["custom"]["dependencies"]["paths"])
             for a in buildah["artifacts"]}
    check(built == {f"shop-{c}": (f"scripts/skaffold-buildah {c}", True) for c in COMPONENTS} and buildah["local"]["push"],
          f"skaffold profile buildah: one pushed artifact per component through scripts/skaffold-buildah: {built}")
    release = sk["deploy"]["helm"]["releases"][0]
    templates = release["setValueTemplates"]
    for c in COMPONENTS:
        key = f"shop_{c}"
        check(templates.get(f"components.{c}.image.repository") == f"{{{{.IMAGE_REPO_{key}}}}}"
              and templates.get(f"components.{c}.image.tag") == f"{{{{.IMAGE_TAG_{key}}}}}",
              f"skaffold: image values for {c} not wired to its artifact")
    # Every value skaffold sets must exist in the chart's schema (helm would refuse it otherwise).
    values_schema = json.loads((CHART / "values.schema.json").read_text())
    for profile in sk["profiles"]:
        for patch in profile.get("patches", []):
            key = patch["path"].rsplit("/", 1)[-1]
            if "/setValues/" in patch["path"]:
                check(schema_has(values_schema, key.split(".")), f"skaffold profile {profile['name']}: {key} not a chart value")
    for key in templates:
        check(schema_has(values_schema, key.split(".")), f"skaffold: {key} not a chart value")
    print("  ok   both valid; misspelt keys rejected; artifacts and image values wired")


def skaffold_profiles() -> None:
    """skaffold itself applies each profile and renders the chart with it (no build, no
    cluster): a patch the schema accepts can still miss its path, which only skaffold sees."""
    step("skaffold render: every profile, and combined as the README suggests (skaffold itself)")
    profiles = [p["name"] for p in yaml.safe_load((ROOT / "skaffold.yaml").read_text())["profiles"]]
    defaults = {"replicas": {1, 2}, "log": "info", "ingress": False}
    dev = {"replicas": {1}, "log": "debug"}
    # What each profile changes; any profile not named here changes none of these.
    expect = {
        "dev": defaults | dev,
        "minikube": defaults | {"ingress": True},
        "kind,dev": defaults | dev,
        "minikube,dev": defaults | dev | {"ingress": True},
    }
    combos = [""] + profiles + [c for c in expect if "," in c]
    failed_before = len(failures)
    with tempfile.TemporaryDirectory(prefix="shop-skaffold-") as home:
        for combo in combos:
            out = run([SKAFFOLD, "render", *(["-p", combo] if combo else []), "--digest-source=tag",
                       "--offline=true", "--update-check=false", "--interactive=false"],
                      env=os.environ | {"HOME": home, "PATH": f"{Path(HELM).parent}:{os.environ['PATH']}"})
            name = combo or "(no profile)"
            if not check(out.returncode == 0, f"skaffold render {name}: {out.stderr.strip()[-400:]}"):
                continue
            objs = docs_of(out.stdout)
            deploys = [o for o in objs if o["kind"] == "Deployment"]
            images = {c["image"].split(":")[0] for d in deploys for c in d["spec"]["template"]["spec"]["containers"]}
            check(images == {f"shop-{c}" for c in COMPONENTS}, f"skaffold render {name}: images {images}")
            want = expect.get(combo, defaults)
            replicas = {o["spec"]["replicas"] for o in objs if o["kind"] in ("Deployment", "StatefulSet")}
            levels = {o["data"]["RUST_LOG"] for o in objs
                      if o["kind"] == "ConfigMap" and "RUST_LOG" in o.get("data", {})}
            ingress = any(o["kind"] == "Ingress" for o in objs)
            check(replicas == want["replicas"] and ingress == want["ingress"]
                  and all(want["log"] in level for level in levels) and levels,
                  f"skaffold render {name}: replicas {replicas}, RUST_LOG {levels}, ingress {ingress}; want {want}")
    if len(failures) == failed_before:
        print(f"  ok   {len(combos)} renders: {', '.join(c or '(none)' for c in combos)}")


def schema_has(schema: dict, path: list[str]) -> bool:
    node = schema
    for part in path:
        while "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        props = node.get("properties", {})
        if part not in props:
            return False
        node = props[part]
    return True


# ---------------------------------------------------------------------------------------
# Contract: packaging against the binaries


def describe_all() -> dict[str, dict]:
    out = {}
    for c in COMPONENTS:
        res = run([str(BIN / c), "describe"])
        check(res.returncode == 0, f"{c} describe: {res.stderr}")
        out[c] = json.loads(res.stdout)
    return out


def var_names(description: dict, component: str) -> set[str]:
    names = {v["name"] for v in description["vars"]}
    if "<UPSTREAM>_URL" in names:  # the gateway: one variable per upstream of its route table
        table = yaml.safe_load((ROOT / "gateway" / "routes.yaml").read_text())
        names |= {f"{u.upper().replace('-', '_')}_{suffix}" for u in table["upstreams"] for suffix in ("URL", "SERVICE")}
    return names


def dockerfile_entrypoint() -> str:
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, re.M)
    return m.group(1) if m else ""


def contract(rendered: dict, outdir: Path, described: dict[str, dict]) -> None:
    step("contract: probe paths, ports, env names and grace periods match what the binaries serve and read")
    entry = dockerfile_entrypoint()
    check(entry == "/usr/local/bin/service", f"Dockerfile ENTRYPOINT is {entry!r}")
    sources = {f"chart {v} (k8s {k})": docs for (v, k), docs in rendered.items()}
    for overlay in ("dev", "prod"):
        path = outdir / f"kustomize-{overlay}.yaml"
        if path.exists():
            sources[f"k8s/overlays/{overlay}"] = docs_of(path.read_text())
    compared = 0
    for where, docs in sources.items():
        configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        for d in docs:
            if d["kind"] != "Deployment":
                continue
            component = d["metadata"]["labels"]["app.kubernetes.io/component"]
            info = described[component]
            pod = d["spec"]["template"]["spec"]
            c = pod["containers"][0]
            env = {}
            for ref in c.get("envFrom", []):
                env |= configmaps[ref["configMapRef"]["name"]]
            env |= {e["name"]: e.get("value") for e in c.get("env", [])}
            unknown = set(env) - var_names(info, component)
            check(not unknown, f"{where} {component}: sets variables the binary does not read: {sorted(unknown)}")
            port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
            check(str(port) == env.get("PORT"), f"{where} {component}: containerPort {port} but PORT={env.get('PORT')}")
            check(port == info["port"], f"{where} {component}: port {port}, binary default {info['port']}")
            for probe, path in (("startupProbe", info["probes"]["readiness"]), ("readinessProbe", info["probes"]["readiness"]),
                                ("livenessProbe", info["probes"]["liveness"])):
                got = c[probe]["httpGet"]
                check(got["path"] == path and got["port"] in ("http", port),
                      f"{where} {component}: {probe} {got} but the binary serves {path} on {port}")
            pre = c.get("lifecycle", {}).get("preStop", {})
            pre_stop = pre.get("sleep", {}).get("seconds", 0)
            if "exec" in pre:
                cmd = pre["exec"]["command"]
                check(cmd[0] == entry and cmd[1] == "sleep", f"{where} {component}: preStop {cmd} is not the binary's sleep")
                pre_stop = seconds(cmd[2])
            delay = seconds(env.get("SHUTDOWN_DELAY") or info["shutdown"]["delay"])
            timeout = seconds(env.get("SHUTDOWN_TIMEOUT") or info["shutdown"]["timeout"])
            grace = pod.get("terminationGracePeriodSeconds", 30)
            check(grace > pre_stop + delay + timeout,
                  f"{where} {component}: grace {grace}s not above preStop {pre_stop}s + delay {delay}s + timeout {timeout}s")
            compared += 1
    # docker-compose.yml: same rules.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, svc in compose["services"].items():
        if "observability" in svc.get("profiles", []):
            # Third-party images of the opt-in profile: pinned, and every mounted file exists.
            check(re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", svc.get("image", "")) is not None,
                  f"compose {name}: image not pinned to a version: {svc.get('image')}")
            for volume in svc.get("volumes", []):
                check((ROOT / volume.split(":")[0]).exists(), f"compose {name}: {volume} mounts a missing path")
            continue
        if name == "rabbitmq":
            # The broker: the image the chart deploys, locked down like the services.
            values = yaml.safe_load((CHART / "values.yaml").read_text())["rabbitmq"]["image"]
            check(svc.get("image") == f"{values['repository']}:{values['tag']}",
                  f"compose rabbitmq: image {svc.get('image')} is not the chart's {values['repository']}:{values['tag']}")
            check(svc.get("read_only") is True and svc.get("user") not in (None, "0", "root")
                  and svc.get("cap_drop") == ["ALL"] and svc.get("healthcheck", {}).get("test"),
                  f"compose rabbitmq: not read-only, non-root, without capabilities, with a healthcheck")
            check(svc.get("hostname") == "rabbitmq" and "rabbitmq-data:/var/lib/rabbitmq" in svc.get("volumes", []),
                  "compose rabbitmq: a fixed host name (the node's name) and its data on a volume")
            continue
        component = svc["build"]["args"]["SERVICE"]
        info = described[component]
        env = {k: str(v) for k, v in svc.get("environment", {}).items()}
        unknown = set(env) - var_names(info, component)
        check(not unknown, f"compose {name}: sets variables the binary does not read: {sorted(unknown)}")
        check(env.get("PORT") == str(info["port"]), f"compose {name}: PORT {env.get('PORT')} vs {info['port']}")
        check(svc["healthcheck"]["test"] == ["CMD", entry, "healthcheck"], f"compose {name}: healthcheck {svc['healthcheck']['test']}")
        delay = seconds(env.get("SHUTDOWN_DELAY") or info["shutdown"]["delay"])
        timeout = seconds(env.get("SHUTDOWN_TIMEOUT") or info["shutdown"]["timeout"])
        check(seconds(svc["stop_grace_period"]) > delay + timeout,
              f"compose {name}: stop_grace_period {svc['stop_grace_period']} not above {delay + timeout}s")
        check(svc.get("read_only") is True and svc.get("user") == "65532:65532", f"compose {name}: not read-only non-root")
        for dep, cond in svc.get("depends_on", {}).items():
            check(cond.get("condition") == "service_healthy", f"compose {name}: depends_on {dep} without service_healthy")
        compared += 1
    print(f"  ok   {compared} workloads compared with `describe` of the binaries they run")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def live(rendered: dict) -> None:
    step("live: the four binaries with the chart's environment, probed on the chart's paths; helm test's smoke")
    docs = rendered[("default", KUBE_VERSIONS[0])]
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "Deployment"}
    ports = {c: free_port() for c in COMPONENTS}
    data = Path(tempfile.mkdtemp(prefix="shop-packaging-"))
    procs: dict[str, subprocess.Popen] = {}
    try:
        for c in ("product", "user", "order", "gateway"):
            env = dict(configmaps[f"shop-{c}"])
            if env.get("DISCOVERY") == "kubernetes":
                # No API server here: the same upstreams as static lists on loopback.
                env["DISCOVERY"] = "static"
                for other in ("product", "order", "user"):
                    env[f"{other.upper()}_URL"] = f"http://127.0.0.1:{ports[other]}"
            # Same variables, local addresses: services are on loopback, not cluster DNS.
            for k, v in env.items():
                for other in COMPONENTS:
                    v = v.replace(f"http://shop-{other}:{deployments[other]['spec']['template']['spec']['containers'][0]['ports'][0]['containerPort']}",
                                  f"http://127.0.0.1:{ports[other]}")
                env[k] = v
            env |= {"HOST": "127.0.0.1", "PORT": str(ports[c]), "DATA_DIR": str(data / c), "PATH": os.environ["PATH"]}
            # Secret volumes as the kubelet would mount them (the token signing key): the
            # files the chart generates must be what the binary reads.
            pod = deployments[c]["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for mount in pod["containers"][0].get("volumeMounts", []):
                secret_name = volumes[mount["name"]].get("secret", {}).get("secretName")
                if not secret_name:
                    continue
                secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == secret_name)
                local = data / c / "mounts" / mount["mountPath"].lstrip("/")
                local.mkdir(parents=True)
                for item in volumes[mount["name"]]["secret"]["items"]:
                    target = local / item["path"]
                    target.write_bytes(base64.b64decode(secret["data"][item["key"]]))
                    target.chmod(volumes[mount["name"]]["secret"]["defaultMode"])
                env = {k: v.replace(mount["mountPath"], str(local)) for k, v in env.items()}
            # DATABASE_URL (PostgreSQL, from the Secret) is left unset: SQLite under DATA_DIR.
            procs[c] = subprocess.Popen([str(BIN / c)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        for c in COMPONENTS:
            probe = deployments[c]["spec"]["template"]["spec"]["containers"][0]
            ready, live_path = probe["readinessProbe"]["httpGet"]["path"], probe["livenessProbe"]["httpGet"]["path"]
            status = 0
            while time.monotonic() < deadline and status != 200:
                status, body = http_get(ports[c], ready)
                if status != 200:
                    time.sleep(0.2)
            check(status == 200, f"{c}: readiness {ready} answered {status}")
            check(http_get(ports[c], live_path)[0] == 200, f"{c}: liveness {live_path} not 200")
            hc = run([str(BIN / c), "healthcheck"], env={"PORT": str(ports[c]), "HOST": "0.0.0.0"})
            check(hc.returncode == 0, f"{c} healthcheck against a ready server exited {hc.returncode}: {hc.stderr}")
        closed = free_port()
        hc = run([str(BIN / "product"), "healthcheck"], env={"PORT": str(closed)})
        check(hc.returncode == 1, f"healthcheck with nothing listening exited {hc.returncode}, expected 1")
        hc = run([str(BIN / "product"), "healthcheck"], env={"PORT": "eighty"})
        check(hc.returncode == 2, f"healthcheck with an invalid PORT exited {hc.returncode}, expected 2")
        print(f"  ok   every binary ready on the chart's probe paths; healthcheck exits 0 / 1 / 2")

        pod = next(d for d in docs if d["kind"] == "Pod")
        args = pod["spec"]["containers"][0]["args"]
        check(args[0] == "smoke" and args[1] == "http://shop-gateway:8080", f"helm test pod args {args}")
        smoke = run([str(BIN / "gateway"), "smoke", f"http://127.0.0.1:{ports['gateway']}"], timeout=120)
        check(smoke.returncode == 0 and "smoke: passed" in smoke.stdout, f"smoke failed: {smoke.stdout}{smoke.stderr}")
        print("  ok   `gateway smoke` (the helm test) passed:\n" + "".join(f"         {line}\n" for line in smoke.stdout.splitlines()))
        bad = run([str(BIN / "gateway"), "smoke"])
        check(bad.returncode == 2, f"smoke without a URL exited {bad.returncode}")

        # SIGTERM with the chart's shutdown settings: ready flips at once, exit 0 well inside the grace.
        env = configmaps["shop-product"]
        delay, timeout = seconds(env["SHUTDOWN_DELAY"]), seconds(env["SHUTDOWN_TIMEOUT"])
        grace = deployments["product"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        started = time.monotonic()
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        status, _ = http_get(ports["product"], "/ready")
        check(status == 503, f"product /ready during shutdown answered {status}, expected 503")
        check(http_get(ports["product"], "/health")[0] == 200, "product /health must stay 200 while draining")
        for c, p in procs.items():
            try:
                code = p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - started
            check(code == 0, f"{c}: exit status {code} after SIGTERM")
            check(delay <= took < delay + timeout, f"{c}: stopped after {took:.1f}s (delay {delay}s, timeout {timeout}s)")
        print(f"  ok   SIGTERM: /ready 503 at once, /health 200, all four exit 0 after {time.monotonic() - started:.1f}s "
              f"(delay {delay:.0f}s, grace {grace}s)")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(data, ignore_errors=True)


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shop-render-") as tmp:
        outdir = Path(tmp)
        rendered = lint_and_render(outdir)
        schema_rejects_bad_values()
        chart_rules(rendered)
        kustomize(outdir)
        kubernetes_validate(outdir)
        hadolint_and_yamllint()
        config_schemas()
        skaffold_profiles()
        described = describe_all()
        contract(rendered, outdir, described)
        live(rendered)
        # checkov scans the rendered directory: only the files kubernetes-validate checked.
        checkov(outdir)
    took = time.monotonic() - started
    if failures:
        print(f"\npackaging: {len(failures)} of {counts['checks']} checks FAILED ({took:.0f}s)")
        for f in failures:
            print(f"  - {f}")
        return 1
    print(f"\npackaging: all {counts['checks']} checks passed ({took:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
