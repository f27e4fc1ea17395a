#!/usr/bin/env python3
"""The observability pack, proven against the real binaries (run by scripts/check-observability).

1. Dashboards: fresh (observability/dashboards.py --check) and valid Grafana JSON:
   schemaVersion, unique panel ids, every panel and target on the templated datasource.
2. Rules: the chart's PrometheusRule rendered by Helm, `promtool check rules`, and
   `promtool test rules` (observability/rules-test.yaml: every alert fires and stays silent).
3. The four binaries started on loopback (AUTH_MODE=demo), exporting spans over OTLP/HTTP
   to a receiver in this process, with their events on a private RabbitMQ node
   (scripts/rabbitmq-node); Debian's Prometheus scraping their /metrics every second
   with the rendered rules loaded; traffic driven through the gateway, including refusals,
   404s and 5xx (the product service is stopped for a moment, then restarted).
4. Every PromQL expression in the dashboards (targets and variables) and in the rules is
   evaluated through Prometheus's HTTP API: each must parse and return data. Alert
   conditions may be empty; their inner selectors must each return data.
5. One POST /api/v1/orders: gateway, order, product and user spans share one trace id with
   the right parents, names by route and standard HTTP attributes; a 5xx span is marked as an
   error; the trace id is in the JSON request log line of each of the four services.
6. One cancellation: the order's cancel span, the product service's consumption of
   `order.cancelled` and the order service's of `stock.released` are one trace, each a
   child of the one before, the context carried in the message headers.
7. With the gateway sampling at ratio 0, an order's trace is logged everywhere and exported
   nowhere (the services follow the gateway's decision).
"""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "shop"
BIN = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
HELM = os.environ.get("HELM", "helm")
PROMETHEUS = os.environ.get("PROMETHEUS", "prometheus")
PROMTOOL = os.environ.get("PROMTOOL", "promtool")
NAMESPACE = "shop"  # the namespace the rules are rendered for; Prometheus labels targets with it
SERVICES = ["product", "user", "order", "gateway"]  # start order: dependencies first
PORTS = [8081, 8083, 8082, 8080]  # their default ports (compose)
RATE_INTERVAL = "1m"  # what $__rate_interval becomes at evaluation

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 10) -> tuple[int, dict, bytes]:
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def wait_until(what: str, predicate, timeout: float = 30, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


# ---------------------------------------------------------------------------------------
# Dashboards


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((CHART / "dashboards").glob("*.json"))}


def check_dashboards(boards: dict[str, dict]) -> None:
    step(f"dashboards: {len(boards)} valid Grafana JSON documents, fresh from observability/dashboards.py")
    fresh = subprocess.run([sys.executable, str(ROOT / "observability" / "dashboards.py"), "--check"],
                           capture_output=True, text=True)
    check(fresh.returncode == 0, f"dashboards are stale: {fresh.stderr.strip()}")
    check(len(boards) >= 6, f"expected overview, one per service and runtime; got {sorted(boards)}")
    uids = [b.get("uid") for b in boards.values()]
    check(len(set(uids)) == len(uids) and all(uids), f"dashboard uids missing or repeated: {uids}")
    for name, board in boards.items():
        check(isinstance(board.get("schemaVersion"), int) and board["schemaVersion"] >= 36,
              f"{name}: schemaVersion missing or older than Grafana 9")
        check(bool(board.get("title")) and board.get("id") is None,
              f"{name}: needs a title and no fixed numeric id (provisioning assigns it)")
        variables = {v["name"]: v for v in board.get("templating", {}).get("list", [])}
        ds = variables.get("datasource")
        check(ds is not None and ds.get("type") == "datasource" and ds.get("query") == "prometheus",
              f"{name}: no templated Prometheus datasource variable")
        check("namespace" in variables, f"{name}: not templated by namespace")
        panels = board.get("panels", [])
        ids = [p.get("id") for p in panels]
        check(all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids),
              f"{name}: panel ids missing or not unique: {ids}")
        for p in panels:
            check(isinstance(p.get("gridPos"), dict) and {"h", "w", "x", "y"} <= p["gridPos"].keys()
                  and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, f"{name} panel {p.get('id')}: bad gridPos")
            if p.get("type") == "row":
                continue
            check(p.get("datasource") == {"type": "prometheus", "uid": "${datasource}"},
                  f"{name} panel {p.get('id')}: datasource not the templated one: {p.get('datasource')}")
            targets = p.get("targets", [])
            check(bool(targets), f"{name} panel {p.get('id')}: no queries")
            refs = [t.get("refId") for t in targets]
            check(len(set(refs)) == len(refs), f"{name} panel {p.get('id')}: repeated refIds")
            for t in targets:
                check(t.get("datasource", {}).get("uid") == "${datasource}" and t.get("expr"),
                      f"{name} panel {p.get('id')} {t.get('refId')}: query without templated datasource")
    print(f"  ok   {sum(len(b['panels']) for b in boards.values())} panels checked")


