//! The RabbitMQ consumer loop against a real broker, with a consumer scripted per event:
//! what it applies, refuses for good, or cannot apply yet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shop_platform::Metrics;
use shop_platform::events::amqp::{
    AmqpLink, AmqpPublisher, MAX_BATCH, dead_letter_queue, queue_depth, spawn_consumer,
};
use shop_platform::events::outbox::Message;
use shop_platform::events::{Consumer, Event, EventMetrics, Handled, Publisher, Queue, Rejection};
use shop_platform::testing::RabbitMq;

const QUEUE: &str = "order.stock-released";

/// Applies each event once; `poison-*` ids can never be applied, `flaky-*` ids cannot be
/// the first time they come.
#[derive(Default)]
struct Scripted {
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    seen: Mutex<HashMap<String, u32>>,
}

#[async_trait]
impl Consumer for Scripted {
    fn queue(&self) -> &'static Queue {
        Queue::named(QUEUE).unwrap()
    }

    async fn handle(&self, event: &Event) -> Result<Handled, Rejection> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        // Long enough for the deliveries already here to be in flight together.
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let times = {
            let mut seen = self.seen.lock().unwrap();
            let times = seen.entry(event.id.clone()).or_default();
            *times += 1;
            *times
        };
        if event.id.starts_with("poison-") {
            return Err(Rejection::Poison("scripted".into()));
        }
        if event.id.starts_with("flaky-") && times == 1 {
            return Err(Rejection::Retry("scripted".into()));
        }
        Ok(Handled::Applied)
    }
}

fn event(id: &str) -> Message {
    let body = serde_json::json!({
        "id": id, "type": "stock.released", "version": 1,
        "occurred_at": "2026-12-05T00:00:00Z", "data": {}
    });
    Message {
        event_id: id.to_owned(),
        kind: "stock.released".into(),
        body: body.to_string(),
        traceparent: None,
        attempt: 0,
    }
}

/// A burst already waiting when the consumer starts is applied a batch at a time, and
/// each delivery of a batch is settled by its own outcome: the applied ones acked, the
/// poison dead-lettered, the ones that could not be applied yet delivered again.
#[tokio::test]
async fn a_waiting_burst_is_applied_in_batches_each_delivery_settled_by_its_outcome() {
    let Some(rabbit) = RabbitMq::start("a_waiting_burst_is_applied_in_batches") else {
        return;
    };
    // More than two batches' worth, so a batch has to end before the burst does.
    let ids: Vec<String> = (0..150)
        .map(|n| match n % 10 {
            3 => format!("poison-{n}"),
            7 => format!("flaky-{n}"),
            _ => format!("good-{n}"),
        })
        .collect();
    let burst: Vec<Message> = ids.iter().map(|id| event(id)).collect();
    AmqpPublisher::new(AmqpLink::new(&rabbit.url, "test"))
        .publish(&burst)
        .await
        .unwrap();

    let consumer = Arc::new(Scripted::default());
    let metrics = EventMetrics::new(&Metrics::new("test"), &[], &[Queue::named(QUEUE).unwrap()]);
    let task = spawn_consumer(
        &AmqpLink::new(&rabbit.url, "test"),
        consumer.clone(),
        metrics,
    );

    let dead = dead_letter_queue(Queue::named(QUEUE).unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let settled = {
            let seen = consumer.seen.lock().unwrap();
            ids.iter().all(|id| {
                let wanted = if id.starts_with("flaky-") { 2 } else { 1 };
                seen.get(id).copied().unwrap_or(0) >= wanted
            })
        };
        if settled
            && queue_depth(&rabbit.url, QUEUE).await.unwrap() == 0
            && queue_depth(&rabbit.url, &dead).await.unwrap() == 15
        {
            break;
        }
        assert!(Instant::now() < deadline, "the burst never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing comes a further time: each applied delivery was acked once applied.
    tokio::time::sleep(Duration::from_millis(500)).await;
    task.abort();
    let seen = consumer.seen.lock().unwrap();
    for id in &ids {
        let wanted = if id.starts_with("flaky-") { 2 } else { 1 };
        assert_eq!(seen[id], wanted, "{id}");
    }
    let most = consumer.most_in_flight.load(Ordering::SeqCst);
    assert!(most > 1, "one delivery at a time ({most} at most)");
    assert!(
        most <= usize::from(MAX_BATCH),
        "{most} deliveries at once, more than a batch"
    );
}

/// A batch is published at once (every message's frames queued before any is written),
/// and still reaches the queue in the batch's order, every message confirmed.
#[tokio::test]
async fn a_published_batch_reaches_the_queue_in_its_order() {
    let Some(rabbit) = RabbitMq::start("a_published_batch_reaches_the_queue_in_its_order") else {
        return;
    };
    let ids: Vec<String> = (0..300).map(|n| format!("e{n:03}")).collect();
    let batch: Vec<Message> = ids.iter().map(|id| event(id)).collect();
    AmqpPublisher::new(AmqpLink::new(&rabbit.url, "test"))
        .publish(&batch)
        .await
        .expect("every message confirmed");

    let uri: lapin::uri::AMQPUri = rabbit.url.parse().unwrap();
    let connection = lapin::Connection::connect_uri(uri, Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut arrived = Vec::new();
    while let Some(message) = channel
        .basic_get(
            QUEUE.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let id = message.delivery.properties.message_id().clone().unwrap();
        arrived.push(id.to_string());
    }
    assert_eq!(arrived, ids);
}

/// This process's established TCP connections to `port` on 127.0.0.1.
fn connections_to(port: u16) -> usize {
    let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let remote = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/self/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        // local, remote, state (01: established), ..., inode
        .filter(|f| f[2] == remote && f[3] == "01" && ours.contains(f[9]))
        .count()
}

/// A service's relay and consumers share one connection to the broker, each on a
/// channel of its own.
#[tokio::test]
async fn a_publisher_and_a_consumer_on_one_link_share_one_connection() {
    let Some(rabbit) = RabbitMq::start("a_publisher_and_a_consumer_on_one_link") else {
        return;
    };
    let port: u16 = rabbit
        .url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next()?.parse().ok())
        .expect("the node's URL names its port");
    let link = AmqpLink::new(&rabbit.url, "test");
    let consumer = Arc::new(Scripted::default());
    let metrics = EventMetrics::new(&Metrics::new("test"), &[], &[Queue::named(QUEUE).unwrap()]);
    let task = spawn_consumer(&link, consumer.clone(), metrics);
    let publisher = AmqpPublisher::new(link.clone());
    publisher.publish(&[event("good-1")]).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while !consumer.seen.lock().unwrap().contains_key("good-1") {
        assert!(Instant::now() < deadline, "the event never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(connections_to(port), 1);
    // Both keep working on it.
    publisher.publish(&[event("good-2")]).await.unwrap();
    while !consumer.seen.lock().unwrap().contains_key("good-2") {
        assert!(Instant::now() < deadline, "the second event never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(connections_to(port), 1);
    task.abort();
}
