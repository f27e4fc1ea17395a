//! Logs and traces. One `tracing` subscriber per process: JSON lines (or pretty) filtered by
//! `RUST_LOG`, plus an OpenTelemetry layer. The OTel SDK always runs, so every request has
//! W3C trace and span ids to log and propagate; spans are exported only when an OTLP
//! endpoint is configured through the standard `OTEL_*` variables.

use std::fmt;
use std::io::IsTerminal;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanProcessor};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Span, Subscriber, span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(Self::Json),
            "pretty" | "text" => Ok(Self::Pretty),
            _ => Err("expected json or pretty".to_owned()),
        }
    }
}

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes buffered spans.
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// Installs the global subscriber and propagator. `service` names the resource unless
    /// `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` already do. Must run inside a Tokio
    /// runtime (the gRPC exporter needs one). A second call in one process (tests) keeps the
    /// first subscriber.
    pub fn init(service: &str, format: LogFormat) -> anyhow::Result<Self> {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

        let mut resource = Resource::builder();
        let named_by_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
        if !named_by_env {
            resource = resource.with_service_name(service.to_owned());
        }
        let resource = resource
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                crate::metrics::VERSION,
            ))
            .build();
        let mut builder = SdkTracerProvider::builder().with_resource(resource.clone());
        let exporting = export_configured();
        if exporting {
            let exporter = opentelemetry_otlp::SpanExporter::builder().build()?;
            let mut processor = BatchSpanProcessor::builder(exporter).build();
            processor.set_resource(&resource);
            let processor = Arc::new(processor);
            // The first init wins, like the subscriber below.
            let _ = SPAN_SINK.set(SpanSink {
                processor: processor.clone(),
                scope: opentelemetry::InstrumentationScope::builder("shop")
                    .with_version(crate::metrics::VERSION)
                    .build(),
            });
            builder = builder.with_span_processor(SharedProcessor(processor));
        }
        let provider = builder.build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        let otel = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("shop"))
            .with_error_records_to_exceptions(true);

        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let registry = tracing_subscriber::registry()
            .with(filter)
            .with(otel)
            .with(SpanFieldsLayer);
        let installed = match format {
            LogFormat::Json => registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .event_format(JsonLines)
                        .with_writer(std::io::stdout),
                )
                .try_init(),
            LogFormat::Pretty => registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(std::io::stdout().is_terminal())
                        .with_writer(std::io::stdout),
                )
                .try_init(),
        };
        if installed.is_ok() && exporting {
            tracing::info!("exporting traces over OTLP");
        }
        Ok(Self {
            provider,
            exporting,
        })
    }

    /// Flushes and stops the exporter. Blocking: call off the async workers.
    pub fn shutdown(self) {
        if self.exporting
            && let Err(err) = self.provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("telemetry: flushing spans failed: {err}");
        }
    }
}

static SPAN_SINK: OnceLock<SpanSink> = OnceLock::new();

/// Where finished spans built by hand go: the same batch exporter as the `tracing` spans,
/// for a hot path (the gateway) that makes a span only when the trace is sampled and
/// would rather not pay for a `tracing` span per request.
#[derive(Debug, Clone)]
pub struct SpanSink {
    processor: Arc<BatchSpanProcessor>,
    scope: opentelemetry::InstrumentationScope,
}

impl SpanSink {
    /// The process's sink, when [`Telemetry::init`] found an OTLP endpoint configured.
    pub fn get() -> Option<&'static SpanSink> {
        SPAN_SINK.get()
    }

    /// The instrumentation scope to put on spans handed to [`SpanSink::export`].
    pub fn scope(&self) -> &opentelemetry::InstrumentationScope {
        &self.scope
    }

    /// Queues a finished span for the batch exporter; never blocks (a full queue drops it).
    pub fn export(&self, span: SpanData) {
        self.processor.on_end(span);
    }
}

/// The provider owns its processors; this one shares the batch processor with [`SpanSink`],
/// so the provider's shutdown flushes hand-built spans too.
#[derive(Debug)]
struct SharedProcessor(Arc<BatchSpanProcessor>);

impl SpanProcessor for SharedProcessor {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.0.on_start(span, cx);
    }
    fn on_end(&self, span: SpanData) {
        self.0.on_end(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
}

/// The sampler named by `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, for code that
/// decides without the SDK (the gateway). Same names, defaults and trace-id ratio rule as
/// the SDK's, so every hop of a trace decides alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// Follow the caller's sampled flag when there is a caller.
    parent_based: bool,
    /// Roots (or every span, when not parent based) whose trace-id value is below this
    /// bound are sampled: `ratio * 2^63`, compared with the low 63 bits of the trace id.
    bound: u64,
}

impl Sampler {
    pub fn from_env() -> Self {
        let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok();
        Self::parse(
            std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref(),
            arg.as_deref(),
        )
    }