def dashboard_queries(boards: dict[str, dict]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = []
    for name, board in boards.items():
        for p in board["panels"]:
            for t in p.get("targets", []):
                out.append((f"{name} '{p['title']}' {t['refId']}", t["expr"]))
        for v in board["templating"]["list"]:
            if v.get("type") == "query":
                q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
                check(m is not None, f"{name} variable {v['name']}: not label_values(selector, label): {q}")
                if m:
                    # label_values(selector, label) has values iff some series has the label.
                    out.append((f"{name} variable ${v['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    return out


def substitute(expr: str) -> str:
    return (expr.replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", NAMESPACE)
            .replace("$service", ".*"))


# ---------------------------------------------------------------------------------------
# Rules


def render_rules(work: Path) -> list[dict]:
    step("PrometheusRule: rendered by Helm, promtool check rules, promtool test rules")
    out = subprocess.run([HELM, "template", "shop", str(CHART), "--namespace", NAMESPACE,
                          "-f", str(CHART / "ci" / "monitoring-values.yaml"),
                          "--show-only", "templates/prometheusrule.yaml"], capture_output=True, text=True)
    if not check(out.returncode == 0, f"helm template: {out.stderr[-500:]}"):
        return []
    groups = yaml.safe_load(out.stdout)["spec"]["groups"]
    (work / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    shutil.copy(ROOT / "observability" / "rules-test.yaml", work / "rules-test.yaml")
    for cmd in (["check", "rules", "rules.yaml"], ["test", "rules", "rules-test.yaml"]):
        res = subprocess.run([PROMTOOL, *cmd], capture_output=True, text=True, cwd=work, timeout=300)
        check(res.returncode == 0, f"promtool {' '.join(cmd)}: {res.stdout[-3000:]}{res.stderr[-1500:]}")
        print(f"  {'ok  ' if res.returncode == 0 else 'FAIL'} promtool {' '.join(cmd)}: "
              f"{res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ''}")
    rules = [r for g in groups for r in g["rules"]]
    alerts = {r["alert"] for r in rules if "alert" in r}
    tested = set(re.findall(r"alertname: (\w+)", (ROOT / "observability" / "rules-test.yaml").read_text()))
    check(alerts <= tested, f"alerts without a promtool unit test: {sorted(alerts - tested)}")
    for r in rules:
        if "alert" in r:
            anchor = r["annotations"].get("runbook_url", "").partition("#")[2]
            check(bool(anchor) and anchor in runbook_anchors(),
                  f"{r['alert']}: runbook_url has no matching section in docs/OPERATIONS.md ({anchor!r})")
    print(f"  ok   {len(rules)} rules, {len(alerts)} alerts, each with a unit test and a runbook section")
    return rules


def runbook_anchors() -> set[str]:
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    return {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


# ---------------------------------------------------------------------------------------
# The running set


class Receiver(ThreadingHTTPServer):
    """OTLP/HTTP protobuf: POST /v1/traces with an ExportTraceServiceRequest."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.spans: list[dict] = []
        self.lock = threading.Lock()


class ReceiverHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/traces" or "protobuf" not in self.headers.get("Content-Type", ""):
            self.send_error(404)
            return
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = []
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {}
                    for a in s.attributes:
                        kind = a.value.WhichOneof("value")
                        attrs[a.key] = getattr(a.value, kind) if kind else None
                    spans.append({"service": resource.get("service.name"), "trace_id": s.trace_id.hex(),
                                  "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(), "name": s.name,
                                  "kind": s.kind, "status": s.status.code, "attrs": attrs})
        with self.server.lock:
            self.server.spans.extend(spans)
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


class Stack:
    """The four binaries on loopback, each logging to its own file."""

    def __init__(self, work: Path, otlp: str, amqp: str):
        self.work = work
        self.ports = {s: free_port() for s in SERVICES}
        self.procs: dict[str, subprocess.Popen] = {}
        self.base_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOST": "127.0.0.1", "LOG_FORMAT": "json",
            "RUST_LOG": "info", "SHUTDOWN_DELAY": "0s", "SHUTDOWN_TIMEOUT": "5s",
            # Authentication stays out of the way of the walkthrough-style traffic.
            "AUTH_MODE": "demo",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on", "OTEL_BSP_SCHEDULE_DELAY": "200",
            "PRODUCT_URL": self.url("product"), "USER_URL": self.url("user"), "ORDER_URL": self.url("order"),
            # Separate processes hear each other's events through a real broker.
            "AMQP_URL": amqp,
        }

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def log(self, service: str) -> Path:
        return self.work / f"{service}.log"

    def start(self, service: str, **extra: str) -> None:
        env = self.base_env | {"PORT": str(self.ports[service]), "DATA_DIR": str(self.work / "data" / service)} | extra
        (self.work / "data" / service).mkdir(parents=True, exist_ok=True)
        out = open(self.log(service), "ab")
        self.procs[service] = subprocess.Popen([str(BIN / service)], env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_until(f"{service} ready", lambda: http("GET", self.url(service) + "/ready", timeout=2)[0] == 200)

    def stop(self, service: str) -> None:
        proc = self.procs.pop(service, None)
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def stop_all(self) -> None:
        for service in reversed(SERVICES):
            self.stop(service)


def check_compose_configs() -> None:
    step("compose observability profile: Prometheus, collector and Grafana configuration")
    res = subprocess.run([PROMTOOL, "check", "config", str(ROOT / "observability" / "prometheus.yml")],
                         capture_output=True, text=True)
    check(res.returncode == 0, f"promtool check config observability/prometheus.yml: {res.stdout}{res.stderr}")
    col = yaml.safe_load((ROOT / "observability" / "otel-collector.yaml").read_text())
    for name, pipeline in col["service"]["pipelines"].items():
        for part in ("receivers", "processors", "exporters"):
            missing = set(pipeline.get(part, [])) - set(col.get(part) or {})
            check(not missing, f"otel-collector.yaml pipeline {name}: undefined {part} {sorted(missing)}")
    check(set(col["service"].get("extensions", [])) <= set(col.get("extensions") or {}),
          "otel-collector.yaml: service uses an undefined extension")
    otlp = col["receivers"]["otlp"]["protocols"]
    check(otlp["grpc"]["endpoint"].endswith(":4317") and otlp["http"]["endpoint"].endswith(":4318"),
          "otel-collector.yaml: OTLP on the standard ports 4317 (gRPC) and 4318 (HTTP)")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    profile = {n for n, s in compose.items() if "observability" in s.get("profiles", [])}
    check(profile == {"otel-collector", "jaeger", "prometheus", "grafana"}, f"observability profile: {profile}")
    mounts = " ".join(compose["grafana"]["volumes"])
    provider = yaml.safe_load((ROOT / "observability" / "grafana" / "dashboards.yaml").read_text())
    check(f"./charts/shop/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts,
          "Grafana's dashboard provider does not read the mounted chart dashboards")
    print(f"  ok   prometheus.yml valid; collector pipelines complete; Grafana provisioned")


def start_prometheus(work: Path, stack: Stack) -> tuple[subprocess.Popen, str]:
    """observability/prometheus.yml (the compose scrape config) pointed at the loopback
    ports, scraping every second, with the chart's rules loaded."""
    port = free_port()
    config = yaml.safe_load((ROOT / "observability" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(work / "rules.yaml")]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "shop")
    config["scrape_configs"] = [job]
    for target in job["static_configs"]:
        service = target["labels"]["service"]
        check(target["targets"] == [f"{service}:{dict(zip(SERVICES, PORTS))[service]}"],
              f"prometheus.yml: {service} target {target['targets']}")
        target["targets"] = [f"127.0.0.1:{stack.ports[service]}"]
        target["labels"]["namespace"] = NAMESPACE
    check(sorted(t["labels"]["service"] for t in job["static_configs"]) == sorted(SERVICES),
          "prometheus.yml should scrape all four services")
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(work / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until("Prometheus ready", lambda: http("GET", url + "/-/ready", timeout=2)[0] == 200)
    return proc, url


def drive_traffic(gateway: str, request_id: str) -> dict:
    """Requests through the gateway as a client would send them: successes, refusals (400,
    404, 409, 422) and reads. Returns what the trace check needs. Kept in one place so an
    authentication step (login, bearer token) can be added here alone."""
    headers: dict[str, str] = {}
    api = gateway + "/api/v1"
    seen: list[int] = []

    def call(method, path, body=None, extra=None):
        status, resp_headers, payload = http(method, api + path, body, headers | (extra or {}))
        seen.append(status)
        return status, resp_headers, payload

    call("POST", "/users", {"id": "obs-1", "name": "Ada Lovelace", "email": "ada@example.com",
                            "password": "correct horse battery staple"})
    call("POST", "/users", {"id": "obs-1", "name": "Ada Lovelace", "email": "ada@example.com",
                            "password": "correct horse battery staple"})  # 409 duplicate
    call("POST", "/users", {"name": "", "email": "not-an-email", "password": "x"})  # 422
    call("GET", "/users/obs-1")
    # Logins: one that works, one that does not (user_logins_total by outcome).
    call("POST", "/auth/login", {"email": "ada@example.com", "password": "correct horse battery staple"})
    call("POST", "/auth/login", {"email": "ada@example.com", "password": "wrong horse"})  # 401
    call("POST", "/products", {"name": "Keyboard", "price": 49.5, "quantity": 5})
    for _ in range(5):
        call("GET", "/products")
        call("GET", "/products/1")
        call("GET", "/products/does-not-exist")  # 404
    status, _, body = call("POST", "/orders", {"user_id": "obs-1", "products": ["2"]},
                           {"x-request-id": request_id})
    traced = {"request_id": request_id, "status": status, "body": body[:300]}
    for _ in range(3):
        call("POST", "/orders", {"user_id": "obs-1", "items": [{"product_id": "2", "quantity": 1}]})
    call("POST", "/orders", {"user_id": "obs-1", "items": [{"product_id": "1", "quantity": 100000}]})  # 409
    call("POST", "/orders", {"user_id": "obs-1", "products": []})  # 422
    call("POST", "/orders", b"{not json", {"Content-Type": "application/json"})  # 400
    call("GET", "/orders?user_id=obs-1")
    # A cancellation: its stock comes back through order.cancelled and stock.released.
    status, _, body = call("POST", "/orders", {"user_id": "obs-1", "products": ["2"]})
    cancel_id = f"{request_id}-cancel"
    if status == 201:
        order_id = json.loads(body)["id"]
        call("POST", f"/orders/{order_id}/cancel", None, {"x-request-id": cancel_id})
        wait_until("the cancelled order's stock to come back", lambda: json.loads(
            http("GET", f"{api}/orders/{order_id}")[2]).get("stock_returned_at") is not None, timeout=20)
    traced["cancel_request_id"] = cancel_id
    http("GET", gateway + "/no/such/route")  # gateway 404, unmatched
    traced["statuses"] = sorted(set(seen))
    return traced


# ---------------------------------------------------------------------------------------
# PromQL through the HTTP API

SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^{}]*)\}")


def query(prom: str, expr: str) -> tuple[bool, list, str]:
    status, _, body = http("GET", prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    payload = json.loads(body or b"{}")
    if status != 200 or payload.get("status") != "success":
        return False, [], payload.get("error", f"HTTP {status}")
    return True, payload["data"]["result"], ""


def evaluate(prom: str, queries: list[tuple[str, str]], rules: list[dict]) -> None:
    step(f"PromQL: {len(queries)} dashboard queries and {len(rules)} rule expressions against Prometheus")
    empty_ok = 0
    for where, expr in queries:
        ok, result, err = query(prom, substitute(expr))
        check(ok, f"{where}: does not evaluate: {err}: {expr}")
        if ok:
            check(len(result) > 0, f"{where}: no data: {substitute(expr)}")
    for r in rules:
        name = r.get("record") or r.get("alert")
        ok, result, err = query(prom, r["expr"])
        check(ok, f"rule {name}: does not evaluate: {err}")
        if "record" in r:
            check(ok and len(result) > 0, f"recording rule {name}: no data: {r['expr']}")
            # And Prometheus itself recorded it.
            ok, recorded, _ = query(prom, r["record"])
            check(ok and len(recorded) > 0, f"recording rule {name}: nothing recorded by Prometheus")
        else:
            # An alert condition is legitimately empty while all is well; what it reads is not.
            selectors = SELECTOR.findall(r["expr"])
            check(bool(selectors), f"alert {name}: no series selector found in {r['expr']}")
            for metric, matchers in selectors:
                ok, inner, err = query(prom, f"{metric}{{{matchers}}}")
                check(ok and len(inner) > 0, f"alert {name}: inner series {metric}{{{matchers}}} has no data {err}")
            empty_ok += not result
    print(f"  ok   every query evaluated; {empty_ok} alert conditions empty (not firing), "
          f"their inner series present")


# ---------------------------------------------------------------------------------------
# Series present from start-up

# Families with a label whose values only traffic tells (a status code, a route that was
# hit): they appear with their first request.
APPEAR_WITH_TRAFFIC = {
    "http_server_requests_total", "http_server_request_duration_seconds_bucket",
    "http_client_requests_total", "http_client_request_duration_seconds_bucket",
    "gateway_upstream_requests_total",
}
# Labels Prometheus attaches at scrape time, and the ones the dashboards select by variable.
SCRAPE_LABELS = {"namespace", "job", "instance", "pod"}
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$")
MATCHER = re.compile(r'(\w+)\s*(=~|!=|!~|=)\s*"((?:[^"\\]|\\.)*)"')


def check_fresh_exports(stack: "Stack", queries: list[tuple[str, str]], rules: list[dict]) -> None:
    """Every series a dashboard or an alert selects is exported by a binary that has served
    nothing yet, so a fresh install shows zeros, not "No data"."""
    step("fresh binaries: every series the dashboards and alerts select is exported before any traffic")
    samples: list[tuple[str, dict]] = []
    for service in SERVICES:
        status, _, body = http("GET", stack.url(service) + "/metrics")
        check(status == 200, f"{service} /metrics: HTTP {status}")
        for line in body.decode().splitlines():
            m = SAMPLE.match(line)
            if m and not line.startswith("#"):
                samples.append((m.group(1), dict((k, v) for k, _, v in MATCHER.findall(m.group(2) or ""))))
    selectors = {(metric, matchers) for _, expr in queries for metric, matchers in SELECTOR.findall(expr)}
    selectors |= {(metric, matchers) for r in rules for metric, matchers in SELECTOR.findall(r["expr"])}
    checked, failed_before = 0, len(failures)
    for metric, matchers in sorted(selectors):
        if ":" in metric or metric in {"up", "ALERTS"} or metric in APPEAR_WITH_TRAFFIC:
            continue
        wanted = {k: v for k, op, v in MATCHER.findall(matchers)
                  if op == "=" and k not in SCRAPE_LABELS and "$" not in v}
        found = any(name == metric and all(labels.get(k) == v for k, v in wanted.items())
                    for name, labels in samples)
        check(found, f"{metric}{{{matchers}}}: not exported by a freshly started binary")
        checked += 1
    print(f"  {'ok  ' if len(failures) == failed_before else 'FAIL'} {checked} selectors checked "
          f"against the start-up exposition "
          f"({len(APPEAR_WITH_TRAFFIC)} families wait for their first request)")


# ---------------------------------------------------------------------------------------
# Traces and logs


def log_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def check_trace(stack: Stack, receiver: Receiver, traced: dict) -> None:
    step("traces: one POST /api/v1/orders across gateway -> order -> product and user")
    check(traced["status"] == 201, f"traced order not created: {traced['status']} {traced['body']!r}")
    gateway_lines = [e for e in log_lines(stack.log("gateway")) if e.get("request_id") == traced["request_id"]]
    if not check(len(gateway_lines) == 1, f"expected one gateway log line for the traced request: {gateway_lines}"):
        return
    trace_id = gateway_lines[0]["trace_id"]
    spans = [s for s in receiver.spans if s["trace_id"] == trace_id]
    by_id = {s["span_id"]: s for s in spans}
    summary = "\n    ".join(f"{s['service']}: {s['name']} kind={s['kind']} parent={s['parent']}" for s in spans)
    print(f"  trace {trace_id}: {len(spans)} spans\n    {summary}")

    def one(service, name, kind=2):
        found = [s for s in spans if s["service"] == service and s["name"] == name and s["kind"] == kind]
        check(len(found) >= 1, f"no {service} span {name!r} (kind {kind}) in the trace")
        return found[0] if found else None

    gw = one("gateway", "POST /api/v1/orders/*")
    order = one("order", "POST /orders")
    if gw:
        check(gw["parent"] == "", f"the gateway span should be the root: parent {gw['parent']}")
        check(gw["span_id"] == gateway_lines[0]["span_id"], "the gateway log's span_id is not its span's")
        for key, want in (("http.request.method", "POST"), ("http.route", "/api/v1/orders/*"),
                          ("url.path", "/api/v1/orders"), ("http.response.status_code", 201)):
            check(gw["attrs"].get(key) == want, f"gateway span {key} = {gw['attrs'].get(key)!r}, want {want!r}")
    if order and gw:
        check(order["parent"] == gw["span_id"], "the order server span is not a child of the gateway span")
        check(order["attrs"].get("http.route") == "/orders" and order["attrs"].get("http.response.status_code") == 201,
              f"order span attributes: {order['attrs']}")
    # The reservation is the quote: placing an order reads no product before it.
    for service, name in (("product", "POST /reservations"), ("user", "GET /users/{id}")):
        server = one(service, name)
        if not (server and order):
            continue
        client = by_id.get(server["parent"])
        check(client is not None and client["service"] == "order" and client["kind"] == 3
              and client["parent"] == order["span_id"],
              f"{service} {name}: parent should be an order client span under the order server span, got {client}")
    check(all(s["trace_id"] == trace_id for s in spans) and {s["service"] for s in spans} >= set(SERVICES),
          f"services in the trace: {sorted({s['service'] for s in spans})}")

    for service in SERVICES:
        lines = [e for e in log_lines(stack.log(service)) if e.get("trace_id") == trace_id]
        completed = [e for e in lines if e.get("message") == "request completed"]
        check(bool(completed), f"{service}: no JSON request log line with trace_id {trace_id}")
        for e in completed[:1]:
            method = e.get("http.request.method")
            route = e.get("http.route")
            check(e.get("level") == "INFO" and method and route and isinstance(e.get("status"), int)
                  and isinstance(e.get("latency_ms"), (int, float)) and e.get("request_id") and e.get("span_id"),
                  f"{service}: request log line lacks method/route/status/latency/request id: {e}")
    print(f"  ok   {len(spans)} spans in one trace; trace id in the request log of {', '.join(SERVICES)}")

    codes = [s["attrs"].get("http.response.status_code") for s in receiver.spans]
    check(all(isinstance(c, int) for c in codes if c is not None),
          f"http.response.status_code must be an int attribute: {sorted({repr(c) for c in codes})[:10]}")
    errors = [s for s in receiver.spans if int(s["attrs"].get("http.response.status_code") or 0) >= 500]
    marked = [s for s in errors if s["status"] == 2]
    check(bool(errors) and len(marked) == len(errors),
          f"5xx spans should be marked as errors: {len(marked)} of {len(errors)}")
    check(any(s["service"] == "gateway" for s in marked) and any(s["service"] == "order" for s in marked),
          f"expected 5xx spans from the gateway and the order service: {[s['service'] for s in marked]}")
    print(f"  ok   {len(marked)} spans of 5xx answers marked as errors")


def check_cancel_trace(stack: Stack, receiver: Receiver, traced: dict) -> None:
    step("traces: one cancellation across gateway -> order -> RabbitMQ -> product -> RabbitMQ -> order")
    lines = [e for e in log_lines(stack.log("gateway")) if e.get("request_id") == traced["cancel_request_id"]]
    if not check(len(lines) == 1, f"expected one gateway log line for the cancellation: {lines}"):
        return
    trace_id = lines[0]["trace_id"]
    spans = [s for s in receiver.spans if s["trace_id"] == trace_id]
    summary = "\n    ".join(f"{s['service']}: {s['name']} kind={s['kind']} parent={s['parent']}" for s in spans)
    print(f"  trace {trace_id}: {len(spans)} spans\n    {summary}")
    by_id = {s["span_id"]: s for s in spans}

    def one(service, name, kind):
        found = [s for s in spans if s["service"] == service and s["name"] == name and s["kind"] == kind]
        check(len(found) == 1, f"expected one {service} span {name!r} (kind {kind}) in the trace, got {len(found)}")
        return found[0] if found else None

    cancel = one("order", "POST /orders/{id}/cancel", 2)
    release = one("product", "product.order-cancelled process", 5)
    recorded = one("order", "order.stock-released process", 5)
    if cancel and release:
        # The consumer continues the change's context, carried in the message headers.
        check(release["parent"] == cancel["span_id"],
              f"the stock release should be a child of the cancel span: parent {by_id.get(release['parent'])}")
    if release and recorded:
        check(recorded["parent"] == release["span_id"],
              "recording the returned stock should be a child of the release")
    print("  ok   the cancel, the stock release and its record are one trace")


def check_unsampled(stack: Stack, receiver: Receiver) -> None:
    step("sampling: OTEL_TRACES_SAMPLER=parentbased_traceidratio, ratio 0, on the gateway")
    lines = [e for e in log_lines(stack.log("gateway")) if e.get("request_id") == "obs-unsampled"]
    if not check(len(lines) == 1, f"one gateway log line for the unsampled request expected: {lines}"):
        return
    trace_id = lines[0]["trace_id"]
    logged = [s for s in SERVICES if any(e.get("trace_id") == trace_id for e in log_lines(stack.log(s)))]
    exported = [s["service"] for s in receiver.spans if s["trace_id"] == trace_id]
    check(set(logged) == set(SERVICES), f"the unsampled trace id should still be in every log: {logged}")
    check(not exported, f"an unsampled trace was exported by {exported}")
    print(f"  ok   trace {trace_id}: logged by all four, exported by none")


# ---------------------------------------------------------------------------------------


def main() -> int:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="shop-obs-"))
    boards = dashboards()
    check_dashboards(boards)
    rules = render_rules(work)
    check_compose_configs()
    queries = dashboard_queries(boards)

    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    rabbit_dir, amqp = subprocess.run([str(ROOT / "scripts" / "rabbitmq-node"), "start"], check=True,
                                      capture_output=True, text=True).stdout.split()
    stack = Stack(work, f"http://127.0.0.1:{receiver.server_address[1]}", amqp)
    prom = None
    try:
        step("the four binaries, Prometheus scraping them, traffic through the gateway")
        for service in SERVICES:
            stack.start(service)
        check_fresh_exports(stack, queries, rules)
        prom, prom_url = start_prometheus(work, stack)
        gateway = stack.url("gateway")
        traced = drive_traffic(gateway, "obs-trace-order")
        print(f"  ok   traffic driven; statuses seen: {traced['statuses']}")
        # Failures: the product service goes away; orders and product reads answer 503.
        stack.stop("product")
        five_xx = [http("POST", gateway + "/api/v1/orders", {"user_id": "obs-1", "products": ["2"]})[0],
                   http("GET", gateway + "/api/v1/products")[0]]
        check(all(s >= 500 for s in five_xx), f"expected 5xx while product is down, got {five_xx}")
        stack.start("product")
        drive_traffic(gateway, "obs-after-restart")
        print(f"  ok   5xx while product was down: {five_xx}; product restarted")
        # Two scrapes and a rule evaluation after the last request, so rates see it.
        wait_until("Prometheus to scrape every target", lambda: len(
            query(prom_url, 'up{job="shop"} == 1')[1]) == len(SERVICES), timeout=20)
        wait_until("recording rules", lambda: query(prom_url, "shop:sli_errors:ratio_rate5m")[1], timeout=20)
        time.sleep(3)
        evaluate(prom_url, queries, rules)
        # Sampling: a gateway sampling no new traces; the services follow its decision.
        stack.stop("gateway")
        stack.start("gateway", OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
        unsampled = http("POST", gateway + "/api/v1/orders", {"user_id": "obs-1", "products": ["2"]},
                         {"x-request-id": "obs-unsampled"})[0]
        check(unsampled == 201, f"order through the unsampling gateway: {unsampled}")
    finally:
        stack.stop_all()  # SIGTERM: every binary flushes its spans before exiting
        if prom:
            prom.terminate()
            try:
                prom.wait(timeout=10)
            except subprocess.TimeoutExpired:
                prom.kill()
        subprocess.run([str(ROOT / "scripts" / "rabbitmq-node"), "destroy", rabbit_dir], check=False)
    check_trace(stack, receiver, traced)
    check_cancel_trace(stack, receiver, traced)
    check_unsampled(stack, receiver)
    receiver.shutdown()

    print(f"\n{counts['checks']} observability checks, {len(failures)} failed "
          f"({time.monotonic() - started:.0f}s)")
    if failures:
        for f in failures:
            print(f"  FAIL {f}")
        print(f"logs of the binaries and Prometheus kept in {work}")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
