//! The product service consuming `order.cancelled` from a real RabbitMQ node
//! (scripts/rabbitmq-node): killed with SIGKILL mid-stream, redelivered to, fed
//! duplicates and poison, it returns every reservation's stock exactly once.

mod common;

use common::{cancelled, message};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shop_platform::events::amqp::{
    AmqpLink, AmqpPublisher, dead_letter_queue, queue_depth, queue_status,
};
use shop_platform::events::{Publisher, Queue};
use shop_platform::testing::{RabbitMq, ServiceProcess, metric_sum};
use sqlx::Connection;

const RESERVATIONS: usize = 100;

fn start_product(data_dir: &std::path::Path, amqp_url: &str) -> ServiceProcess {
    ServiceProcess::spawn(
        Command::new(env!("CARGO_BIN_EXE_product"))
            .env_clear()
            .env("PORT", "0")
            .env("AUTH_MODE", "demo")
            .env("HOST", "127.0.0.1")
            .env("RUST_LOG", "warn,shop_platform::server=info")
            .env("DATA_DIR", data_dir)
            .env("AMQP_URL", amqp_url)
            .stderr(Stdio::inherit()),
    )
}

async fn stock(http: &reqwest::Client, url: &str) -> i64 {
    let product: Value = http
        .get(format!("{url}/products/2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    product["quantity"].as_i64().unwrap()
}

/// Reservations `r0`, `r1`, ... of one unit of product 2 each.
async fn hold_one_unit_each(http: &reqwest::Client, url: &str, count: usize) {
    for n in 0..count {
        let r = http
            .post(format!("{url}/reservations"))
            .json(&json!({"id": format!("r{n}"), "items": [{"product_id": "2", "quantity": 1}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
}

#[tokio::test]
async fn killed_mid_stream_and_fed_duplicates_it_returns_every_unit_once() {
    let Some(rabbit) = RabbitMq::start("killed_mid_stream_and_fed_duplicates") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut product = start_product(dir.path(), &rabbit.url);
    let http = reqwest::Client::new();
    // Product 2 starts with 100 units: one reservation takes each.
    hold_one_unit_each(&http, &product.url(), RESERVATIONS).await;
    assert_eq!(stock(&http, &product.url()).await, 0);

    // Each cancellation published twice, as a relay that crashed between the broker's
    // confirm and its own commit would; poison in between.
    let publisher = AmqpPublisher::new(AmqpLink::new(&rabbit.url, "test"));
    let mut batch = Vec::new();
    for n in 0..RESERVATIONS {
        let event = cancelled(&format!("r{n}"));
        batch.push(event.clone());
        if n % 25 == 0 {
            batch.push(message("not an event", &format!("poison-{n}")));
        }
        batch.push(event);
    }
    publisher.publish(&batch).await.unwrap();

    // Kill the consumer once it is well into the stream.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stock(&http, &product.url()).await < 20 {
        assert!(Instant::now() < deadline, "the consumer never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    product.child.kill().unwrap(); // SIGKILL
    product.child.wait().unwrap();

    let product = start_product(dir.path(), &rabbit.url);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stock(&http, &product.url()).await < RESERVATIONS as i64 {
        assert!(
            Instant::now() < deadline,
            "stock lost: {} of {RESERVATIONS}",
            stock(&http, &product.url()).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let queue = Queue::named("product.order-cancelled").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while queue_depth(&rabbit.url, queue.name).await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "the queue never drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stock(&http, &product.url()).await,
        RESERVATIONS as i64,
        "every unit back, none twice"
    );
    // The kill landed mid-stream: the restarted process applied some of it.
    let applied_after_restart = metric_sum(
        &product.url(),
        "events_consumed_total",
        &[("outcome", "applied")],
    )
    .await;
    assert!(
        (1.0..RESERVATIONS as f64).contains(&applied_after_restart),
        "{applied_after_restart} applied after the restart"
    );
    // What the killed process held unacknowledged came again, marked as redelivered.
    let redelivered = metric_sum(&product.url(), "events_redelivered_total", &[]).await;
    assert!(redelivered >= 1.0, "{redelivered} redelivered");
    assert_eq!(
        queue_depth(&rabbit.url, &dead_letter_queue(queue))
            .await
            .unwrap(),
        4,
        "the poison went to the dead-letter queue"
    );

    // The database agrees: stock plus what is still held is what there was, and each
    // event was applied once.
    let file = dir.path().join("product.db");
    let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    let (left, held, applied): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT quantity FROM products WHERE id = '2'),
                (SELECT COALESCE(SUM(i.quantity), 0) FROM reservation_items i
                   JOIN reservations r ON r.id = i.reservation_id WHERE r.status = 'held'),
                (SELECT COUNT(*) FROM inbox WHERE queue = 'product.order-cancelled')",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!((left + held, held, applied), (100, 0, RESERVATIONS as i64));
}

/// Events travel in 8 KiB frames (`events::amqp`): an order of many lines, its event
/// several frames long, arrives whole and is applied.
#[tokio::test]
async fn an_event_larger_than_a_frame_arrives_whole() {
    let Some(rabbit) = RabbitMq::start("an_event_larger_than_a_frame") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let product = start_product(dir.path(), &rabbit.url);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/reservations", product.url()))
        .json(&json!({"id": "big", "items": [{"product_id": "2", "quantity": 3}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(stock(&http, &product.url()).await, 97);

    let lines: Vec<Value> = (0..1000)
        .map(|n| json!({"product_id": format!("p-{n:04}"), "quantity": 1, "unit_price_cents": 100}))
        .collect();
    let event = shop_platform::events::NewEvent::new(
        "order.cancelled",
        &json!({"order_id": "order-big", "user_id": "1", "status": "cancelled",
                "items": lines, "total_cents": 100_000, "reservation_id": "big"}),
    );
    assert!(
        event.body.len() > 5 * 8 * 1024,
        "{} bytes",
        event.body.len()
    );
    AmqpPublisher::new(AmqpLink::new(&rabbit.url, "test"))
        .publish(&[message(&event.body, &event.id)])
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    while stock(&http, &product.url()).await < 100 {
        assert!(Instant::now() < deadline, "the large event was not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let queue = Queue::named("product.order-cancelled").unwrap();
    assert_eq!(
        queue_depth(&rabbit.url, &dead_letter_queue(queue))
            .await
            .unwrap(),
        0,
        "nothing dead-lettered"
    );
}

/// Acks go out in batches while deliveries keep coming (`events::amqp`), and at once when
/// none is waiting: a consumer that has gone idle holds nothing unacknowledged, so killing
/// it then sends nothing back to the queue.
#[tokio::test]
async fn an_idle_consumer_has_acknowledged_everything_it_applied() {
    let Some(rabbit) = RabbitMq::start("an_idle_consumer_has_acknowledged") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut product = start_product(dir.path(), &rabbit.url);
    let http = reqwest::Client::new();
    const BURST: usize = 45;
    hold_one_unit_each(&http, &product.url(), BURST).await;
    // One burst, longer than a batch of acks, with poison inside it: the acks before a
    // dead-lettered delivery are settled before it is.
    let mut burst: Vec<_> = (0..BURST).map(|n| cancelled(&format!("r{n}"))).collect();
    burst.insert(20, message("not an event", "poison"));
    AmqpPublisher::new(AmqpLink::new(&rabbit.url, "test"))
        .publish(&burst)
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    while stock(&http, &product.url()).await < 100 {
        assert!(Instant::now() < deadline, "the burst was not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Applied is not yet acknowledged: the last ack leaves once the consumer finds nothing
    // more waiting, a moment after the last commit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    product.child.kill().unwrap(); // SIGKILL: nothing is flushed on the way out
    product.child.wait().unwrap();

    // The broker requeues a dead consumer's unacknowledged deliveries as it drops the
    // consumer, so once it counts none, what is in the queue is what was never acked.
    let queue = Queue::named("product.order-cancelled").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = queue_status(&rabbit.url, queue.name).await.unwrap();
        if status.consumers == 0 {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the broker kept the dead consumer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.messages, 0, "deliveries left unacknowledged");
    assert_eq!(
        queue_depth(&rabbit.url, &dead_letter_queue(queue))
            .await
            .unwrap(),
        1,
        "the poison, dead-lettered"
    );
}
