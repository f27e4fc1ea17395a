//! The API gateway: the front door of the shop. A streaming reverse proxy with a route
//! table, pooled upstream connections, load balancing, passive health, retries within a
//! budget, circuit breakers and per-client rate limits.
//!
//! It runs thread-per-core: one single-threaded runtime per worker, each with its own
//! `SO_REUSEPORT` listener and its own upstream connection pool, so a request never
//! crosses threads. Shared state (routes, endpoint health, breakers, metrics) is atomics.

pub mod config;
pub mod docs;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod upstream;

use ::http::header::{HeaderMap, HeaderValue};
use ::http::{Method, StatusCode};
use serde_json::json;
use shop_platform::probes::Readiness;
use shop_platform::{AppError, Metrics};

pub use config::{BINARY, Config};
pub use server::Gateway;

use crate::policy::ratelimit::RateLimiter;
use crate::policy::routes::RouteTable;
use crate::proxy::{ResponseBody, error, local};
use crate::upstream::{CircuitState, Upstream};

pub const NAME: &str = "gateway";
pub use crate::http::REQUEST_ID;

/// Route ids for requests that matched no route, and for the admin endpoints; real routes
/// are numbered from 0.
pub const UNMATCHED_ROUTE: usize = usize::MAX;
pub const ADMIN_ROUTE: usize = usize::MAX - 1;
pub const DOCS_ROUTE: usize = usize::MAX - 2;

/// Behaviour switches read on the hot path.
#[derive(Debug, Clone)]
pub struct Options {
    pub body_limit: u64,
    pub upstream_timeout: std::time::Duration,
    /// Also how long a request waits for an upstream's first discovery list.
    pub connect_timeout: std::time::Duration,
    pub access_log: bool,
}

/// State every worker shares.
pub struct Shared {
    pub table: RouteTable,
    pub upstreams: Vec<Upstream>,
    pub options: Options,
    pub limiter: Option<RateLimiter>,
    pub authenticator: shop_platform::Authenticator,
    pub cors: Option<policy::access::Cors>,
    pub cache: Option<policy::cache::ResponseCache>,
    pub metrics: Metrics,
    pub metrics_gw: metrics::GatewayMetrics,
    pub readiness: Readiness,
    /// Decides the sampled flag of each request's trace.
    pub sampler: shop_platform::telemetry::Sampler,
    /// Where sampled requests' spans go; `None` when no OTLP endpoint is configured.
    pub spans: Option<&'static shop_platform::telemetry::SpanSink>,
    pub docs: docs::ApiDocs,
}

impl upstream::discovery::Upstreams for Shared {
    fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }
}

impl Shared {
    pub fn route_label(&self, route: usize) -> &str {
        match route {
            UNMATCHED_ROUTE => "unmatched",
            ADMIN_ROUTE => "admin",
            DOCS_ROUTE => "docs",
            id => &self.table.routes[id].label,
        }
    }

    /// `/health`, `/ready` and `/metrics`, answered by the gateway itself.
    pub async fn admin(
        &self,
        path: &str,
        method: &Method,
    ) -> Option<::http::Response<ResponseBody>> {
        if !matches!(path, "/health" | "/ready" | "/metrics") {
            return None;
        }
        if !matches!(*method, Method::GET | Method::HEAD) {
            return Some(error(AppError::from_status(StatusCode::METHOD_NOT_ALLOWED)));
        }
        Some(match path {
            "/health" => local(StatusCode::OK, "application/json", r#"{"status":"ok"}"#),
            "/ready" => {
                let (ready, mut body) = self.readiness.evaluate().await;
                body["upstreams"] = self.upstream_report();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                local(status, "application/json", body.to_string())
            }
            _ => {
                self.metrics_gw.refresh(&self.upstreams);
                local(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.render(),
                )
            }
        })
    }

    /// Upstream health for `/ready`. Informational: the gateway stays ready while an
    /// upstream is down, because answering 503 JSON at once beats being taken out of the
    /// load balancer and refusing connections.
    fn upstream_report(&self) -> serde_json::Value {
        let now = upstream::now_ms();
        let mut report = serde_json::Map::new();
        for u in &self.upstreams {
            let endpoints = u.endpoints();
            let healthy = endpoints.iter().filter(|e| !e.is_ejected(now)).count();
            let circuit = match u.breaker.state() {
                CircuitState::Closed => "closed",
                CircuitState::Open => "open",
                CircuitState::HalfOpen => "half_open",
            };
            let mut entry =
                json!({"endpoints": endpoints.len(), "healthy": healthy, "circuit": circuit});
            if let Some(status) = &u.discovery {
                entry["discovery"] = status.report();
            }
            report.insert(u.name.clone(), entry);
        }
        report.into()
    }
}

/// A well-formed inbound `x-request-id`, or a fresh one. The gateway writes it into the
/// upstream request head itself rather than into the header map.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&REQUEST_ID)
        && shop_platform::middleware::is_acceptable_request_id(id)
    {
        return id.clone();
    }
    let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_bytes(id.hyphenated().encode_lower(&mut text).as_bytes())
        .expect("uuid is ASCII")
}

/// Builds the gateway from its configuration and binds every worker's listener.
pub fn build(config: Config) -> anyhow::Result<Gateway> {
    server::Gateway::bind(config)
}

pub async fn run(config: Config, shutdown: shop_platform::Shutdown) -> anyhow::Result<()> {
    build(config)?.run(shutdown).await
}
