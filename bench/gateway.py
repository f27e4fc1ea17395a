#!/usr/bin/env python3
"""Gateway benchmark: our gateway against nginx and the seed's Go gateway, one run.

Scenarios, each at fixed concurrency with wrk, `--reps` repetitions, medians reported:
  direct  wrk -> upstream                             GET /products
  ours    wrk -> our gateway -> upstream              GET /api/products
  nginx   wrk -> nginx (same job) -> upstream         GET /api/products
  seed    wrk -> seed Go gateway -> upstream          GET /api/products
  base    wrk -> `--base-gateway` -> upstream         GET /api/products (an A/B of a change:
          the same job as ours, another build of it)

Every proxy fronts the same upstream, so the differences are the proxies': by default the
seed's Go product service (in memory, cheap, the service the seed's gateway was written
for); `--upstream shop` uses our product service instead (SQLite on every request).

Modes: `shared` (everything on both cores) and `pinned` (proxy on CPU 0, load generator on
CPU 1, upstream unpinned). The proxies of one mode run side by side in front of one upstream,
and their repetitions alternate (ours, nginx, seed, ours, nginx, seed, ...), so a slow
minute on this noisy machine lands on each of them, not on whichever ran last; each ratio
is also given as the median of the per-repetition ratios. For each proxy: requests/s, p50, p99, peak RSS of the proxy's
processes, and CPU time per request (user+system of the proxy's processes / requests).
Loopback only; every run is bounded by `--duration`.

Run through bench/gateway.sh, which installs nginx, wrk and Go and builds the binaries.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICKS = os.sysconf("SC_CLK_TCK")


_handed_out = set()


def free_port():
    """A port free now and not handed out before by this run: the kernel may offer a
    port again once its probe socket is closed, and two servers told the same port
    leave one answering for both (the likely cause of one run's 404 on the login
    through the gateway, not reproduced)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_ready(url, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} never answered 200")


def tree(pid):
    """pid and all its descendants."""
    pids, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        pids += kids
        frontier += kids
    return pids


