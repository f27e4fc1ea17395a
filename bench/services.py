#!/usr/bin/env python3
"""Service benchmark: the catalogue and checkout paths against the seed's Go services, one run.

Scenarios, each with wrk at fixed concurrency, `--reps` repetitions after a warm-up, medians:
  seed-list     wrk -> the seed's Go product service           GET /products
  seed-one      wrk -> the seed's Go product service           GET /product?id=1
  direct-list   wrk -> our product service (SQLite)            GET /products
  direct-one    wrk -> our product service                     GET /products/1
  gateway-list  wrk -> our gateway -> our product service      GET /api/v1/products
  gateway-one   wrk -> our gateway -> our product service      GET /api/v1/products/1
  nginx-list    wrk -> nginx -> our product service            GET /api/v1/products
  nginx-one     wrk -> nginx -> our product service            GET /api/v1/products/1
  orders-sqlite wrk -> gateway -> order (-> user, product)     POST /api/v1/orders, SQLite
  orders-pg     the same on PostgreSQL (scripts/pg-cluster's throwaway cluster)

Reads use `--connections` (64); orders `--order-connections` (32), each request an order of
its own (a fresh Idempotency-Key) by one logged-in customer for one unit of a product whose
stock never runs out. After each order run the databases are read: the stock gap, units
taken from stock minus units in stored orders, must be 0 (no unit sold twice or held by an
order that was never stored).

For each: requests/s, p50, p99, non-2xx, CPU time per request of the measured processes
(the service; the gateway and the service; for orders all four, RabbitMQ, and on
PostgreSQL the database server's processes), their thread switches per request and their
peak RSS; the idle RSS of each service before any load; then the ratios against the targets of
docs/BENCHMARKS.md. Loopback only; every run is bounded by `--duration`.

Run through bench/services.sh, which installs wrk, nginx and Go and builds the binaries.
"""

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gateway as bench  # noqa: E402  (the shared wrk, process and seed helpers)

ROOT = bench.ROOT
SERVICES = ("product", "user", "order", "gateway")
IDLE = ("idle", "idle_anon")  # keys of results that are not scenarios

# One order per request: every Idempotency-Key unique. A kernel UUID per wrk thread and
# invocation, then a counter: keys repeated by a later run would be answered from the
# stored response (idempotent replays, no stock taken) and inflate the figures.
ORDER_LUA = """
function init(args)
  n = 0
  local f = io.open("/proc/sys/kernel/random/uuid")
  prefix = "bench-%(run)s-" .. f:read("*l") .. "-"
  f:close()
end
function request()
  n = n + 1
  return wrk.format("POST", "/api/v1/orders", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer %(token)s",
    ["Idempotency-Key"] = prefix .. n,
  }, '{"products": ["%(product)s"]}')
end
"""


def http(method, url, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


class Stack:
    """Our four binaries on loopback (or just the product service), each on its own port."""

    def __init__(self, args, work, database_urls=None, broker=False, pg_dir=None):
        self.args, self.work, self.pg_dir = args, work, pg_dir
        self.svc = bench.Services()
        self.ports = {s: bench.free_port() for s in SERVICES}
        self.pids = {}
        self.data = {}
        self.database_urls = database_urls or {}
        # Events go through a private RabbitMQ node, as deployed (bench/services.sh
        # installs rabbitmq-server); its CPU counts in each order's cost.
        self.rabbit_dir, self.amqp_url = None, None
        if broker:
            self.rabbit_dir, self.amqp_url = subprocess.run(
                [os.path.join(ROOT, "scripts", "rabbitmq-node"), "start"], check=True, capture_output=True,
                text=True).stdout.split()
        key = subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519"], check=True,
                             capture_output=True).stdout
        self.private = key.decode()
        self.public = subprocess.run(["openssl", "pkey", "-pubout"], input=key, check=True,
                                     capture_output=True).stdout.decode()
        self.admin_password = os.urandom(12).hex()
        self.password_file = os.path.join(work, "admin-password")
        with open(self.password_file, "w") as f:
            f.write(self.admin_password)

    def url(self, service):
        return f"http://127.0.0.1:{self.ports[service]}"

    def start(self, service, **extra):
        data = self.data[service] = tempfile.mkdtemp(dir=self.work, prefix=f"{service}-")
        env = {
            "HOST": "127.0.0.1", "PORT": str(self.ports[service]), "DATA_DIR": data,
            "RUST_LOG": "warn", "SHUTDOWN_DELAY": "0s", "ACCESS_LOG": "false",
            "PRODUCT_URL": self.url("product"), "USER_URL": self.url("user"), "ORDER_URL": self.url("order"),
            "JWT_PUBLIC_KEY": self.public, **extra,
        }
        if self.amqp_url:
            env["AMQP_URL"] = self.amqp_url
        if service in self.database_urls:
            env["DATABASE_URL"] = self.database_urls[service]
        proc = self.svc.start([os.path.join(self.args.target_dir, "release", service)], env=env)
        bench.wait_ready(f"{self.url(service)}/ready", timeout=60)
        self.pids[service] = proc.pid
        return proc

    def start_all(self):
        self.start("product")
        self.start("user", JWT_PRIVATE_KEY=self.private, ADMIN_EMAIL="admin@shop.local",
                   ADMIN_PASSWORD_FILE=self.password_file)
        self.start("order")
        self.start("gateway", GATEWAY_WORKERS="2")

    def idle_rss(self, field="VmRSS"):
        time.sleep(1)
        return {s: bench.rss_kib(bench.tree(pid), field) / 1024 for s, pid in self.pids.items()}

    def count_servers(self):
        """From now on the broker's CPU and memory, and PostgreSQL's CPU (the server and
        the backends serving the pools), count with the services'."""
        if self.rabbit_dir:
            with open(os.path.join(self.rabbit_dir, "pid")) as f:
                self.pids["rabbitmq"] = int(f.read())
        if self.pg_dir:
            with open(os.path.join(self.pg_dir, "data", "postmaster.pid")) as f:
                self.pids["postgres"] = int(f.readline())

    def stop(self):
        self.svc.stop()
        if self.rabbit_dir:
            subprocess.run([os.path.join(ROOT, "scripts", "rabbitmq-node"), "destroy", self.rabbit_dir],
                           capture_output=True)


