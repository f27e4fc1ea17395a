//! RabbitMQ (AMQP 0-9-1, through `lapin`): a topic exchange routed by event type, a
//! durable queue per consumer with a dead-letter queue beside it, persistent messages,
//! publisher confirms, manual acks, and reconnection with a growing pause.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;

use super::consume::{Consumer, EventMetrics, Outcome, deliver};
use super::outbox::{Message, Publisher, Unconfirmed};
use super::{EXCHANGE, QUEUES, Queue};

/// Where a queue's poison messages go: `<queue>.dead`, through this exchange.
pub const DEAD_LETTER_EXCHANGE: &str = "shop.events.dead";
/// Deliveries a consumer may hold unacknowledged. 128 rather than 32: with the relay's
/// linger a publication brings tens of events at once, and applying up to 64 of them
/// together took the user service's CPU per consumed order from 56-59 to 49-52 us.
const PREFETCH: u16 = 128;
/// Deliveries applied at once, at most: half the prefetch window, as acks are.
pub const MAX_BATCH: u16 = PREFETCH / 2;
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// lapin keeps two buffers of 32 frames per connection, sized by the negotiated frame
/// size: at RabbitMQ's default (128 KiB) that is 8 MiB resident per connection, measured.
/// Events are small (an order of 100 lines is about 10 KiB, and a larger body is split
/// into frames), so the smallest frames lapin accepts, 8 KiB: 512 KiB per connection
/// (against 16 KiB frames, 0.5 MiB off the order service's two connections at peak, when
/// its relay and consumer still had one each).
const FRAME_MAX: u32 = 8 * 1024;
/// A broker that does not answer the TCP connect within this is retried later.
const CONNECT_TIMEOUT_MS: u64 = 5_000;

/// `AMQP_URL` as lapin takes it, with this project's frame size and connect timeout
/// unless the URL sets them (`?frame_max=`, `?connection_timeout=`).
pub fn endpoint(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.parse()?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    uri.query
        .connection_timeout
        .get_or_insert(CONNECT_TIMEOUT_MS);
    Ok(uri)
}

pub fn dead_letter_queue(queue: &Queue) -> String {
    format!("{}.dead", queue.name)
}

/// A service's one connection to the broker, shared by its relay and its consumers,
/// each on a channel of its own: RabbitMQ's advice (a connection per process, a channel
/// per task), and lapin keeps 512 KiB of frame buffers per connection (see
/// [`FRAME_MAX`]). Made on first use, and again once it has dropped. Clones share it.
#[derive(Clone)]
pub struct AmqpLink(Arc<LinkState>);

struct LinkState {
    uri: AMQPUri,
    service: String,
    connection: Mutex<Option<Connection>>,
}

impl AmqpLink {
    /// `url` must pass [`endpoint`] (`AMQP_URL` is checked at start-up). The broker
    /// shows the connection under `service`'s name.
    pub fn new(url: &str, service: &str) -> Self {
        Self(Arc::new(LinkState {
            uri: endpoint(url).expect("a valid amqp:// URL"),
            service: service.to_owned(),
            connection: Mutex::new(None),
        }))
    }

    /// A new channel on the connection, connecting first if it is not up; the topology
    /// is declared on each new connection. A channel closes when its last handle drops.
    async fn channel(&self) -> Result<Channel, lapin::Error> {
        let mut connection = self.0.connection.lock().await;
        if let Some(up) = connection.as_ref().filter(|c| c.status().connected()) {
            match up.create_channel().await {
                Ok(channel) => return Ok(channel),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot open a channel; connecting again")
                }
            }
        }
        let properties =
            ConnectionProperties::default().with_connection_name(self.0.service.as_str().into());
        let fresh = Connection::connect_uri(self.0.uri.clone(), properties).await?;
        let channel = fresh.create_channel().await?;
        declare_topology(&channel).await?;
        *connection = Some(fresh);
        Ok(channel)
    }
}

/// A confirming channel on the service's [`AmqpLink`], opened on first use and again
/// after a failure.
pub struct AmqpPublisher {
    link: AmqpLink,
    channel: Mutex<Option<Channel>>,
}

impl AmqpPublisher {
    pub fn new(link: AmqpLink) -> Self {
        Self {
            link,
            channel: Mutex::new(None),
        }
    }
}

