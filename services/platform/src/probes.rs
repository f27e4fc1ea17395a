//! Liveness, readiness and metrics endpoints, shared by every binary.
//!
//! `/health` says the process is alive and never flips during shutdown (restarting a pod
//! that is draining would cut its requests). `/ready` is 200 only once started, while every
//! dependency check passes and before shutdown begins.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};

use crate::metrics::Metrics;

pub type CheckResult = Result<(), String>;
type CheckFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = CheckResult> + Send>> + Send + Sync>;

/// Liveness path: what orchestrators probe to decide on restarts.
pub const HEALTH_PATH: &str = "/health";
/// Readiness path: what load balancers and the `healthcheck` subcommand probe.
pub const READY_PATH: &str = "/ready";
/// Metrics path (Prometheus text format).
pub const METRICS_PATH: &str = "/metrics";

/// How long one dependency check may take before it counts as failing.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<ReadinessInner>,
}

#[derive(Default)]
struct ReadinessInner {
    started: AtomicBool,
    shutting_down: AtomicBool,
    /// Start-up's garbage is freed once the service is first ready.
    trimmed: AtomicBool,
    checks: std::sync::RwLock<Vec<(String, CheckFn)>>,
}

impl Readiness {
    /// Adds a dependency check run on every `/ready` call.
    pub fn add_check<F, Fut>(&self, name: impl Into<String>, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CheckResult> + Send + 'static,
    {
        let check: CheckFn = Arc::new(move || Box::pin(check()));
        self.inner
            .checks
            .write()
            .expect("checks lock")
            .push((name.into(), check));
    }

    pub fn set_started(&self) {
        self.inner.started.store(true, Ordering::SeqCst);
    }

    pub fn set_shutting_down(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Runs every check concurrently; returns overall readiness and a per-check report.
    pub async fn evaluate(&self) -> (bool, Value) {
        let checks: Vec<(String, CheckFn)> = self.inner.checks.read().expect("checks lock").clone();
        let results = futures_util::future::join_all(checks.iter().map(|(name, check)| {
            let fut = check();
            async move {
                let outcome = match tokio::time::timeout(CHECK_TIMEOUT, fut).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("no answer within {}s", CHECK_TIMEOUT.as_secs())),
                };
                (name.clone(), outcome)
            }
        }))
        .await;

        let mut report = Map::new();
        let mut failing = Vec::new();
        if self.is_shutting_down() {
            failing.push("shutdown".to_owned());
            report.insert(
                "shutdown".into(),
                json!({"status": "failing", "error": "shutting down"}),
            );
        } else if !self.inner.started.load(Ordering::SeqCst) {
            failing.push("startup".to_owned());
            report.insert(
                "startup".into(),
                json!({"status": "failing", "error": "still starting"}),
            );
        }
        for (name, outcome) in results {
            let entry = match outcome {
                Ok(()) => json!({"status": "ok"}),
                Err(error) => {
                    failing.push(name.clone());
                    json!({"status": "failing", "error": error})
                }
            };
            report.insert(name, entry);
        }
        let ready = failing.is_empty();
        if ready && !self.inner.trimmed.swap(true, Ordering::Relaxed) {
            crate::memory::return_free_memory();
        }
        let body = if ready {
            json!({"status": "ready", "checks": report})
        } else {
            json!({
                "status": "not_ready",
                "error": {
                    "code": "not_ready",
                    "message": format!("failing checks: {}", failing.join(", ")),
                },
                "checks": report,
            })
        };
        (ready, body)
    }
}

#[derive(Clone)]
struct ProbeState {
    readiness: Readiness,
    metrics: Metrics,
}

pub(crate) fn router(readiness: Readiness, metrics: Metrics) -> Router {
    Router::new()
        .route(HEALTH_PATH, get(health))
        .route(READY_PATH, get(ready))
        .route(METRICS_PATH, get(metrics_text))
        .with_state(ProbeState { readiness, metrics })
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn ready(State(state): State<ProbeState>) -> Response {
    let (ready, body) = state.readiness.evaluate().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics_text(State(state): State<ProbeState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
