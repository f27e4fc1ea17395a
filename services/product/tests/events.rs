//! The product service's side of the events: `order.cancelled` returns a reservation's
//! stock once however often it is delivered, what it cannot parse is dead-lettered
//! without stopping the queue, and its own `stock.released` events wait in the outbox
//! until a consumer is there to take them.

mod common;

use common::{cancelled, message};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use shop_platform::events::{
    Broker, Consumer, Event, EventMetrics, Handled, LocalBroker, Publisher, Queue, Rejection,
};
use shop_platform::testing::{Backend, RunningApp, TestDatabase, metric_sum};
use shop_platform::{AuthConfig, Metrics, ServerConfig};

struct Product {
    app: RunningApp,
    broker: LocalBroker,
    http: reqwest::Client,
    _dir: TestDatabase,
}

impl Product {
    async fn start(backend: Backend) -> Self {
        let dir = TestDatabase::new(backend).await;
        let broker = LocalBroker::default();
        let app = shop_product::build(shop_product::Config {
            server: ServerConfig::ephemeral(),
            storage: dir.storage(),
            seed_products: true,
            catalogue_resync: Duration::from_secs(1),
            auth: AuthConfig::demo(),
            events: Broker::Local(broker.clone()),
        })
        .await
        .unwrap();
        // order.cancelled also goes to the user service's queue: a stand-in takes it.
        broker.attach(
            Arc::new(Recorder("user.order-counts", Arc::default())),
            EventMetrics::new(&Metrics::new("user"), &[], &[]),
        );
        Self {
            app: RunningApp::start(app),
            broker,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    async fn reserve(&self, id: &str, quantity: i64) {
        let r = self
            .http
            .post(format!("{}/reservations", self.app.url))
            .json(&json!({"id": id, "order_id": format!("order-{id}"), "items": [{"product_id": "1", "quantity": quantity}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }

    async fn stock(&self) -> i64 {
        let product: Value = self
            .http
            .get(format!("{}/products/1", self.app.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        product["quantity"].as_i64().unwrap()
    }

    async fn metric(&self, name: &str, matching: &[(&str, &str)]) -> f64 {
        metric_sum(&self.app.url, name, matching).await
    }
}

async fn a_repeated_cancellation_returns_the_stock_once(backend: Backend) {
    let product = Product::start(backend).await;
    product.reserve("r1", 4).await;
    assert_eq!(product.stock().await, 6);
    let message = cancelled("r1");
    // The same message three times, as a broker redelivering after lost acks would.
    let batch = [message.clone(), message.clone(), message];
    product.broker.publish(&batch).await.unwrap();
    assert_eq!(product.stock().await, 10, "four units back, once");
    let applied = product
        .metric("events_consumed_total", &[("outcome", "applied")])
        .await;
    let duplicate = product
        .metric("events_consumed_total", &[("outcome", "duplicate")])
        .await;
    assert_eq!((applied, duplicate), (1.0, 2.0));
}

async fn poison_is_dead_lettered_and_the_queue_moves_on(backend: Backend) {
    let product = Product::start(backend).await;
    product.reserve("r2", 1).await;
    let unknown_version = {
        let mut event: Event = serde_json::from_str(&cancelled("r2").body).unwrap();
        event.version = 9;
        serde_json::to_string(&event).unwrap()
    };
    let batch = [
        message("this is not json", "p1"),
        message(
            r#"{"id":"p2","type":"order.cancelled","version":1,"occurred_at":"2026-01-01T00:00:00Z","data":{"order_id":"x"}}"#,
            "p2",
        ),
        message(&unknown_version, "p3"),
        cancelled("r2"),
    ];
    product.broker.publish(&batch).await.unwrap();
    assert_eq!(
        product.stock().await,
        10,
        "the good message after the poison was applied"
    );
    let dead = product
        .metric("events_consumed_total", &[("outcome", "dead_lettered")])
        .await;
    assert_eq!(dead, 3.0);
}

/// Records what it is given, standing in for another service's consumer.
struct Recorder(&'static str, Arc<Mutex<Vec<Event>>>);

#[async_trait]
impl Consumer for Recorder {
    fn queue(&self) -> &'static Queue {
        Queue::named(self.0).unwrap()
    }
    async fn handle(&self, event: &Event) -> Result<Handled, Rejection> {
        self.1.lock().unwrap().push(event.clone());
        Ok(Handled::Applied)
    }
}

async fn released_stock_is_announced_once_a_consumer_is_there(backend: Backend) {
    let product = Product::start(backend).await;
    for (id, quantity) in [("r3", 1), ("r4", 2)] {
        product.reserve(id, quantity).await;
        product.broker.publish(&[cancelled(id)]).await.unwrap();
    }
    // Nobody consumes stock.released yet: the events wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(product.metric("outbox_pending_events", &[]).await, 2.0);
    assert_eq!(product.metric("events_published_total", &[]).await, 0.0);

    let seen = Arc::new(Mutex::new(Vec::new()));
    let metrics = EventMetrics::new(&Metrics::new("recorder"), &[], &[]);
    product.broker.attach(
        Arc::new(Recorder("order.stock-released", seen.clone())),
        metrics,
    );
    // The relay retries with a growing pause, up to 5 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the waiting events were not delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().unwrap().clone();
    let released: Vec<(String, i64)> = seen
        .iter()
        .map(|e| {
            assert_eq!(e.kind, "stock.released");
            let data: serde_json::Value = e.data().unwrap();
            (
                data["reservation_id"].as_str().unwrap().to_owned(),
                data["items"][0]["quantity"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        released,
        [("r3".to_owned(), 1), ("r4".to_owned(), 2)],
        "in order"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while product.metric("outbox_pending_events", &[]).await != 0.0 {
        assert!(Instant::now() < deadline, "the outbox was not marked sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        product
            .metric("events_published_total", &[("type", "stock.released")])
            .await,
        2.0
    );
}

shop_platform::backend_tests!(
    a_repeated_cancellation_returns_the_stock_once,
    poison_is_dead_lettered_and_the_queue_moves_on,
    released_stock_is_announced_once_a_consumer_is_there,
);