/// Declares the exchanges and every queue of [`QUEUES`], idempotently: publishers and
/// consumers both do, so whichever starts first, no event is published to nowhere.
async fn declare_topology(channel: &Channel) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            DEAD_LETTER_EXCHANGE.into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    for queue in QUEUES {
        let dead = dead_letter_queue(queue);
        channel
            .queue_declare(
                dead.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                dead.as_str().into(),
                DEAD_LETTER_EXCHANGE.into(),
                queue.name.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(queue.name.into()),
        );
        channel
            .queue_declare(queue.name.into(), QueueDeclareOptions::durable(), arguments)
            .await?;
        for topic in queue.topics {
            channel
                .queue_bind(
                    queue.name.into(),
                    EXCHANGE.into(),
                    (*topic).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    Ok(())
}

#[async_trait]
impl Publisher for AmqpPublisher {
    async fn publish(&self, messages: &[Message]) -> Result<(), Unconfirmed> {
        let mut channel = self.channel.lock().await;
        if channel.as_ref().is_none_or(|ch| !ch.status().connected()) {
            let fresh = self
                .link
                .channel()
                .await
                .map_err(|err| unconfirmed(0, "cannot reach the broker", err))?;
            fresh
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|err| unconfirmed(0, "cannot turn on publisher confirms", err))?;
            *channel = Some(fresh);
        }
        let result = publish_confirmed(channel.as_ref().expect("opened above"), messages).await;
        if result.is_err() {
            // Whatever broke, start the next batch on a fresh channel (and connection,
            // if that is what broke).
            *channel = None;
        }
        result
    }
}

/// Publishes the batch without waiting in between, then takes the confirms in order.
///
/// Every message's frames are queued before any write is waited for, so the
/// connection's I/O thread writes the batch at once. Awaited one by one, each message
/// woke that thread and then this task again, and reached the broker in a write of its
/// own: under the order load, that thread switched 1.5 times an order (now 0.16), and
/// RabbitMQ's threads 3.4-4.0 times (now 1.2-1.3).
async fn publish_confirmed(channel: &Channel, messages: &[Message]) -> Result<(), Unconfirmed> {
    let mut sends = Vec::with_capacity(messages.len());
    for message in messages {
        let mut send = Box::pin(channel.basic_publish(
            EXCHANGE.into(),
            message.kind.as_str().into(),
            BasicPublishOptions::default(),
            message.body.as_bytes(),
            properties(message),
        ));
        // lapin takes the message's delivery tag and queues its frames when the publish
        // is first polled, before it waits for the write: polled here, in turn, the
        // messages keep their order.
        let first = std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await;
        let refused = matches!(first, Poll::Ready(Err(_)));
        sends.push((send, first));
        if refused {
            break;
        }
    }
    let mut pending = Vec::with_capacity(sends.len());
    for (sent, (send, first)) in sends.into_iter().enumerate() {
        let written = match first {
            Poll::Ready(written) => written,
            Poll::Pending => send.await,
        };
        match written {
            Ok(confirm) => pending.push(confirm),
            Err(err) => {
                // What was sent before may still be confirmed: wait for it. The messages
                // queued after this one may reach the broker too; they count as
                // unconfirmed, go out again, and consumers' inboxes drop the copies.
                let confirmed = await_confirms(pending).await;
                return Err(unconfirmed(confirmed.min(sent), "publishing failed", err));
            }
        }
    }
    let total = pending.len();
    let confirmed = await_confirms(pending).await;
    if confirmed == total {
        Ok(())
    } else {
        Err(Unconfirmed {
            confirmed,
            reason: "the broker refused (nacked) or lost a message".into(),
        })
    }
}

/// What every event is published with: persistent, its id and kind, its trace context.
fn properties(message: &Message) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(traceparent) = &message.traceparent {
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(traceparent.as_str().into()),
        );
    }
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2) // persistent
        .with_message_id(message.event_id.as_str().into())
        .with_type(message.kind.as_str().into())
        .with_headers(headers)
}

/// How many confirms from the front were acks.
async fn await_confirms(pending: Vec<lapin::PublisherConfirm>) -> usize {
    let mut confirmed = 0;
    for confirm in pending {
        match confirm.await {
            Ok(Confirmation::Ack(_)) => confirmed += 1,
            _ => break,
        }
    }
    confirmed
}

fn unconfirmed(confirmed: usize, what: &str, err: lapin::Error) -> Unconfirmed {
    Unconfirmed {
        confirmed,
        reason: format!("{what}: {err}"),
    }
}

/// Consumes `consumer`'s queue until the task is aborted, reconnecting after any failure.
/// Each delivery is acked once applied (or found applied before), dead-lettered if it can
/// never be applied, and requeued after a pause if it cannot be applied now.
pub fn spawn_consumer(
    link: &AmqpLink,
    consumer: Arc<dyn Consumer>,
    metrics: EventMetrics,
) -> tokio::task::JoinHandle<()> {
    let link = link.clone();
    let name = format!("{} consumer of {}", link.0.service, consumer.queue().name);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match consume(&link, &name, consumer.as_ref(), &metrics, &mut backoff).await {
                Ok(()) => tracing::warn!(
                    queue = consumer.queue().name,
                    "the broker ended the subscription; subscribing again"
                ),
                Err(err) => {
                    tracing::warn!(queue = consumer.queue().name, error = %err, "lost the broker; reconnecting")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    })
}

