#!/usr/bin/env python3
"""Builds the Grafana dashboards in charts/shop/dashboards/ (dashboards as code), with
Grafana's own builders (grafana-foundation-sdk, pinned in scripts/packaging-requirements.txt),
so the JSON follows Grafana's schema as the SDK knows it.

    observability/dashboards.py          rewrite the JSON files
    observability/dashboards.py --check  fail if a file differs from what this builds

Every query uses only series the binaries export (scripts/check-observability runs each one
against a real Prometheus scraping them). Templated by datasource, namespace and, on the
overview and runtime dashboards, service; `$__rate_interval` throughout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.common import (
    LegendDisplayMode, LegendPlacement, SortOrder, TooltipDisplayMode,
)

OUT = Path(__file__).resolve().parent.parent / "charts" / "shop" / "dashboards"
SERVICES = ["gateway", "product", "order", "user"]
DS = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Probe and scrape traffic is measured but is not what users experience.
NOT_PROBES = 'route!~"/health|/ready|/metrics|admin"'
NS = 'namespace=~"$namespace"'
S5XX = 'status=~"5.."'
S4XX = 'status=~"4.."'
IN_USE = 'state="in_use"'


def sel(*parts: str) -> str:
    return "{" + ", ".join(p for p in parts if p) + "}"


def rate(metric: str, *matchers: str) -> str:
    return f"rate({metric}{sel(*matchers)}[$__rate_interval])"


def ratio_5xx(by: str, *matchers: str) -> str:
    """5xx share; `or ... * 0` makes it 0 (not "no data") while nothing fails."""
    total = f"sum by ({by}) ({rate('http_server_requests_total', *matchers)})"
    errors = f"sum by ({by}) ({rate('http_server_requests_total', *matchers, S5XX)})"
    return f"({errors} or {total} * 0) / {total}"


def quantile(q: float, metric: str, by: str, *matchers: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) ({rate(metric + '_bucket', *matchers)}))"


def namespace_variable(name: str, label: str, query: str) -> dashboard.QueryVariable:
    return (dashboard.QueryVariable(name).label(label).datasource(DS).query(query)
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).include_all(True).all_value(".*")
            .multi(True).sort(model.VariableSort.ALPHABETICAL_ASC))


class Board:
    """One dashboard: the SDK's builder, plus the grid layout this project keeps (a panel
    that does not fit in the rest of a row starts the next one; the SDK's own placement
    lets it overflow) and panel ids in order."""

    def __init__(self, uid: str, title: str, description: str, service_var: bool, tags: list[str]):
        self.uid = uid
        self.builder = (
            dashboard.Dashboard(title).uid(uid).description(description).tags(["shop", *tags])
            .editable().tooltip(model.DashboardCursorSync.CROSSHAIR).timezone("")
            .time("now-1h", "now").refresh("30s")
            .annotation(dashboard.AnnotationQuery().name("Annotations & Alerts").built_in(1).type("dashboard")
                        .datasource(model.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
                        .enable(True).hide(True).icon_color("rgba(0, 211, 255, 1)"))
            .link(dashboard.DashboardLink("Shop dashboards").type(model.DashboardLinkType.DASHBOARDS)
                  .tags(["shop"]).as_dropdown(True).include_vars(True).keep_time(True))
            .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
            .with_variable(namespace_variable("namespace", "Namespace", "label_values(build_info, namespace)"))
        )
        if service_var:
            self.builder.with_variable(namespace_variable(
                "service", "Service", 'label_values(build_info{namespace=~"$namespace"}, service)'))
        self.builder.with_variable(
            dashboard.TextBoxVariable("jaeger").label("Trace UI").default_value("http://localhost:16686")
            .description("Base URL of the Jaeger UI that panel links open"))
        self.next_id = 1
        self.x = self.y = 0
        self.row_height = 0

    def _newline(self) -> None:
        self.y += self.row_height
        self.x = self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.builder.with_row(dashboard.Row(title).id(self.next_id)
                              .grid_pos(model.GridPos(h=1, w=24, x=0, y=self.y)))
        self.next_id += 1
        self.y += 1

    def add(self, title: str, targets: list[tuple[str, str]], *, unit: str = "short", kind: str = "timeseries",
            width: int = 12, height: int = 8, description: str = "", mappings: list | None = None,
            links: list | None = None) -> None:
        if self.x + width > 24:
            self._newline()
        if kind == "timeseries":
            panel = (timeseries.Panel()
                     .legend(common.VizLegendOptions().display_mode(LegendDisplayMode.TABLE)
                             .placement(LegendPlacement.BOTTOM).show_legend(True).calcs(["mean", "max"]))
                     .tooltip(common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI)
                              .sort(SortOrder.DESCENDING)))
        else:
            panel = stat.Panel()
        panel.id(self.next_id).title(title).description(description).datasource(DS).unit(unit)
        panel.grid_pos(model.GridPos(h=height, w=width, x=self.x, y=self.y))
        if mappings:
            panel.mappings(mappings)
        if links:
            panel.data_links(links)
        for i, (expr, legend) in enumerate(targets):
            panel.with_target(prometheus.Dataquery().ref_id(chr(ord("A") + i)).datasource(DS).expr(expr)
                              .legend_format(legend).range())
        self.builder.with_panel(panel)
        self.next_id += 1
        self.x += width
        self.row_height = max(self.row_height, height)
        if self.x >= 24:
            self._newline()

    def json(self) -> dict:
        return json.loads(json.dumps(self.builder.build(), cls=JSONEncoder))


CIRCUIT = [model.ValueMap(options={
    "0": model.ValueMappingResult(text="closed", color="green"),
    "1": model.ValueMappingResult(text="open", color="red"),
    "2": model.ValueMappingResult(text="half-open", color="orange"),
})]


def traces_link(service: str) -> list[dashboard.DashboardLink]:
    return [dashboard.DashboardLink("Traces of ${__field.labels.service} in Jaeger").target_blank(True)
            .url("${jaeger}/search?service=" + service + "&limit=20")]


def red(board: Board, service: str, by: str, legend: str) -> None:
    m = [NS, service, NOT_PROBES]
    board.add("Requests per second", [(f"sum by ({by}) ({rate('http_server_requests_total', *m)})", legend)],
              unit="reqps", description="Requests served (probes and scrapes excluded).")
    board.add("5xx error ratio", [(ratio_5xx(by, *m), legend)], unit="percentunit",
              description="Share of responses with a 5xx status: what the availability SLO counts.")
    board.add("Latency p50 / p95 / p99", [
        (quantile(q, "http_server_request_duration_seconds", by, *m), f"p{int(q * 100)} {legend}")
        for q in (0.5, 0.95, 0.99)], unit="s",
        description="From request received to response headers sent, by matched route.",
        links=traces_link("${__field.labels.service}" if "service" in by else service.split('"')[1]))
    board.add("Responses by status", [(
        f"sum by (status) ({rate('http_server_requests_total', *m)})", "{{status}}")], unit="reqps")


def overview() -> Board:
    b = Board("shop-overview", "Shop / Overview", "RED per service and route, in-flight, gateway upstream health.",
              True, ["overview"])
    svc = 'service=~"$service"'
    m = [NS, svc, NOT_PROBES]
    b.row("Rate, errors, duration")
    b.add("Requests per second by service and route",
          [(f"sum by (service, route) ({rate('http_server_requests_total', *m)})", "{{service}} {{route}}")],
          unit="reqps")
    b.add("5xx error ratio by service and route", [(ratio_5xx("service, route", *m), "{{service}} {{route}}")],
          unit="percentunit")
    for q in (0.5, 0.95, 0.99):
        b.add(f"Latency p{int(q * 100)} by service and route",
              [(quantile(q, "http_server_request_duration_seconds", "service, route", *m), "{{service}} {{route}}")],
              unit="s", width=8, links=traces_link("${__field.labels.service}"))
    b.add("Requests in flight", [(f"sum by (service) (http_server_requests_in_flight{sel(NS, svc)})", "{{service}}")])
    b.add("4xx ratio by service", [(
        f"(sum by (service) ({rate('http_server_requests_total', *m, S4XX)}) or "
        f"sum by (service) ({rate('http_server_requests_total', *m)}) * 0) / "
        f"sum by (service) ({rate('http_server_requests_total', *m)})", "{{service}}")], unit="percentunit",
        description="Refused requests (validation, not found, conflicts, rate limits): not errors of ours, "
                    "but a jump often means a broken client release.")
    b.row("Gateway: upstreams")
    b.add("Upstream endpoints by state", [(
        f"sum by (upstream, state) (gateway_upstream_endpoints{sel(NS)})", "{{upstream}} {{state}}")],
        width=8, description="healthy vs ejected (passive health: refused connections eject an endpoint).")
    b.add("Circuit breaker state", [(f"max by (upstream) (gateway_circuit_state{sel(NS)})", "{{upstream}}")],
          kind="stat", width=8, mappings=CIRCUIT, description="0 closed, 1 open, 2 half-open.")
    b.add("Rate-limited requests per second", [(
        f"sum({rate('gateway_rate_limited_total', NS)})", "429 rate limited")], unit="reqps", width=8)
    b.add("Upstream requests by outcome", [(
        f"sum by (upstream, status) ({rate('gateway_upstream_requests_total', NS)})", "{{upstream}} {{status}}")],
        unit="reqps", description="Status code, or timeout / connect_error / error / no_endpoint / circuit_open.")
    b.add("Upstream latency p95", [(
        quantile(0.95, "gateway_upstream_request_duration_seconds", "upstream", NS), "{{upstream}}")], unit="s")
    return b


def service_board(service: str) -> Board:
    titles = {"gateway": "Gateway", "product": "Product service", "order": "Order service", "user": "User service"}
    b = Board(f"shop-{service}", f"Shop / {titles[service]}",
              f"The {service} binary: RED by route and its own counters.", False, [service])
    svc = f'service="{service}"'
    b.row("Rate, errors, duration by route")
    red(b, svc, "route", "{{route}}")
    if service == "gateway":
        b.row("Upstreams")
        b.add("Upstream requests by outcome", [(
            f"sum by (upstream, status) ({rate('gateway_upstream_requests_total', NS)})", "{{upstream}} {{status}}")],
            unit="reqps")
        b.add("Upstream latency p50 / p99", [
            (quantile(q, "gateway_upstream_request_duration_seconds", "upstream", NS), f"p{int(q * 100)} {{{{upstream}}}}")
            for q in (0.5, 0.99)], unit="s")
        b.add("Endpoints by state", [(
            f"sum by (upstream, state) (gateway_upstream_endpoints{sel(NS)})", "{{upstream}} {{state}}")], width=8)
        b.add("Circuit breaker state", [(f"max by (upstream) (gateway_circuit_state{sel(NS)})", "{{upstream}}")],
              kind="stat", width=8, mappings=CIRCUIT)
        b.add("Rate limited and broken streams", [
            (f"sum({rate('gateway_rate_limited_total', NS)})", "429 rate limited"),
            (f"sum by (upstream) ({rate('gateway_upstream_stream_errors_total', NS)})", "stream cut {{upstream}}")],
            unit="reqps", width=8)
    if service == "product":
        b.row("Catalogue and stock")
        b.add("Stock reservations by outcome", [(
            f"sum by (outcome) ({rate('stock_reservations_total', NS, svc)})", "{{outcome}}")], unit="ops",
            description="reserved, replayed (idempotent retry), insufficient_stock, unknown_product.")
        b.add("Reservations released and products created", [
            (f"sum({rate('stock_reservations_released_total', NS, svc)})", "released (compensation)"),
            (f"sum({rate('products_created_total', NS, svc)})", "products created")], unit="ops")
    if service == "order":
        b.row("Orders")
        b.add("Orders created and failed", [
            (f"sum({rate('orders_created_total', NS, svc)})", "created"),
            (f"sum({rate('orders_failed_total', NS, svc)})", "failed")], unit="ops")
        b.add("Order failures by reason", [(
            f"sum by (reason) ({rate('orders_failed_total', NS, svc)})", "{{reason}}")], unit="ops")
        b.row("Calls to product and user")
        b.add("Calls by peer and outcome", [(
            f"sum by (peer, status) ({rate('http_client_requests_total', NS, svc)})", "{{peer}} {{status}}")],
            unit="reqps")
        b.add("Call latency p95 by peer", [(
            quantile(0.95, "http_client_request_duration_seconds", "peer", NS, svc), "{{peer}}")], unit="s")
    if service == "order":
        b.add("Status changes", [(
            f"sum by (to) ({rate('orders_status_changes_total', NS, svc)})", "{{to}}")], unit="ops",
            description="Orders confirmed or cancelled.")
    if service in ("product", "order"):
        b.row("Events (outbox, broker, consumers)")
        b.add("Outbox: waiting events and the oldest one's age", [
            (f"sum(outbox_pending_events{sel(NS, svc)})", "waiting"),
            (f"max(outbox_oldest_pending_age_seconds{sel(NS, svc)})", "oldest (s)")], width=8,
            description="Events written but not yet confirmed by the broker; they flow once it is back.")
        b.add("Published by type", [(
            f"sum by (type) ({rate('events_published_total', NS, svc)})", "{{type}}")], unit="ops", width=8)
        b.add("Consumed by queue and outcome", [
            (f"sum by (queue, outcome) ({rate('events_consumed_total', NS, svc)})", "{{queue}} {{outcome}}"),
            (f"sum by (queue) ({rate('events_redelivered_total', NS, svc)})", "{{queue}} redelivered")],
            unit="ops", width=8,
            description="applied; duplicate (already in the inbox: nothing changed); dead_lettered; retried.")
        b.add("Consumer lag", [(
            f"max by (queue) (events_consumer_lag_seconds{sel(NS, svc)})", "{{queue}}")], unit="s", width=8,
            description="From an event's occurrence to its handling, for the last one handled.")
    if service == "user":
        b.row("Accounts")
        b.add("Users registered", [(f"sum({rate('users_registered_total', NS, svc)})", "registered")], unit="ops")
        b.add("Logins by outcome", [(f"sum by (outcome) ({rate('user_logins_total', NS, svc)})", "{{outcome}}")],
              unit="ops")
    return b


def runtime() -> Board:
    b = Board("shop-runtime", "Shop / Runtime", "Process resources and database pools of every binary.",
              True, ["runtime"])
    m = [NS, 'service=~"$service"']
    b.row("Process")
    b.add("Resident memory", [(f"process_resident_memory_bytes{sel(*m)}", "{{service}} {{instance}}")],
          unit="bytes", width=8)
    b.add("CPU (cores)", [(f"{rate('process_cpu_seconds_total', *m)}", "{{service}} {{instance}}")], width=8)
    b.add("Open file descriptors / limit", [(
        f"process_open_fds{sel(*m)} / process_max_fds{sel(*m)}", "{{service}} {{instance}}")],
        unit="percentunit", width=8)
    b.add("Threads", [(f"process_threads{sel(*m)}", "{{service}} {{instance}}")], width=8)
    b.add("Uptime", [(f"time() - process_start_time_seconds{sel(*m)}", "{{service}} {{instance}}")],
          unit="s", width=8)
    b.add("Running versions", [(f"count by (service, version, revision) (build_info{sel(*m)})",
                                "{{service}} {{version}} {{revision}}")], kind="stat", width=8)
    b.row("Database pools")
    b.add("Pool connections by state", [(
        f"sum by (service, pool, state) (db_pool_connections{sel(*m)})",
        "{{service}} {{pool}} {{state}}")])
    b.add("Pool utilisation", [(
        f"sum by (service, pool) (db_pool_connections{sel(*m, IN_USE)}) / "
        f"sum by (service, pool) (db_pool_max_connections{sel(*m)})", "{{service}} {{pool}}")],
        unit="percentunit",
        description="In-use connections over the pool's size (main: DB_MAX_CONNECTIONS; "
                    "grouped_writes: PostgreSQL's grouped writes, 2); near 1 on main means "
                    "requests queue for a connection (DB_ACQUIRE_TIMEOUT then answers 503).")
    return b


def boards() -> dict[str, dict]:
    all_boards = [overview(), *(service_board(s) for s in SERVICES), runtime()]
    return {f"{b.uid.removeprefix('shop-')}.json": b.json() for b in all_boards}


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    for name, board in boards().items():
        text = json.dumps(board, indent=2) + "\n"
        path = OUT / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale dashboards (run observability/dashboards.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