def cpu_ticks(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total


def thread_switches(pids):
    """Context switches (voluntary and involuntary) summed over every thread of `pids`:
    each is a sleep or a preemption, kernel work on top of the request's own. Threads that
    exit meanwhile take theirs with them, so a count over a window is a floor."""
    total = 0
    for p in pids:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                            total += int(line.split()[1])
            except OSError:
                pass
    return total


def rss_kib(pids, field="VmRSS"):
    """Resident memory summed over `pids`; `field` RssAnon counts only the processes' own
    anonymous memory, without the (shared, reclaimable) pages of their binaries."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def order_file_staleness(binary, name):
    """(missing, named): the Rust functions link/symbol-order/<name>.txt names that `binary`
    does not define. LTO numbers some names (`.12345`), so any code change after the file
    was recorded leaves some out, and those functions are then linked outside the packed
    start-up stretch: with 271-705 missing, each service idled 2-2.5 MiB higher
    (docs/BENCHMARKS.md, session 22). None when the binary has no symbol table."""
    with open(os.path.join(ROOT, "link", "symbol-order", f"{name}.txt")) as f:
        named = {line.strip() for line in f if line.startswith(("_ZN", "_R"))}
    listed = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True)
    defined = {line.split()[-1] for line in listed.stdout.splitlines() if line.strip()}
    if listed.returncode != 0 or not defined:
        return None
    return len(named - defined), len(named)


def report_order_files(release_dir, names):
    """Prints, under a benchmark's RSS figures, how fresh each binary's order file is."""
    staleness = {n: order_file_staleness(os.path.join(release_dir, n), n) for n in names}
    print("order files (link/symbol-order), names the binary lacks: " + ", ".join(
        f"{n} {'unknown (no symbols)' if st is None else f'{st[0]} of {st[1]}'}" for n, st in staleness.items()))
    if any(st and st[0] for st in staleness.values()):
        print("  STALE: the RSS figures above are inflated; re-record (scripts/symbol-order) and rebuild")


def parse_wrk(text):
    def latency_ms(pct):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    return {
        "rps": rps,
        "requests": requests,
        "p50": latency_ms(50),
        "p99": latency_ms(99),
        "non2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def run_wrk(url, args, cpu, proxy_pid, script=None, connections=None, measured=None):
    """One wrk run. CPU per request and peak RSS are summed over `proxy_pid`'s process tree,
    or over each process of `measured` (name -> pid), reported per name in `cpu_by`,
    `rss_by` and `switches_by` (thread switches per request)."""
    cmd = ["wrk", "-t2", f"-c{connections or args.connections}", f"-d{args.duration}s", "--latency"]
    if script:
        cmd += ["-s", script]
    cmd.append(url)
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    groups = {name: tree(pid) for name, pid in (measured or ({"proxy": proxy_pid} if proxy_pid else {})).items()}
    pids = [p for group in groups.values() for p in group]
    before = cpu_ticks(pids)
    before_by = {name: cpu_ticks(group) for name, group in groups.items()}
    switches_before = {name: thread_switches(group) for name, group in groups.items()}
    peaks = {name: rss_kib(group) for name, group in groups.items()}
    peak = rss_kib(pids)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    while proc.poll() is None:
        time.sleep(0.25)
        peak = max(peak, rss_kib(pids))
        for name, group in groups.items():
            peaks[name] = max(peaks[name], rss_kib(group))
    out = proc.stdout.read()
    result = parse_wrk(out)
    if pids:
        ticks = cpu_ticks(pids) - before
        result["cpu_us"] = ticks / TICKS * 1e6 / max(result["requests"], 1)
        result["rss_mib"] = peak / 1024
        result["rss_by"] = {name: kib / 1024 for name, kib in peaks.items()}
        result["cpu_by"] = {name: (cpu_ticks(group) - before_by[name]) / TICKS * 1e6 / max(result["requests"], 1)
                            for name, group in groups.items()}
        result["switches_by"] = {name: (thread_switches(group) - switches_before[name]) / max(result["requests"], 1)
                                 for name, group in groups.items()}
    return result


class Services:
    """Processes started for a scenario, stopped on exit."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, env=None, cpu=None, cwd=None):
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu)] + cmd
        full_env = dict(os.environ, **(env or {}))
        p = subprocess.Popen(cmd, env=full_env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()


NGINX_CONF = """
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    upstream product {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location {location} {{
            proxy_pass http://product/{target};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def start_upstream(svc, args, work, cpu):
    """The upstream every proxy fronts. The seed's gateway hard-codes :8081."""
    if args.upstream == "seed":
        svc.start([os.path.join(work, "seed-product")], cpu=cpu)
        wait_port(8081)
        return 8081
    port = 8081
    data = tempfile.mkdtemp(dir=work)
    svc.start([args.product], env={
        "PORT": str(port), "HOST": "127.0.0.1", "DATA_DIR": data,
        "RUST_LOG": "warn", "SHUTDOWN_DELAY": "0s",
    }, cpu=cpu)
    wait_ready(f"http://127.0.0.1:{port}/ready")
    return port


def start_proxy(svc, name, mode, args, work, product_port):
    """Starts proxy `name` in front of `product_port`; returns (url, pid of the measured process)."""
    proxy_cpu = 0 if mode == "pinned" else None
    workers = "1" if mode == "pinned" else "2"
    if name == "seed":
        proxy = svc.start([os.path.join(work, "seed-gateway")], cpu=proxy_cpu)
        wait_port(8080)
        return "http://127.0.0.1:8080/api/products", proxy.pid
    port = free_port()
    if name in ("ours", "base"):
        # Authentication on, as deployed: /api/products is a public route, so no token is
        # checked, but the access step runs; the verifier needs a key to be ready.
        key = subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519"], check=True,
                             capture_output=True).stdout
        public = subprocess.run(["openssl", "pkey", "-pubout"], input=key, check=True,
                                capture_output=True).stdout.decode()
        proxy = svc.start([args.gateway if name == "ours" else args.base_gateway], env={
            "PORT": str(port), "HOST": "127.0.0.1", "PRODUCT_URL": f"http://127.0.0.1:{product_port}",
            "GATEWAY_WORKERS": workers, "ACCESS_LOG": "false", "RUST_LOG": "warn", "SHUTDOWN_DELAY": "0s",
            "JWT_PUBLIC_KEY": public,
        }, cpu=proxy_cpu)
        wait_ready(f"http://127.0.0.1:{port}/ready")
    else:
        conf_dir = tempfile.mkdtemp(dir=work)
        conf = os.path.join(conf_dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(workers=workers, dir=conf_dir, upstream_port=product_port, port=port,
                                      location="= /api/products", target="products"))
        proxy = svc.start(["nginx", "-c", conf, "-g", "daemon off;"], cpu=proxy_cpu)
        wait_port(port)
    return f"http://127.0.0.1:{port}/api/products", proxy.pid


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def build_seed(work):
    """The seed's product service and gateway, compiled from the blog post's code blocks."""
    seed = sorted(p for p in os.listdir(os.path.join(ROOT, "..", "shared", "seeds")) if p.startswith("000_"))
    if not seed:
        raise RuntimeError("seed text not found in ../shared/seeds")
    text = open(os.path.join(ROOT, "..", "shared", "seeds", seed[0])).read()
    blocks = re.findall(r"```go\n(.*?)```", text, re.S)
    sources = {}
    for block in blocks:
        first = block.lstrip().splitlines()[0]
        for name in ("product", "gateway"):
            if first.strip() == f"// {name}/main.go":
                sources[name] = block
    for name, source in sources.items():
        d = os.path.join(work, f"seed-src-{name}")
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, "main.go"), "w").write(source)
        open(os.path.join(d, "go.mod"), "w").write(f"module seed/{name}\n\ngo 1.19\n")
        subprocess.run(["go", "build", "-o", os.path.join(work, f"seed-{name}"), "."], cwd=d, check=True,
                       env=dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod"))
    if set(sources) != {"product", "gateway"}:
        raise RuntimeError(f"seed code blocks not found (got {sorted(sources)})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--modes", default="shared,pinned")
    parser.add_argument("--scenarios", default="direct,ours,nginx,seed")
    parser.add_argument("--upstream", choices=["seed", "shop"], default="seed")
    parser.add_argument("--base-gateway", help="another gateway binary, run as scenario `base` (an A/B of a change)")
    parser.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")))
    args = parser.parse_args()
    args.product = os.path.join(args.target_dir, "release", "product")
    args.gateway = os.path.join(args.target_dir, "release", "gateway")
    if "base" in args.scenarios.split(",") and not args.base_gateway:
        sys.exit("scenario base needs --base-gateway")
    for tool in ("wrk", "nginx", "go", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (bench/gateway.sh installs it)")

    work = tempfile.mkdtemp(prefix="gateway-bench-")
    scenarios = args.scenarios.split(",")
    build_seed(work)
    for port in (8080, 8081):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                sys.exit(f"port {port} is in use; the seed's services need it")
    results = {}
    try:
        for mode in args.modes.split(","):
            wrk_cpu = 1 if mode == "pinned" else None
            groups = [["direct"]] if "direct" in scenarios else []
            proxies = [name for name in scenarios if name != "direct"]
            if proxies:
                groups.append(proxies)
            for group in groups:
                svc = Services()
                try:
                    # The upstream is pinned with the proxy only when it is what is measured.
                    upstream_cpu = 0 if mode == "pinned" and group == ["direct"] else None
                    product_port = start_upstream(svc, args, work, upstream_cpu)
                    targets = {}
                    for name in group:
                        if name == "direct":
                            targets[name] = (f"http://127.0.0.1:{product_port}/products", svc.procs[-1].pid)
                        else:
                            targets[name] = start_proxy(svc, name, mode, args, work, product_port)
                    for url, _ in targets.values():
                        # Warm-up: fill connection pools and caches.
                        subprocess.run(["wrk", "-t2", f"-c{args.connections}", "-d2s", url], capture_output=True)
                    runs = {name: [] for name in group}
                    for _ in range(args.reps):
                        for name, (url, pid) in targets.items():
                            runs[name].append(run_wrk(url, args, wrk_cpu, pid))
                finally:
                    svc.stop()
                for name in group:
                    results[(mode, name)] = runs[name]
                    med = lambda k: statistics.median(r[k] for r in runs[name])
                    errors = sum(r["non2xx"] for r in runs[name])
                    print(f"[{mode:6}] {name:6} rps {med('rps'):9.0f}  p50 {med('p50'):6.2f} ms  p99 {med('p99'):6.2f} ms"
                          f"  cpu {med('cpu_us'):5.1f} us/req  rss {med('rss_mib'):5.1f} MiB"
                          f"  non-2xx {errors}  {runs[name][0]['socket_errors']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmedians of {args.reps} runs, {args.connections} connections, {args.duration}s each, upstream: {args.upstream}")
    print(f"{'mode':7} {'proxy':6} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>11} {'peak RSS MiB':>13}")
    for (mode, name), runs in results.items():
        med = lambda k: statistics.median(r[k] for r in runs)
        print(f"{mode:7} {name:6} {med('rps'):9.0f} {med('p50'):7.2f} {med('p99'):7.2f} {med('cpu_us'):11.1f} {med('rss_mib'):13.1f}")
    print("\nratios (ours / other):")
    for mode in args.modes.split(","):
        ours = results.get((mode, "ours"))
        if not ours:
            continue
        med = lambda runs, k: statistics.median(r[k] for r in runs)
        for other in ("nginx", "seed", "direct", "base"):
            if (mode, other) in results:
                o = results[(mode, other)]
                print(f"  {mode:7} vs {other:6}: throughput {med(ours, 'rps') / med(o, 'rps'):.2f}x, "
                      f"p99 {med(ours, 'p99') / med(o, 'p99'):.2f}x"
                      + (f", CPU/req {med(ours, 'cpu_us') / med(o, 'cpu_us'):.2f}x" if other != "direct" else ""))
                if other != "direct":
                    # Repetition i of each proxy ran back to back: their ratio is the least
                    # disturbed by the machine's drift.
                    paired = lambda k: [a[k] / b[k] for a, b in zip(ours, o)]
                    spread = lambda k: f"{statistics.median(paired(k)):.2f}x ({min(paired(k)):.2f}-{max(paired(k)):.2f})"
                    print(f"  {'':7}    {'':6}  paired: throughput {spread('rps')}, p99 {spread('p99')}, "
                          f"CPU/req {spread('cpu_us')}")


if __name__ == "__main__":
    main()