    /// Unknown names fall back to `parentbased_always_on` and a missing or bad ratio to
    /// 1.0, as the SDK does.
    pub fn parse(name: Option<&str>, arg: Option<&str>) -> Self {
        let ratio = || {
            arg.and_then(|a| a.trim().parse::<f64>().ok())
                .unwrap_or(1.0)
        };
        let (parent_based, ratio) = match name.map(str::trim).unwrap_or("parentbased_always_on") {
            "always_on" => (false, 1.0),
            "always_off" => (false, 0.0),
            "traceidratio" => (false, ratio()),
            "parentbased_always_off" => (true, 0.0),
            "parentbased_traceidratio" => (true, ratio()),
            _ => (true, 1.0),
        };
        let bound = if ratio >= 1.0 {
            u64::MAX
        } else {
            (ratio.max(0.0) * (1u64 << 63) as f64) as u64
        };
        Self {
            parent_based,
            bound,
        }
    }

    /// Whether a span in `trace_id` is sampled; `parent` is the caller's sampled flag.
    pub fn should_sample(&self, trace_id: u128, parent: Option<bool>) -> bool {
        match parent {
            Some(sampled) if self.parent_based => sampled,
            _ => self.bound == u64::MAX || ((trace_id as u64) >> 1) < self.bound,
        }
    }
}

fn export_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let exporter_none =
        std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && !exporter_none
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Continues the trace named by an inbound `traceparent` (if any) in `span`, and records
/// the span's W3C ids as `trace_id`/`span_id` fields so every log line inside it has them.
/// The span must declare both fields as `Empty`.
pub fn continue_trace(span: &Span, headers: &HeaderMap) {
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    record_ids(span);
}

/// Records `trace_id`/`span_id` on a span created as a child of the current one.
pub fn record_ids(span: &Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
        span.record("span_id", tracing::field::display(sc.span_id()));
    }
}

/// Writes the `traceparent` of `span` into outbound request headers.
pub fn inject_context(span: &Span, headers: &mut HeaderMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&cx, &mut HeaderInjector(headers))
    });
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Span fields kept as JSON so the log formatter can lift them onto each line.
struct SpanFields(Map<String, Value>);

struct SpanFieldsLayer;

impl<S> tracing_subscriber::Layer<S> for SpanFieldsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = Map::new();
        attrs.record(&mut JsonVisitor(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(SpanFields(fields)) = span.extensions_mut().get_mut::<SpanFields>()
        {
            values.record(&mut JsonVisitor(fields));
        }
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        // `otel.*` fields steer the exporter; they are noise in logs.
        if !field.name().starts_with("otel.") {
            self.0.insert(field.name().to_owned(), value);
        }
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
}

/// One JSON object per line: timestamp, level, target, message, the fields of every
/// enclosing span (outermost first, so the innermost `span_id` wins), then the event's.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>() {
                    for (k, v) in fields {
                        line.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        let mut fields = Map::new();
        event.record(&mut JsonVisitor(&mut fields));
        line.extend(fields);
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

#[cfg(test)]
mod tests {
    use super::Sampler;

    #[test]
    fn default_sampler_follows_the_parent_and_samples_roots() {
        let s = Sampler::parse(None, None);
        assert!(s.should_sample(7, None));
        assert!(s.should_sample(7, Some(true)));
        assert!(!s.should_sample(7, Some(false)));
    }

    #[test]
    fn ratio_sampler_decides_by_trace_id_like_the_sdk() {
        let s = Sampler::parse(Some("parentbased_traceidratio"), Some("0.25"));
        // Low 64 bits >> 1 below 0.25 * 2^63 are sampled; the high half is ignored.
        assert!(s.should_sample(u128::from(u64::MAX / 8), None));
        assert!(!s.should_sample((1u128 << 100) | u128::from(u64::MAX / 2), None));
        assert!(
            s.should_sample(u128::from(u64::MAX), Some(true)),
            "parent wins"
        );
        let sampled = (0..10_000u64)
            .filter(|i| s.should_sample(u128::from(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)), None))
            .count();
        assert!((2_000..3_000).contains(&sampled), "{sampled} of 10000");
    }

    #[test]
    fn non_parent_based_and_fallbacks() {
        let off = Sampler::parse(Some("always_off"), None);
        assert!(!off.should_sample(1, Some(true)));
        assert!(Sampler::parse(Some("always_on"), None).should_sample(1, Some(false)));
        let bad_arg = Sampler::parse(Some("traceidratio"), Some("lots"));
        assert!(
            bad_arg.should_sample(u128::MAX, None),
            "a bad ratio means 1.0"
        );
        let unknown = Sampler::parse(Some("xray"), None);
        assert_eq!(unknown, Sampler::parse(None, None));
        let pb_off = Sampler::parse(Some("parentbased_always_off"), None);
        assert!(!pb_off.should_sample(1, None));
        assert!(pb_off.should_sample(1, Some(true)));
    }
}
