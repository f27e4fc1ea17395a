#!/usr/bin/env python3
"""Pictures of what an operator sees, for docs/pictures/ (run by scripts/draw-pictures).

Starts the four binaries and Prometheus as observability/check.py does, drives traffic
through the gateway for a few minutes (the product service is stopped for a while in the
middle, so errors, ejections and the breaker show), then asks Prometheus for every panel's
queries over that window and draws each dashboard's panels where its grid puts them.

These are matplotlib drawings of the dashboards' own PromQL against a real Prometheus, not
Grafana screenshots: Grafana is not available here. Also draws the request flow of one
order (docs/pictures/order-flow.png).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

import check  # noqa: E402  (observability/check.py: the stack, Prometheus and the traffic)

OUT = check.ROOT / "docs" / "pictures"
UNITS = {"reqps": "req/s", "ops": "ops/s", "s": "s", "percentunit": "%", "bytes": "MiB", "short": ""}


def drive(gateway: str, stack: check.Stack, seconds: float, outage: tuple[float, float]) -> None:
    """Traffic for `seconds`; the product service is down during `outage` (offsets)."""
    started = time.monotonic()
    stopped = False
    n = 0
    while (elapsed := time.monotonic() - started) < seconds:
        if outage[0] <= elapsed < outage[1] and not stopped:
            stack.stop("product")
            stopped = True
        if elapsed >= outage[1] and stopped:
            stack.start("product")
            stopped = False
        if stopped:
            check.http("POST", gateway + "/api/v1/orders", {"user_id": "obs-1", "products": ["2"]})
            check.http("GET", gateway + "/api/v1/products")
            time.sleep(0.05)
        else:
            check.drive_traffic(gateway, f"pictures-{n}")
        n += 1


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = {"query": check.substitute(expr), "start": start, "end": end, "step": step}
    status, _, body = check.http("GET", prom + "/api/v1/query_range?" + urllib.parse.urlencode(params))
    payload = json.loads(body or b"{}")
    if status != 200 or payload.get("status") != "success":
        raise RuntimeError(f"{expr}: {payload.get('error', status)}")
    return payload["data"]["result"]


def legend(fmt: str, labels: dict) -> str:
    out = fmt
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out if "{{" not in out else fmt


def scale(unit: str, value: float) -> float:
    return value * 100 if unit == "percentunit" else value / 2**20 if unit == "bytes" else value


def draw_board(name: str, board: dict, prom: str, start: float, end: float) -> Path:
    panels = board["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(16, rows * 0.45 + 1.2))
    fig.suptitle(f"{board['title']}  (drawn from Prometheus by observability/pictures.py; not Grafana)",
                 fontsize=13, x=0.01, ha="left")
    grid = fig.add_gridspec(rows, 24, left=0.04, right=0.99, top=1 - 0.9 / (rows * 0.45 + 1.2),
                            bottom=0.02, hspace=0.4, wspace=1.2)
    step = max(2.0, (end - start) / 300)
    for p in panels:
        g = p["gridPos"]
        if p["type"] == "row":
            ax = fig.add_subplot(grid[g["y"], :])
            ax.axis("off")
            ax.text(0, 0.5, p["title"], fontsize=12, weight="bold", va="center")
            continue
        # A grid unit above for the title and one below for the time axis, as Grafana's
        # panel header and axis take room inside the panel.
        ax = fig.add_subplot(grid[g["y"] + 1:g["y"] + g["h"] - 1, g["x"]:g["x"] + g["w"]])
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        ax.set_title(p["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        series = []
        for target in p["targets"]:
            for result in query_range(prom, target["expr"], start, end, step):
                times = [float(t) - start for t, _ in result["values"]]
                values = [scale(unit, float(v)) for _, v in result["values"]]
                series.append((legend(target.get("legendFormat", ""), result["metric"]), times, values))
        if p["type"] == "stat":
            ax.axis("off")
            mappings = (p.get("fieldConfig", {}).get("defaults", {}).get("mappings") or [{}])[0].get("options", {})
            lines = []
            for label, _, values in series[:8]:
                last = values[-1] if values else float("nan")
                shown = mappings.get(str(int(last)), {}).get("text") if mappings and last == last else None
                lines.append(f"{label}: {shown or f'{last:g}'}")
            ax.text(0.02, 0.9, "\n".join(lines) or "no data", fontsize=9, va="top", family="monospace",
                    transform=ax.transAxes)
            continue
        for label, times, values in series[:12]:
            ax.plot(times, values, linewidth=1, label=label[:40])
        ax.set_xlabel("seconds into the drawn window", fontsize=7)
        ax.set_ylabel(UNITS.get(unit, unit), fontsize=7)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=6, loc="upper left", ncol=2 if len(series) > 4 else 1, framealpha=0.6)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    path = OUT / f"dashboard-{name.removesuffix('.json')}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def draw_flow() -> Path:
    """One POST /api/v1/orders, as a sequence of calls (docs/ARCHITECTURE.md has the same
    diagram in mermaid)."""
    actors = ["client", "gateway", "order", "user", "product"]
    x = {a: i * 3.0 for i, a in enumerate(actors)}
    steps = [
        ("client", "gateway", "POST /api/v1/orders + Bearer token"),
        ("gateway", "gateway", "path safety, rate limit, route, token verified"),
        ("gateway", "order", "POST /orders (x-user-id, x-user-role, traceparent)"),
        ("order", "order", "INSERT checkout row r (the token vouches for its own account)"),
        ("order", "user", "only for an admin ordering for someone else: GET /users/{id}"),
        ("user", "order", "200"),
        ("order", "product", "POST /reservations {id: r, items}  (the quote)"),
        ("product", "product", "one transaction: reservation, stock taken"),
        ("product", "order", "201: names and unit prices"),
        ("order", "order", "one statement: claim checkout r, store order, key"),
        ("order", "gateway", "201 order"),
        ("gateway", "client", "201 order (x-request-id)"),
    ]
    fig, ax = plt.subplots(figsize=(13, 7))
    ax.axis("off")
    bottom = -len(steps) - 1
    for actor in actors:
        ax.add_patch(FancyBboxPatch((x[actor] - 0.9, 0.2), 1.8, 0.8, boxstyle="round,pad=0.05",
                                    facecolor="#dbe9f6", edgecolor="#2b6cb0"))
        ax.text(x[actor], 0.6, actor, ha="center", va="center", fontsize=11, weight="bold")
        ax.plot([x[actor], x[actor]], [0.2, bottom], color="#999", linestyle="--", linewidth=1)
    for i, (src, dst, text) in enumerate(steps):
        y = -i - 0.6
        if src == dst:
            ax.annotate("", xy=(x[src] + 0.05, y - 0.35), xytext=(x[src] + 0.05, y),
                        arrowprops={"arrowstyle": "->", "connectionstyle": "arc3,rad=-1.2", "color": "#555"})
            ax.text(x[src] + 0.45, y - 0.15, text, fontsize=9, va="center")
        else:
            ax.annotate("", xy=(x[dst], y), xytext=(x[src], y),
                        arrowprops={"arrowstyle": "->", "color": "#c05621" if x[dst] < x[src] else "#2b6cb0"})
            ax.text((x[src] + x[dst]) / 2, y + 0.15, text, ha="center", fontsize=9)
    ax.set_xlim(-1.2, x[actors[-1]] + 2.5)
    ax.set_ylim(bottom, 1.2)
    ax.set_title("Placing an order: every call carries traceparent; any failure after the "
                 "reservation releases it", fontsize=11)
    path = OUT / "order-flow.png"
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150, help="traffic drawn (after a minute's warm-up)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"wrote {draw_flow()}")
    work = Path(tempfile.mkdtemp(prefix="shop-pictures-"))
    (work / "rules.yaml").write_text("groups: []\n")
    receiver = check.Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    stack = check.Stack(work, f"http://127.0.0.1:{receiver.server_address[1]}")
    prom = None
    try:
        for service in check.SERVICES:
            stack.start(service)
        prom, prom_url = check.start_prometheus(work, stack)
        gateway = stack.url("gateway")
        # Stock that does not run out, so orders fail only where the traffic means them to.
        status = check.http("PATCH", gateway + "/api/v1/products/2", {"quantity": 10**9})[0]
        check.check(status == 200, f"raising product 2's stock: HTTP {status}")
        # Rates look back a minute: draw from the moment they cover traffic only.
        warmup = 60
        outage = (warmup + args.seconds * 0.45, warmup + args.seconds * 0.6)
        print(f"traffic for {warmup + args.seconds:.0f}s, drawn after the first {warmup}s; "
              f"product down from {outage[0]:.0f}s to {outage[1]:.0f}s")
        start = time.time() + warmup
        drive(gateway, stack, warmup + args.seconds, outage)
        time.sleep(3)  # the last scrapes
        end = time.time()
        for name, board in check.dashboards().items():
            print(f"wrote {draw_board(name, board, prom_url, start, end)}")
    finally:
        stack.stop_all()
        if prom:
            prom.terminate()
            prom.wait(timeout=10)
        receiver.shutdown()
    if check.failures:
        print("\n".join(check.failures))
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
