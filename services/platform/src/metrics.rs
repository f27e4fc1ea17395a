//! Prometheus metrics with the same names in every binary. Each service owns a custom
//! registry whose constant `service` label lands on every series it exports.

use std::collections::HashMap;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets in seconds, from sub-millisecond cache hits to the 10 s request timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `method` label: the standard methods by name, anything else as `_OTHER` (as the
/// OpenTelemetry HTTP conventions do), so a client inventing methods cannot create series.
pub fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const REVISION: &str = env!("SHOP_REVISION");

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub(crate) requests: IntCounterVec,
    pub(crate) duration: HistogramVec,
    pub(crate) in_flight: IntGauge,
    pub(crate) client_requests: IntCounterVec,
    pub(crate) client_duration: HistogramVec,
}

impl Metrics {
    pub fn new(service: &str) -> Self {
        let labels = HashMap::from([("service".to_owned(), service.to_owned())]);
        let registry = Registry::new_custom(None, Some(labels)).expect("constant labels are valid");

        let requests = IntCounterVec::new(
            Opts::new(
                "http_server_requests_total",
                "HTTP requests served, by matched route and status code.",
            ),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "http_server_request_duration_seconds",
                "Time from request received to response headers sent.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["method", "route", "status_class"],
        )
        .expect("valid metric");
        let in_flight = IntGauge::new(
            "http_server_requests_in_flight",
            "Requests currently being served.",
        )
        .expect("valid metric");
        let client_requests = IntCounterVec::new(
            Opts::new(
                "http_client_requests_total",
                "Calls to other services, by peer and outcome (status code or error).",
            ),
            &["peer", "method", "status"],
        )
        .expect("valid metric");
        let client_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_client_request_duration_seconds",
                "Duration of calls to other services.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["peer", "method"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Always 1; labels say what is running."),
            &["version", "revision"],
        )
        .expect("valid metric");
        build_info.with_label_values(&[VERSION, REVISION]).set(1);

        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(in_flight.clone()),
            Box::new(client_requests.clone()),
            Box::new(client_duration.clone()),
            Box::new(build_info),
        ] {
            registry
                .register(collector)
                .expect("metric registered once");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registered once");

        Self {
            registry,
            requests,
            duration,
            in_flight,
            client_requests,
            client_duration,
        }
    }

    /// A domain counter (e.g. `orders_created_total`) in this service's registry.
    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        let counter = IntCounter::new(name, help).expect("valid metric");
        self.registry
            .register(Box::new(counter.clone()))
            .expect("metric registered once");
        counter
    }

    /// A domain gauge (e.g. `catalogue_products`) in this service's registry.
    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let gauge = IntGauge::new(name, help).expect("valid metric");
        self.registry
            .register(Box::new(gauge.clone()))
            .expect("metric registered once");
        gauge
    }

    /// A domain counter by one label whose values come from a closed set: each of
    /// `values` is exported at 0 from start-up, so a dashboard or an alert has a series
    /// (and `rate` a first point) before the first event, not "No data".
    pub fn counter_vec(
        &self,
        name: &str,
        help: &str,
        label: &str,
        values: &[&str],
    ) -> IntCounterVec {
        let counter = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
        for value in values {
            counter.with_label_values(&[*value]);
        }
        self.registry
            .register(Box::new(counter.clone()))
            .expect("metric registered once");
        counter
    }

    /// Pre-resolved handles for one (method, route, status), for servers that cache them
    /// instead of paying a label lookup per request.
    pub fn server_handles(
        &self,
        method: &str,
        route: &str,
        status: u16,
    ) -> (IntCounter, prometheus::Histogram) {
        let code = status.to_string();
        (
            self.requests
                .with_label_values(&[method, route, code.as_str()]),
            self.duration
                .with_label_values(&[method, route, status_class(status)]),
        )
    }

    /// Connection pool gauges (`db_pool_connections{pool,state}`,
    /// `db_pool_max_connections{pool}`), read from the pool at scrape time. `name`: `main`
    /// (`DB_MAX_CONNECTIONS`) or `grouped_writes` (PostgreSQL's typed pool).
    pub fn register_pool<DB: sqlx::Database>(&self, pool: sqlx::Pool<DB>, name: &str) {
        let connections = IntGaugeVec::new(
            Opts::new(
                "db_pool_connections",
                "Database connections held by the pool, by state (idle, in_use).",
            )
            .const_label("pool", name),
            &["state"],
        )
        .expect("valid metric");
        let max = IntGauge::with_opts(
            Opts::new(
                "db_pool_max_connections",
                "Most connections the pool may open (DB_MAX_CONNECTIONS for the main pool).",
            )
            .const_label("pool", name),
        )
        .expect("valid metric");
        self.registry
            .register(Box::new(PoolCollector {
                pool,
                connections,
                max,
            }))
            .expect("pool metrics registered once");
    }

    pub fn in_flight(&self) -> &IntGauge {
        &self.in_flight
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn observe_request(
        &self,
        method: &str,
        route: &str,
        status: u16,
        elapsed: Duration,
    ) {
        let code = status.to_string();
        self.requests
            .with_label_values(&[method, route, code.as_str()])
            .inc();
        self.duration
            .with_label_values(&[method, route, status_class(status)])
            .observe(elapsed.as_secs_f64());
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("text format is UTF-8")
    }
}