def measure(url, args, measured, script=None, connections=None):
    subprocess.run(["wrk", "-t2", f"-c{connections or args.connections}", "-d2s",
                    *(["-s", script] if script else []), url], capture_output=True)
    return [bench.run_wrk(url, args, None, None, script=script, connections=connections, measured=measured)
            for _ in range(args.reps)]


def reads(args, work, results):
    # The seed's Go product service (in memory) on its hard-coded :8081.
    if "seed" in args.groups:
        svc = bench.Services()
        proc = svc.start([os.path.join(work, "seed-product")])
        try:
            bench.wait_port(8081)
            time.sleep(1)
            results["idle"]["seed-product"] = bench.rss_kib([proc.pid]) / 1024
            results["idle_anon"]["seed-product"] = bench.rss_kib([proc.pid], "RssAnon") / 1024
            results["seed-list"] = measure("http://127.0.0.1:8081/products", args, {"product": proc.pid})
            results["seed-one"] = measure("http://127.0.0.1:8081/product?id=1", args, {"product": proc.pid})
        finally:
            svc.stop()
    stack = Stack(args, work)
    try:
        stack.start("product")
        stack.start("gateway", GATEWAY_WORKERS="2")
        results["idle"].update({s: v for s, v in stack.idle_rss().items()})
        results["idle_anon"].update({s: v for s, v in stack.idle_rss("RssAnon").items()})
        product = {"product": stack.pids["product"]}
        both = {"gateway": stack.pids["gateway"], "product": stack.pids["product"]}
        if "direct" in args.groups:
            results["direct-list"] = measure(f"{stack.url('product')}/products", args, product)
            results["direct-one"] = measure(f"{stack.url('product')}/products/1", args, product)
        if "gateway" in args.groups:
            results["gateway-list"] = measure(f"{stack.url('gateway')}/api/v1/products", args, both)
            results["gateway-one"] = measure(f"{stack.url('gateway')}/api/v1/products/1", args, both)
        if "nginx" in args.groups:
            conf_dir = tempfile.mkdtemp(dir=work)
            port = bench.free_port()
            with open(os.path.join(conf_dir, "nginx.conf"), "w") as f:
                f.write(bench.NGINX_CONF.format(workers=2, dir=conf_dir, upstream_port=stack.ports["product"],
                                               port=port, location="/api/v1/", target=""))
            nginx = stack.svc.start(["nginx", "-c", os.path.join(conf_dir, "nginx.conf"), "-g", "daemon off;"])
            bench.wait_port(port)
            both = {"nginx": nginx.pid, "product": stack.pids["product"]}
            results["nginx-list"] = measure(f"http://127.0.0.1:{port}/api/v1/products", args, both)
            results["nginx-one"] = measure(f"http://127.0.0.1:{port}/api/v1/products/1", args, both)
    finally:
        stack.stop()


