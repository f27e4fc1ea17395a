//! The standard per-request stack, applied once by [`crate::server`] to every router:
//! request id, a span per request named by the matched route (continuing an inbound W3C
//! trace), a request timeout (504), in-flight and RED metrics by matched route, a JSON body
//! for every error response, and panic -> 500.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use tracing::field::Empty;

use crate::error::AppError;
use crate::metrics::Metrics;
use crate::probes::Readiness;
use crate::telemetry;

/// The request id's header; a `HeaderName`, as a `&str` key is parsed again on every use.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Routes that monitoring systems hit constantly: measured, but neither traced nor logged.
const QUIET_ROUTES: &[&str] = &["/health", "/ready", "/metrics"];

/// Label used for requests that matched no route, so probing random paths cannot create
/// new series.
pub const UNMATCHED_ROUTE: &str = "unmatched";

tokio::task_local! {
    static CURRENT_REQUEST_ID: HeaderValue;
}

/// The id of the request being served by the current task, for outbound calls.
pub fn current_request_id() -> Option<HeaderValue> {
    CURRENT_REQUEST_ID.try_with(Clone::clone).ok()
}

pub(crate) struct Observer {
    pub metrics: Metrics,
    pub request_timeout: Duration,
    pub body_limit: usize,
    /// Set for a served application: see `server::stack_draining`.
    pub draining: Option<Readiness>,
}

struct InFlight<'a>(&'a prometheus::IntGauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub(crate) async fn observe(
    State(observer): State<Arc<Observer>>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    observer.metrics.in_flight.inc();
    let _in_flight = InFlight(&observer.metrics.in_flight);

    let method = req.method().clone();
    let http1 = req.version() <= axum::http::Version::HTTP_11;
    // A clone of the router's own `Arc<str>`: no allocation per request.
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched
        .as_ref()
        .map_or(UNMATCHED_ROUTE, MatchedPath::as_str);
    let forwarded_id = req
        .headers()
        .get(&REQUEST_ID)
        .filter(|v| is_acceptable_request_id(v))
        .cloned();
    // An accepted id stays where it is. `HeaderMap::insert` makes room for one more line
    // before it looks for the key, and hyper sizes the request's map to the lines it
    // parsed: replacing a forwarded id in place would grow a full map on every request.
    let request_id = match forwarded_id {
        Some(id) => id,
        None => {
            let id =
                HeaderValue::try_from(uuid::Uuid::new_v4().to_string()).expect("uuid is ASCII");
            req.headers_mut().insert(REQUEST_ID, id.clone());
            id
        }
    };

    let quiet = QUIET_ROUTES.contains(&route);
    let span = if quiet {
        tracing::Span::none()
    } else {
        let span = tracing::info_span!(
            "request",
            otel.name = %format_args!("{method} {route}"),
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = %method,
            http.route = %route,
            url.path = %req.uri().path(),
            http.response.status_code = Empty,
            request_id = request_id.to_str().unwrap_or_default(),
            trace_id = Empty,
            span_id = Empty,
        );
        // A span the log filter turned off has no trace to continue.
        if !span.is_disabled() {
            telemetry::continue_trace(&span, req.headers());
        }
        span
    };

    let handler = CURRENT_REQUEST_ID.scope(
        request_id.clone(),
        tokio::time::timeout(
            observer.request_timeout,
            read_body(observer.body_limit, req, next),
        ),
    );
    let mut response = match handler.instrument(span.clone()).await {
        Ok(response) => response,
        Err(_elapsed) => span.in_scope(|| AppError::timeout().into_response()),
    };

    let status = response.status();
    if status.as_u16() >= 400 && !is_json(&response) {
        response = json_error_body(response);
    }
    response.headers_mut().insert(REQUEST_ID, request_id);
    if http1
        && observer
            .draining
            .as_ref()
            .is_some_and(Readiness::is_shutting_down)
    {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }

    let elapsed = started.elapsed();
    observer.metrics.observe_request(
        crate::metrics::method_label(&method),
        route,
        status.as_u16(),
        elapsed,
    );
    if !quiet {
        // As i64: the OpenTelemetry layer would turn a u16 into a string attribute.
        span.record("http.response.status_code", i64::from(status.as_u16()));
        if status.is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        span.in_scope(|| {
            tracing::info!(
                status = status.as_u16(),
                latency_ms = elapsed.as_micros() as f64 / 1000.0,
                "request completed"
            )
        });
    }
    response
}

/// Reads a request's whole body before its handler runs (bounded by the body limit). Handlers
/// buffer JSON bodies anyway; this also covers the answers given without looking at the
/// body (404, 405, 401, 403): a server that replies and closes with unread bytes in its
/// socket makes the kernel reset the connection, and the caller (the gateway, mid-upload)
/// loses the reply and sees a broken connection instead.
///
/// Called by [`observe`] (inside the request's timeout and span), not a `from_fn` layer of
/// its own: each layer costs a boxed future of about a kilobyte per request.
async fn read_body(limit: usize, req: Request, next: Next) -> Response {
    use axum::body::{Body, HttpBody};
    use http_body_util::BodyExt;
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => {
            next.run(Request::from_parts(parts, Body::from(collected.to_bytes())))
                .await
        }
        Err(err) if err.is::<http_body_util::LengthLimitError>() => AppError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body is larger than the configured limit",
        )
        .into_response(),
        Err(_) => AppError::bad_request("unreadable_body", "the request body could not be read")
            .into_response(),
    }
}

/// An inbound `x-request-id` worth keeping: short, printable ASCII (it lands in logs and
/// headers verbatim). Anything else is replaced with a fresh id.
pub fn is_acceptable_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.contains("+json"))
}

/// Framework-produced errors (404 fallback, 405, 413 from a limit) get the same JSON shape
/// as handler errors; headers such as `Allow` are kept.
fn json_error_body(response: Response) -> Response {
    let (mut parts, _) = response.into_parts();
    let body = AppError::from_status(parts.status).body_json();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, body.into())
}

pub(crate) fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("non-string panic payload");
    AppError::internal(anyhow::anyhow!("handler panicked: {detail}")).into_response()
}