struct PoolCollector<DB: sqlx::Database> {
    pool: sqlx::Pool<DB>,
    connections: IntGaugeVec,
    max: IntGauge,
}

impl<DB: sqlx::Database> prometheus::core::Collector for PoolCollector<DB> {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut descs = self.connections.desc();
        descs.extend(self.max.desc());
        descs
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let size = i64::from(self.pool.size());
        let idle = self.pool.num_idle() as i64;
        self.connections.with_label_values(&["idle"]).set(idle);
        self.connections
            .with_label_values(&["in_use"])
            .set((size - idle).max(0));
        self.max
            .set(i64::from(self.pool.options().get_max_connections()));
        let mut families = self.connections.collect();
        families.extend(self.max.collect());
        families
    }
}

pub(crate) fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_share_one_label() {
        assert_eq!(method_label(&http::Method::PATCH), "PATCH");
        let invented = http::Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(method_label(&invented), "_OTHER");
    }

    #[test]
    fn closed_set_counters_are_exported_at_zero_before_any_event() {
        let metrics = Metrics::new("user");
        let logins = metrics.counter_vec("logins_total", "Logins.", "outcome", &["ok", "failed"]);
        let text = metrics.render();
        for outcome in ["ok", "failed"] {
            let line = format!("logins_total{{outcome=\"{outcome}\",service=\"user\"}} 0");
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        logins.with_label_values(&["ok"]).inc();
        assert!(
            metrics
                .render()
                .contains("logins_total{outcome=\"ok\",service=\"user\"} 1")
        );
    }

    #[tokio::test]
    async fn pool_gauges_are_read_at_scrape_time() {
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(3)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let metrics = Metrics::new("order");
        metrics.register_pool(pool.clone(), "main");
        let other = sqlx::any::AnyPoolOptions::new()
            .max_connections(2)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        metrics.register_pool(other, "grouped_writes");
        let _held = pool.acquire().await.unwrap();
        let text = metrics.render();
        let value = |prefix: &str, labels: &[&str]| {
            text.lines()
                .find(|l| l.starts_with(prefix) && labels.iter().all(|label| l.contains(label)))
                .unwrap_or_else(|| panic!("{prefix} {labels:?} missing in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        let main = r#"pool="main""#;
        let connections = "db_pool_connections{";
        assert_eq!(value(connections, &[main, r#"state="in_use""#]), "1");
        assert_eq!(value(connections, &[main, r#"state="idle""#]), "0");
        assert_eq!(
            value("db_pool_max_connections{", &[main, r#"service="order""#]),
            "3"
        );
        let grouped = r#"pool="grouped_writes""#;
        assert_eq!(value("db_pool_max_connections{", &[grouped]), "2");
    }

    #[test]
    fn every_family_carries_the_service_label() {
        let metrics = Metrics::new("product");
        metrics.observe_request("GET", "/products/{id}", 200, Duration::from_millis(3));
        let text = metrics.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("http_server_requests_total{"))
            .expect("request counter exported");
        for label in [
            r#"method="GET""#,
            r#"route="/products/{id}""#,
            r#"status="200""#,
            r#"service="product""#,
        ] {
            assert!(line.contains(label), "{label} missing in {line}");
        }
        assert!(line.ends_with(" 1"));
        assert!(text.contains(r#"status_class="2xx""#));
        assert!(text.contains("build_info{"));
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_resident_memory_bytes"));
    }
}