def orders(args, work, results, backend, database_urls=None, pg_dir=None):
    stack = Stack(args, work, database_urls, broker=True, pg_dir=pg_dir)
    try:
        stack.start_all()
        results["idle"].update({f"{s} ({backend})": v for s, v in stack.idle_rss().items()})
        results["idle_anon"].update({f"{s} ({backend})": v for s, v in stack.idle_rss("RssAnon").items()})
        stack.count_servers()
        gw = stack.url("gateway")
        admin = http("POST", f"{gw}/api/v1/auth/login", {"email": "admin@shop.local", "password": stack.admin_password})
        stock = 1_000_000_000
        product = http("POST", f"{gw}/api/v1/products", {"name": "Bench", "price": 1.25, "quantity": stock},
                       token=admin["access_token"])["id"]
        email, password = f"bench-{os.urandom(4).hex()}@shop.local", os.urandom(12).hex()
        http("POST", f"{gw}/api/v1/users", {"name": "Bench Customer", "email": email, "password": password})
        token = http("POST", f"{gw}/api/v1/auth/login", {"email": email, "password": password})["access_token"]
        script = os.path.join(work, f"orders-{backend}.lua")
        with open(script, "w") as f:
            f.write(ORDER_LUA % {"run": os.urandom(4).hex(), "token": token, "product": product})
        runs = measure(f"{gw}/api/v1/orders", args, dict(stack.pids), script=script,
                       connections=args.order_connections)
        # Orders are accepted while the broker is away (the outbox keeps their events), so
        # a node that died or never started would leave every event's cost out unnoticed.
        idle_broker = [r["rps"] for r in runs if r.get("cpu_by", {}).get("rabbitmq", 0) == 0]
        if idle_broker:
            raise SystemExit(f"{backend}: RabbitMQ used no CPU during the order load "
                             f"({len(idle_broker)} of {len(runs)} runs): the broker was not running")
        # Units taken from stock against units in stored orders (the warm-up's included),
        # once the orders wrk left in flight have finished: two equal readings a second
        # apart. Stock from the product service itself (the gateway may answer from cache).
        previous, deadline = None, time.time() + 30
        while True:
            left = http("GET", f"{stack.url('product')}/products/{product}")["quantity"]
            reading = (stock - left, stored_units(backend, stack, product, database_urls))
            if reading == previous or time.time() > deadline:
                break
            previous = reading
            time.sleep(1)
        taken, stored = reading
        for r in runs:
            r["stock_gap"] = taken - stored
        results[f"orders-{backend}"] = runs
        measured = sum(r["requests"] for r in runs)
        print(f"  {backend}: {stored} units in stored orders, {taken} taken from stock; "
              f"{measured} measured requests (one unit each, plus the warm-up's)", flush=True)
        if stored < measured:
            raise SystemExit(f"{backend}: fewer orders stored than requests measured: replays were counted")
    finally:
        stack.stop()


def stored_units(backend, stack, product, database_urls):
    sql = "SELECT COALESCE(SUM(quantity), 0) FROM order_items WHERE product_id = '%s'" % product
    if backend == "sqlite":
        with sqlite3.connect(os.path.join(stack.data["order"], "order.db")) as db:
            return db.execute(sql).fetchone()[0]
    out = subprocess.run(["psql", "-At", database_urls["order"], "-c", sql], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip())


