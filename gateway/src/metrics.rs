//! Gateway-specific metrics, registered in the platform registry beside the standard
//! `http_server_*` families.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts};
use shop_platform::Metrics;

use crate::upstream::{CircuitState, Upstream, now_ms};

pub struct GatewayMetrics {
    upstream_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    endpoints: IntGaugeVec,
    circuit: IntGaugeVec,
    stream_errors: IntCounterVec,
    discovery_errors: IntCounterVec,
    discovery_up: IntGaugeVec,
    pub rate_limited: IntCounter,
    cache: IntCounterVec,
}

impl GatewayMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let registry = metrics.registry();
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "gateway_upstream_requests_total",
                "Requests to upstreams by outcome: status code, or timeout, connect_error, error, no_endpoint, circuit_open.",
            ),
            &["upstream", "status"],
        )
        .expect("valid metric");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "gateway_upstream_request_duration_seconds",
                "Time from sending a request upstream to its response headers.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["upstream"],
        )
        .expect("valid metric");
        let endpoints = IntGaugeVec::new(
            Opts::new(
                "gateway_upstream_endpoints",
                "Endpoints per upstream by state: healthy and ejected (balanced over, or resting after refused connections); with kubernetes discovery also not_ready and terminating (known, sent nothing new).",
            ),
            &["upstream", "state"],
        )
        .expect("valid metric");
        let circuit = IntGaugeVec::new(
            Opts::new(
                "gateway_circuit_state",
                "Circuit breaker per upstream: 0 closed, 1 open, 2 half-open.",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let stream_errors = IntCounterVec::new(
            Opts::new(
                "gateway_upstream_stream_errors_total",
                "Responses whose body broke off mid-stream (the client saw a closed stream).",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let discovery_errors = IntCounterVec::new(
            Opts::new(
                "gateway_discovery_watch_errors_total",
                "Failed EndpointSlice lists or watches per upstream (each is retried with backoff; the last known endpoints stay in use).",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let discovery_up = IntGaugeVec::new(
            Opts::new(
                "gateway_discovery_watch_up",
                "1 while an upstream's EndpointSlices are listed and watched without error; 0 while syncing or retrying.",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let rate_limited = IntCounter::new(
            "gateway_rate_limited_total",
            "Requests refused with 429 by the per-client rate limit.",
        )
        .expect("valid metric");
        let cache = IntCounterVec::new(
            Opts::new(
                "gateway_cache_requests_total",
                "Cacheable GET requests by result: hit, revalidated (304 from cache), stored.",
            ),
            &["upstream", "result"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(cache.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(upstream_requests.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(endpoints.clone()),
            Box::new(circuit.clone()),
            Box::new(stream_errors.clone()),
            Box::new(discovery_errors.clone()),
            Box::new(discovery_up.clone()),
            Box::new(rate_limited.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric registered once");
        }
        Self {
            upstream_requests,
            upstream_duration,
            endpoints,
            circuit,
            stream_errors,
            discovery_errors,
            discovery_up,
            rate_limited,
            cache,
        }
    }

    pub fn cache(&self, upstream: &str, result: &str) {
        self.cache.with_label_values(&[upstream, result]).inc();
    }

    pub fn count(&self, upstream: &str, outcome: &str) {
        self.upstream_requests
            .with_label_values(&[upstream, outcome])
            .inc();
    }

    pub fn observe(&self, upstream: &str, outcome: &str, elapsed: Duration) {
        self.count(upstream, outcome);
        self.upstream_duration
            .with_label_values(&[upstream])
            .observe(elapsed.as_secs_f64());
    }

    /// Pre-resolved (count, duration) handles for one upstream outcome.
    pub fn handles(&self, upstream: &str, outcome: &str) -> (IntCounter, prometheus::Histogram) {
        (
            self.upstream_requests
                .with_label_values(&[upstream, outcome]),
            self.upstream_duration.with_label_values(&[upstream]),
        )
    }

    /// Exports an upstream's series whose labels are all known at start-up at 0 (the
    /// per-status request counts appear with their first status).
    pub fn known_upstream(&self, upstream: &str, cached: bool) {
        self.upstream_duration.with_label_values(&[upstream]);
        self.stream_errors.with_label_values(&[upstream]);
        if cached {
            for result in ["hit", "revalidated", "stored"] {
                self.cache.with_label_values(&[upstream, result]);
            }
        }
    }

    pub fn stream_errors(&self, upstream: &str) -> IntCounter {
        self.stream_errors.with_label_values(&[upstream])
    }

    pub fn discovery_errors(&self, upstream: &str) -> IntCounter {
        self.discovery_errors.with_label_values(&[upstream])
    }

    /// Gauges that describe state rather than events are computed at scrape time.
    pub fn refresh(&self, upstreams: &[Upstream]) {
        let now = now_ms();
        for u in upstreams {
            let endpoints = u.endpoints();
            let ejected = endpoints.iter().filter(|e| e.is_ejected(now)).count() as i64;
            self.endpoints
                .with_label_values(&[u.name.as_str(), "healthy"])
                .set(endpoints.len() as i64 - ejected);
            self.endpoints
                .with_label_values(&[u.name.as_str(), "ejected"])
                .set(ejected);
            if let Some(status) = &u.discovery {
                let (_, not_ready, terminating) = status.counts();
                self.endpoints
                    .with_label_values(&[u.name.as_str(), "not_ready"])
                    .set(not_ready as i64);
                self.endpoints
                    .with_label_values(&[u.name.as_str(), "terminating"])
                    .set(terminating as i64);
                self.discovery_up
                    .with_label_values(&[u.name.as_str()])
                    .set(i64::from(status.is_watching()));
            }
            let state = match u.breaker.state() {
                CircuitState::Closed => 0,
                CircuitState::Open => 1,
                CircuitState::HalfOpen => 2,
            };
            self.circuit
                .with_label_values(&[u.name.as_str()])
                .set(state);
        }
    }
}
