#!/usr/bin/env python3
"""Startup time to ready and idle memory of each release binary.

Starts every binary several times on a fresh data directory, measures the time from
exec until GET /ready answers 200, then the resident memory after a short idle period
(and after a burst of requests), and prints medians. Loopback only; bounded in time.

    cargo build --release --locked --workspace --bin gateway --bin product --bin order --bin user
    python3 bench/footprint.py [--runs 5]
"""

import argparse
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gateway import report_order_files  # noqa: E402  (shared with bench/services.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(port, path, method="GET", body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        headers = {"Content-Type": "application/json"} if body else {}
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def text_mib(binary):
    """Size of the executable's code (`.text`), what its resident file pages come from."""
    out = subprocess.run(["size", "-A", binary], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[1]) for line in out.splitlines() if line.startswith(".text ")) / 2**20


def measure(binary, runs, peers):
    ready_ms, idle_rss, idle_anon, busy_rss = [], [], [], []
    for _ in range(runs):
        port = free_port()
        with tempfile.TemporaryDirectory() as data:
            env = {"PORT": str(port), "HOST": "127.0.0.1", "DATA_DIR": data,
                   "SHUTDOWN_DELAY": "0s", "RUST_LOG": "warn", **peers}
            started = time.perf_counter()
            proc = subprocess.Popen([os.path.join(BIN, binary)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = started + 10
                while status(port, "/ready") != 200:
                    if time.perf_counter() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"{binary} never became ready")
                    time.sleep(0.002)
                ready_ms.append((time.perf_counter() - started) * 1000)
                time.sleep(1.0)
                idle_rss.append(rss_kib(proc.pid))
                idle_anon.append(rss_kib(proc.pid, "RssAnon"))
                path = {"product": "/products", "user": "/users/1", "order": "/orders",
                        "gateway": "/api/products"}[binary]
                for _ in range(500):
                    status(port, path)
                busy_rss.append(rss_kib(proc.pid))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    return ready_ms, idle_rss, idle_anon, busy_rss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    # Readiness includes peers: every service needs the user service's signing keys, the
    # order service also the product service. Give them live ones.
    with tempfile.TemporaryDirectory() as data:
        pp, up = free_port(), free_port()
        keys = {"JWT_JWKS_URL": f"http://127.0.0.1:{up}/.well-known/jwks.json"}
        peers = []
        for binary, port in (("user", up), ("product", pp)):
            peers.append(subprocess.Popen(
                [os.path.join(BIN, binary)],
                env={"PORT": str(port), "HOST": "127.0.0.1", "DATA_DIR": data, "RUST_LOG": "warn",
                     "SHUTDOWN_DELAY": "0s", **keys},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        try:
            for port in (pp, up):
                deadline = time.time() + 10
                while status(port, "/ready") != 200:
                    if time.time() > deadline:
                        raise RuntimeError("peers did not start")
                    time.sleep(0.01)
            order_peers = {"PRODUCT_URL": f"http://127.0.0.1:{pp}", "USER_URL": f"http://127.0.0.1:{up}", **keys}
            gateway_peers = {"PRODUCT_URL": f"http://127.0.0.1:{pp}", "USER_URL": f"http://127.0.0.1:{up}",
                             "ORDER_URL": f"http://127.0.0.1:{up}", **keys}
            print(f"{'binary':8} {'text MiB':>9} {'ready ms (median)':>18} {'idle RSS MiB':>13} {'of it anon':>11}"
                  f" {'RSS after 500 req':>18}   runs={args.runs}")
            for binary in ("product", "order", "user", "gateway"):
                peers_env = {"order": order_peers, "gateway": gateway_peers}.get(
                    binary, keys)
                ready, idle, anon, busy = measure(binary, args.runs, peers_env)
                print(f"{binary:8} {text_mib(os.path.join(BIN, binary)):9.1f} {statistics.median(ready):18.1f} "
                      f"{statistics.median(idle) / 1024:13.1f} {statistics.median(anon) / 1024:11.1f}"
                      f" {statistics.median(busy) / 1024:18.1f}"
                      f"   (ready min {min(ready):.1f}, max {max(ready):.1f})")
            report_order_files(BIN, ("product", "order", "user", "gateway"))
        finally:
            for proc in peers:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