def pg_databases(work):
    """scripts/pg-cluster's throwaway cluster with one database per service."""
    out = subprocess.run([os.path.join(ROOT, "scripts", "pg-cluster"), "start"], check=True,
                         capture_output=True, text=True).stdout.split()
    pg_dir, admin_url = out[0], out[1]
    urls = {}
    base = admin_url.rsplit("/", 1)[0]
    for service in ("product", "order", "user"):
        name = f"bench_{service}_{os.urandom(3).hex()}"
        subprocess.run(["psql", "-q", admin_url, "-c", f"CREATE DATABASE {name}"], check=True, capture_output=True)
        urls[service] = f"{base}/{name}"
    return pg_dir, urls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64, help="for the reads")
    parser.add_argument("--order-connections", type=int, default=32)
    parser.add_argument("--groups", default="seed,direct,gateway,nginx,sqlite,pg",
                        help="which scenario groups to run (comma-separated)")
    parser.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")))
    args = parser.parse_args()
    args.groups = set(args.groups.split(","))
    for tool in ("wrk", "nginx", "go", "openssl", "psql"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (bench/services.sh installs it)")
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8081)) == 0:
            sys.exit("port 8081 is in use; the seed's product service needs it")

    work = tempfile.mkdtemp(prefix="services-bench-")
    results = {"idle": {}, "idle_anon": {}}
    pg_dir = None
    try:
        if "seed" in args.groups:
            bench.build_seed(work)
        reads(args, work, results)
        if "sqlite" in args.groups:
            orders(args, work, results, "sqlite")
        if "pg" in args.groups:
            pg_dir, urls = pg_databases(work)
            orders(args, work, results, "pg", urls, pg_dir)
    finally:
        if pg_dir:
            subprocess.run([os.path.join(ROOT, "scripts", "pg-cluster"), "destroy", pg_dir], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    report(args, results)


def report(args, results):
    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    print(f"\nmedians of {args.reps} runs of {args.duration}s; reads at {args.connections} connections, "
          f"orders at {args.order_connections}")
    print(f"{'scenario':14} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>8} {'CPU us/req':>11}  peak RSS MiB")
    for name, runs in results.items():
        if name in IDLE:
            continue
        # Not PostgreSQL's: its shared buffers would count once per backend.
        rss = ", ".join(f"{k} {v:.1f}" for k, v in runs[len(runs) // 2]["rss_by"].items() if k != "postgres")
        extra = f"  stock gap {runs[0]['stock_gap']}" if "stock_gap" in runs[0] else ""
        print(f"{name:14} {med(runs, 'rps'):9.0f} {med(runs, 'p50'):7.2f} {med(runs, 'p99'):7.2f} "
              f"{sum(r['non2xx'] for r in runs):8} {med(runs, 'cpu_us'):11.1f}  {rss}{extra}")
    print("\nreq/s of each run, in order: " + "; ".join(
        f"{name} " + "/".join(f"{r['rps']:.0f}" for r in runs) for name, runs in results.items() if name not in IDLE))
    for name, runs in results.items():
        if name not in IDLE:
            for r in runs:
                print("   ", name, f"{r['rps']:.0f}", {k: round(v) for k, v in r.get("cpu_by", {}).items()}, r["p50"], r["p99"])
    print("\nCPU us/req by process (medians):")
    for name, runs in results.items():
        if name not in IDLE and len(runs[0].get("cpu_by", {})) > 1:
            by = ", ".join(f"{k} {statistics.median(r['cpu_by'][k] for r in runs):.1f}" for k in runs[0]["cpu_by"])
            print(f"  {name:14} {by}")
    print("\nthread switches per request by process (medians; sleeps and preemptions, each kernel work):")
    for name, runs in results.items():
        if name not in IDLE and len(runs[0].get("switches_by", {})) > 1:
            by = ", ".join(f"{k} {statistics.median(r['switches_by'][k] for r in runs):.2f}"
                           for k in runs[0]["switches_by"])
            print(f"  {name:14} {by}")
    print("\nidle RSS MiB (of which anonymous; the rest is the binary's own file pages, shared and reclaimable): "
          + ", ".join(f"{k} {v:.1f} ({results['idle_anon'].get(k, 0):.1f})" for k, v in results["idle"].items()))
    ran = [s for s in SERVICES if any(k.split(" ")[0] == s for k in results["idle"])]
    bench.report_order_files(os.path.join(args.target_dir, "release"), ran)

    def ratio(a, b, what="rps"):
        if a in results and b in results:
            return med(results[a], what) / med(results[b], what)
        return None

    print("\nagainst the targets (docs/BENCHMARKS.md):")
    rows = [
        ("catalogue list, direct / seed", ratio("direct-list", "seed-list"), ">= 1.5x"),
        ("single product, direct / seed", ratio("direct-one", "seed-one"), ">= 1.5x"),
        ("catalogue list, gateway / nginx", ratio("gateway-list", "nginx-list"), ">= 0.9x"),
        ("single product, gateway / nginx", ratio("gateway-one", "nginx-one"), ">= 0.9x"),
    ]
    for label, value, target in rows:
        if value is not None:
            print(f"  {label:34} {value:5.2f}x   target {target}")
    for backend, floor in (("sqlite", 5000), ("pg", 3000)):
        runs = results.get(f"orders-{backend}")
        if runs:
            print(f"  orders/s through the gateway, {backend:6} {med(runs, 'rps'):7.0f}    target >= {floor}, "
                  f"p99 {med(runs, 'p99'):.1f} ms (target < 20), non-2xx {sum(r['non2xx'] for r in runs)}, "
                  f"stock gap {runs[0]['stock_gap']}")


if __name__ == "__main__":
    main()
