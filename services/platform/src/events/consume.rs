//! The consuming side: what a consumer implements, and the delivery of one message to
//! it (parsing, the trace, metrics), shared by every broker.

use async_trait::async_trait;
use prometheus::{Gauge, GaugeVec, IntCounterVec, IntGauge, Opts};
use tracing::Instrument;

use super::{Event, Queue};
use crate::Metrics;

/// What a consumer made of an event it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    Applied,
    /// Its id was in the inbox already: a redelivery, and nothing was changed.
    Duplicate,
}

/// Why a consumer did not accept an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// It can never be applied (unparseable, unknown version, refers to nothing): it goes
    /// to the dead-letter queue and the queue moves on.
    Poison(String),
    /// It could not be applied now (the database is away): deliver it again later.
    Retry(String),
}

impl From<sqlx::Error> for Rejection {
    fn from(err: sqlx::Error) -> Self {
        Rejection::Retry(format!("database: {err}"))
    }
}

#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// Its queue in [`super::QUEUES`].
    fn queue(&self) -> &'static Queue;
    /// Applies `event` once: the event id goes into the inbox in the same transaction
    /// as the effect (see [`super::inbox::first_delivery`]). Deliveries that arrive
    /// together are handled concurrently, so the effect must not depend on their order
    /// (a broker does not keep it either once it requeues one).
    async fn handle(&self, event: &Event) -> Result<Handled, Rejection>;
}

/// What became of one delivery, for the broker to ack, dead-letter or requeue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done(Handled),
    DeadLetter(String),
    Retry(String),
}

/// Event metrics of one service, for its relay and its consumers.
#[derive(Clone)]
pub struct EventMetrics {
    pub(crate) published: IntCounterVec,
    pub(crate) consumed: IntCounterVec,
    pub(crate) redelivered: IntCounterVec,
    pub(crate) lag: GaugeVec,
    pub(crate) pending: IntGauge,
    pub(crate) oldest_pending_age: Gauge,
}

impl EventMetrics {
    /// Registers the series for the event types this service publishes and the queues
    /// it consumes, each at 0 from the start.
    pub fn new(metrics: &Metrics, publishes: &[&str], consumes: &[&Queue]) -> Self {
        let registry = metrics.registry();
        let register = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("event metrics registered once");
        };
        let published = IntCounterVec::new(
            Opts::new(
                "events_published_total",
                "Events the broker confirmed, by type.",
            ),
            &["type"],
        )
        .expect("valid metric");
        let consumed = IntCounterVec::new(
            Opts::new(
                "events_consumed_total",
                "Deliveries handled, by queue and outcome: applied, duplicate (already in the inbox), dead_lettered, retried.",
            ),
            &["queue", "outcome"],
        )
        .expect("valid metric");
        let redelivered = IntCounterVec::new(
            Opts::new(
                "events_redelivered_total",
                "Deliveries the broker marked as sent before (a consumer died or refused).",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let lag = GaugeVec::new(
            Opts::new(
                "events_consumer_lag_seconds",
                "Seconds between the last handled event's occurrence and its handling.",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let pending = IntGauge::new(
            "outbox_pending_events",
            "Outbox rows not yet confirmed by the broker.",
        )
        .expect("valid metric");
        let oldest_pending_age = Gauge::new(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest event not yet confirmed by the broker (0 when none waits).",
        )
        .expect("valid metric");
        for kind in publishes {
            published.with_label_values(&[*kind]);
        }
        for queue in consumes {
            for outcome in ["applied", "duplicate", "dead_lettered", "retried"] {
                consumed.with_label_values(&[queue.name, outcome]);
            }
            redelivered.with_label_values(&[queue.name]);
            lag.with_label_values(&[queue.name]);
        }
        if !publishes.is_empty() {
            register(Box::new(pending.clone()));
            register(Box::new(oldest_pending_age.clone()));
            register(Box::new(published.clone()));
        }
        if !consumes.is_empty() {
            register(Box::new(consumed.clone()));
            register(Box::new(redelivered.clone()));
            register(Box::new(lag.clone()));
        }
        Self {
            published,
            consumed,
            redelivered,
            lag,
            pending,
            oldest_pending_age,
        }
    }
}

/// Delivers one message body to `consumer`, in a span that continues the publisher's
/// trace, and counts the outcome. `system`: the broker, as the span's `messaging.system`.
pub async fn deliver(
    system: &'static str,
    consumer: &dyn Consumer,
    metrics: &EventMetrics,
    body: &[u8],
    traceparent: Option<&str>,
    redelivered: bool,
) -> Outcome {
    let queue = consumer.queue().name;
    if redelivered {
        metrics.redelivered.with_label_values(&[queue]).inc();
    }
    let span = tracing::info_span!(
        "event",
        otel.name = format!("{queue} process"),
        otel.kind = "consumer",
        messaging.system = system,
        messaging.destination.name = queue,
        messaging.message.id = tracing::field::Empty,
        event.r#type = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    let mut headers = http::HeaderMap::new();
    if let Some(value) = traceparent.and_then(|v| http::HeaderValue::from_str(v).ok()) {
        headers.insert("traceparent", value);
    }
    crate::telemetry::continue_trace(&span, &headers);
    let outcome = async {
        let event: Event = match serde_json::from_slice(body) {
            Ok(event) => event,
            Err(err) => return Outcome::DeadLetter(format!("not an event envelope: {err}")),
        };
        let span = tracing::Span::current();
        span.record("messaging.message.id", event.id.as_str());
        span.record("event.type", event.kind.as_str());
        let outcome = match consumer.handle(&event).await {
            Ok(handled) => Outcome::Done(handled),
            Err(Rejection::Poison(reason)) => Outcome::DeadLetter(reason),
            Err(Rejection::Retry(reason)) => Outcome::Retry(reason),
        };
        if let Ok(at) = chrono::DateTime::parse_from_rfc3339(&event.occurred_at) {
            let lag = (chrono::Utc::now() - at.to_utc()).num_milliseconds().max(0);
            metrics
                .lag
                .with_label_values(&[queue])
                .set(lag as f64 / 1000.0);
        }
        outcome
    }
    .instrument(span)
    .await;
    let label = match &outcome {
        Outcome::Done(Handled::Applied) => "applied",
        Outcome::Done(Handled::Duplicate) => "duplicate",
        Outcome::DeadLetter(reason) => {
            tracing::error!(queue, reason, "dead-lettered an event it can never apply");
            "dead_lettered"
        }
        Outcome::Retry(reason) => {
            tracing::warn!(
                queue,
                reason,
                "could not apply an event now; it will be delivered again"
            );
            "retried"
        }
    };
    metrics.consumed.with_label_values(&[queue, label]).inc();
    outcome
}
