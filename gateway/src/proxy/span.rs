//! The gateway's server span for a sampled request, without a `tracing` span per request:
//! built after the response from data the request path already has, and only when an OTLP
//! endpoint is configured. The ids come from the trace-context headers (`http::trace`).

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::{Instant, SystemTime};

use http::{Method, StatusCode};
use opentelemetry::KeyValue;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry_sdk::trace::SpanData;
use shop_platform::telemetry::SpanSink;

use crate::http::trace::TraceIds;

/// What a sampled request's span records beyond what the proxy keeps anyway; captured
/// before the request is consumed, and only for sampled requests.
pub struct SpanStart {
    pub path: String,
    pub user_agent: Option<String>,
    pub started: Instant,
}

impl SpanStart {
    pub fn capture(request: &http::Request<impl Sized>, started: Instant) -> Self {
        Self {
            path: request.uri().path().to_owned(),
            user_agent: request
                .headers()
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            started,
        }
    }
}

/// The gateway's server span for one request, named and attributed per the OpenTelemetry
/// HTTP conventions; 5xx marks it as an error.
#[allow(clippy::too_many_arguments)]
pub fn export(
    sink: &SpanSink,
    ids: &TraceIds,
    start: SpanStart,
    method: &Method,
    route: &str,
    status: StatusCode,
    client: IpAddr,
    upstream: Option<&str>,
) {
    let elapsed = start.started.elapsed();
    let end_time = SystemTime::now();
    let start_time = end_time.checked_sub(elapsed).unwrap_or(end_time);
    let method_label = shop_platform::metrics::method_label(method);
    let mut attributes = Vec::with_capacity(9);
    attributes.extend([
        KeyValue::new("http.request.method", method_label),
        KeyValue::new("http.route", route.to_owned()),
        KeyValue::new("url.path", start.path),
        KeyValue::new("url.scheme", "http"),
        KeyValue::new("http.response.status_code", i64::from(status.as_u16())),
        KeyValue::new("client.address", client.to_string()),
    ]);
    if let Some(agent) = start.user_agent {
        attributes.push(KeyValue::new("user_agent.original", agent));
    }
    if let Some(upstream) = upstream {
        attributes.push(KeyValue::new("shop.upstream", upstream.to_owned()));
    }
    let status = if status.is_server_error() {
        attributes.push(KeyValue::new("error.type", status.as_str().to_owned()));
        Status::error(status.canonical_reason().unwrap_or("server error"))
    } else {
        Status::Unset
    };
    sink.export(SpanData {
        span_context: SpanContext::new(
            TraceId::from(ids.trace_id),
            SpanId::from(ids.span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        parent_span_id: ids.parent_span_id.map_or(SpanId::INVALID, SpanId::from),
        parent_span_is_remote: ids.parent_span_id.is_some(),
        span_kind: SpanKind::Server,
        name: Cow::Owned(format!("{method_label} {route}")),
        start_time,
        end_time,
        attributes,
        dropped_attributes_count: 0,
        events: Default::default(),
        links: Default::default(),
        status,
        instrumentation_scope: sink.scope().clone(),
    });
}