async fn consume(
    link: &AmqpLink,
    name: &str,
    consumer: &dyn Consumer,
    metrics: &EventMetrics,
    backoff: &mut Duration,
) -> Result<(), lapin::Error> {
    let queue = consumer.queue().name;
    // Dropped on return, which closes it: the broker requeues what it still holds.
    let channel = link.channel().await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            name.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue, "consuming events");
    *backoff = Duration::from_millis(100);
    let mut retry_pause = Duration::from_millis(100);
    let mut unacked = Unacked::default();
    let mut ended = false;
    while !ended {
        // While more deliveries are already here their acks wait, then go as one: under
        // load one ack frame per batch instead of one per event; idle, at once.
        let first = match deliveries.next().now_or_never() {
            Some(next) => next,
            None => {
                unacked.ack().await?;
                deliveries.next().await
            }
        };
        let Some(first) = first else { break };
        let mut batch = vec![first?];
        while batch.len() < usize::from(MAX_BATCH) {
            match deliveries.next().now_or_never() {
                Some(Some(delivery)) => batch.push(delivery?),
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        // The deliveries already here are applied together: on SQLite their writes share
        // one commit of the batch thread, on PostgreSQL they use the pool's connections.
        // Their order is not kept, as the broker does not keep it when it requeues.
        let outcomes = futures_util::future::join_all(
            batch
                .iter()
                .map(|delivery| handle(consumer, metrics, delivery)),
        )
        .await;
        // Settled in delivery order: a `multiple` ack covers every earlier delivery, so
        // the ones to nack go before any later ack.
        let mut paused = false;
        for (delivery, outcome) in batch.into_iter().zip(outcomes) {
            match outcome {
                Outcome::Done(_) => {
                    retry_pause = Duration::from_millis(100);
                    unacked.push(delivery.acker).await?;
                }
                Outcome::DeadLetter(_) => {
                    unacked.ack().await?;
                    delivery
                        .nack(BasicNackOptions {
                            requeue: false,
                            ..Default::default()
                        })
                        .await?;
                }
                Outcome::Retry(_) => {
                    unacked.ack().await?;
                    // Back to the queue after a pause (once per batch), so a database
                    // outage is not a spin.
                    if !paused {
                        tokio::time::sleep(retry_pause).await;
                        retry_pause = (retry_pause * 2).min(MAX_BACKOFF);
                        paused = true;
                    }
                    delivery
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await?;
                }
            }
        }
    }
    unacked.ack().await?;
    Ok(())
}

async fn handle(
    consumer: &dyn Consumer,
    metrics: &EventMetrics,
    delivery: &lapin::message::Delivery,
) -> Outcome {
    let traceparent = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("traceparent"))
        .and_then(|v| match v {
            AMQPValue::LongString(s) => Some(s.to_string()),
            _ => None,
        });
    deliver(
        "rabbitmq",
        consumer,
        metrics,
        &delivery.data,
        traceparent.as_deref(),
        delivery.redelivered,
    )
    .await
}

/// Deliveries handled but not yet acknowledged, settled with one `multiple` ack of the
/// newest. Were the connection lost first, the broker would deliver them again and the
/// inbox would skip them: events are at least once either way.
#[derive(Default)]
struct Unacked {
    newest: Option<Acker>,
    count: u16,
}

impl Unacked {
    /// Half the prefetch window at most, so the broker never stalls waiting for acks.
    const MAX: u16 = PREFETCH / 2;

    async fn push(&mut self, acker: Acker) -> Result<(), lapin::Error> {
        self.newest = Some(acker);
        self.count += 1;
        if self.count >= Self::MAX {
            self.ack().await?;
        }
        Ok(())
    }

    async fn ack(&mut self) -> Result<(), lapin::Error> {
        self.count = 0;
        if let Some(newest) = self.newest.take() {
            newest.ack(BasicAckOptions { multiple: true }).await?;
        }
        Ok(())
    }
}

/// Messages waiting in `queue` (which must exist): for operators and tests.
pub async fn queue_depth(url: &str, queue: &str) -> Result<u32, lapin::Error> {
    Ok(queue_status(url, queue).await?.messages)
}

/// What the broker says of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStatus {
    /// Ready for delivery (not counting those delivered and not yet acknowledged).
    pub messages: u32,
    pub consumers: u32,
}

/// Messages waiting in `queue` (which must exist) and consumers subscribed to it.
pub async fn queue_status(url: &str, queue: &str) -> Result<QueueStatus, lapin::Error> {
    let uri = endpoint(url).expect("a valid amqp:// URL");
    let connection = Connection::connect_uri(uri, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(QueueStatus {
        messages: declared.message_count(),
        consumers: declared.consumer_count(),
    })
}
