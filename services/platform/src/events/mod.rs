//! Domain events, delivered at least once and applied once.
//!
//! - A service writes each event to its `outbox` table in the transaction that makes
//!   the change ([`NewEvent`]), so an event exists if and only if its change committed.
//! - A relay ([`outbox::spawn_relay`]) publishes unsent rows in order and marks them sent
//!   only once the broker has confirmed them; a crash in between publishes them again.
//! - A consumer ([`Consumer`]) records each event id in its `inbox` table in the
//!   transaction that applies the event ([`inbox::first_delivery`]), so a repeat
//!   delivery changes nothing.
//!
//! The broker is RabbitMQ when one is configured, else [`local::LocalBroker`]: the same
//! outbox and consumers, delivered in-process (the local launcher runs every service in
//! one process).

pub mod amqp;
pub mod consume;
pub mod inbox;
pub mod local;
pub mod outbox;
pub mod setup;

use serde::{Deserialize, Serialize};

pub use consume::{Consumer, EventMetrics, Handled, Rejection};
pub use local::LocalBroker;
pub use outbox::{Outbox, Publisher};
pub use setup::{Broker, Running};

/// The topic exchange every event is published to, routed by its type.
pub const EXCHANGE: &str = "shop.events";

/// Which queue receives which event types. Publishers and consumers declare the same
/// list, so an event published before its consumer first starts waits in its queue.
pub const QUEUES: &[Queue] = &[
    Queue {
        name: "product.order-cancelled",
        topics: &["order.cancelled"],
    },
    Queue {
        name: "order.stock-released",
        topics: &["stock.released"],
    },
    Queue {
        name: "user.order-counts",
        topics: &["order.placed", "order.cancelled"],
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    /// `<consuming service>.<purpose>`.
    pub name: &'static str,
    /// Event types routed to it.
    pub topics: &'static [&'static str],
}

impl Queue {
    pub fn named(name: &str) -> Option<&'static Queue> {
        QUEUES.iter().find(|q| q.name == name)
    }

    /// The queues an event of `kind` is routed to.
    pub fn routed(kind: &str) -> impl Iterator<Item = &'static Queue> + '_ {
        QUEUES.iter().filter(move |q| q.topics.contains(&kind))
    }
}

/// The envelope every event travels in. `version` is the version of `data`'s schema for
/// this `type`: fields may be added within a version; a field removed or changed in
/// meaning is a new version, published beside the old until its consumers moved.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u32,
    /// RFC 3339, UTC.
    pub occurred_at: String,
    /// Kept as the text it came in, and parsed once, into the consumer's own type: a
    /// `serde_json::Value` would allocate every field and string of it on the way.
    pub data: Box<serde_json::value::RawValue>,
}

impl Event {
    /// `data` as the consumer's own type; a mismatch is a poison message.
    pub fn data<T: serde::de::DeserializeOwned>(&self) -> Result<T, Rejection> {
        serde_json::from_str(self.data.get()).map_err(|err| {
            Rejection::Poison(format!("{} v{} data: {err}", self.kind, self.version))
        })
    }
}

/// An event ready to be written to the outbox, in the writer's own transaction.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: String,
    pub kind: &'static str,
    /// The serialised [`Event`].
    pub body: String,
    /// The W3C `traceparent` of the change, so the consumer's work joins its trace.
    pub traceparent: Option<String>,
    pub created_at_ms: i64,
}

impl NewEvent {
    pub fn new(kind: &'static str, data: &impl Serialize) -> Self {
        /// [`Event`]'s fields, borrowed: `data` is written straight into the body instead
        /// of through a `serde_json::Value` tree (an allocation per field and string).
        #[derive(Serialize)]
        struct Envelope<'a, T> {
            id: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            version: u32,
            occurred_at: &'a str,
            data: &'a T,
        }
        let now = chrono::Utc::now();
        let id = uuid::Uuid::now_v7().to_string();
        let occurred_at = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let envelope = Envelope {
            id: &id,
            kind,
            version: 1,
            occurred_at: &occurred_at,
            data,
        };
        let body = serde_json::to_string(&envelope).expect("event serialises");
        Self {
            id,
            kind,
            body,
            traceparent: current_traceparent(),
            created_at_ms: now.timestamp_millis(),
        }
    }

    /// Writes the event to the outbox on `conn`, which should be inside the transaction
    /// that makes the change.
    pub async fn append(&self, conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO outbox (event_id, kind, body, traceparent, created_at_ms)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&self.id)
        .bind(self.kind)
        .bind(&self.body)
        .bind(&self.traceparent)
        .bind(self.created_at_ms)
        .execute(conn)
        .await?;
        Ok(())
    }
}

fn current_traceparent() -> Option<String> {
    let mut headers = http::HeaderMap::new();
    crate::telemetry::inject_context(&tracing::Span::current(), &mut headers);
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_is_named_by_its_consumer_and_routes_known_types() {
        for queue in QUEUES {
            let (service, purpose) = queue.name.split_once('.').expect("service.purpose");
            assert!(["product", "order", "user"].contains(&service), "{queue:?}");
            assert!(!purpose.is_empty() && !queue.topics.is_empty(), "{queue:?}");
        }
        assert_eq!(
            Queue::routed("order.cancelled")
                .map(|q| q.name)
                .collect::<Vec<_>>(),
            ["product.order-cancelled", "user.order-counts"]
        );
        assert_eq!(Queue::routed("order.unknown").count(), 0);
    }

    #[test]
    fn an_event_round_trips_and_bad_data_is_poison() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Data {
            order_id: String,
        }
        let new = NewEvent::new(
            "order.cancelled",
            &Data {
                order_id: "7".into(),
            },
        );
        let event: Event = serde_json::from_str(&new.body).unwrap();
        assert_eq!(
            (event.id.as_str(), event.kind.as_str()),
            (new.id.as_str(), "order.cancelled")
        );
        assert_eq!(
            event.data::<Data>().unwrap(),
            Data {
                order_id: "7".into()
            }
        );
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Other {
            reservation_id: String,
        }
        assert!(matches!(event.data::<Other>(), Err(Rejection::Poison(_))));
    }
}
