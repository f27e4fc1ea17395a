//! An order's life after it is placed: cancel and confirm over HTTP, the events each
//! change writes, and the stock a cancellation returns through the product service's
//! consumer, with real product, user and order services sharing one in-process broker
//! (as the launcher runs them).

mod common;

use std::time::{Duration, Instant};

use common::Peers;
use reqwest::StatusCode;
use serde_json::{Value, json};
use shop_platform::events::Broker;
use shop_platform::testing::{
    Backend, RabbitMq, RunningApp, TestDatabase, metric_reaches, metric_sum,
};

struct Shop {
    peers: Peers,
    order: RunningApp,
    http: reqwest::Client,
    _dir: TestDatabase,
}

impl Shop {
    async fn start(backend: Backend) -> Self {
        Self::start_with(backend, Broker::default()).await
    }

    async fn start_with(backend: Backend, broker: Broker) -> Self {
        let peers = Peers::start_with(backend, broker).await;
        let dir = peers.order_db().await;
        let order = shop_order::build(peers.order_config(&dir)).await.unwrap();
        Self {
            order: RunningApp::start(order),
            http: reqwest::Client::new(),
            peers,
            _dir: dir,
        }
    }

    async fn place(&self, product_id: &str, quantity: i64) -> Value {
        let r = self
            .http
            .post(format!("{}/orders", self.order.url))
            .json(&json!({"user_id": "1", "items": [{"product_id": product_id, "quantity": quantity}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        r.json().await.unwrap()
    }

    /// POST /orders/{id}/{action}, with `If-Match` if given.
    async fn change(
        &self,
        id: &str,
        action: &str,
        if_match: Option<&str>,
    ) -> (StatusCode, Option<String>, Value) {
        let mut request = self
            .http
            .post(format!("{}/orders/{id}/{action}", self.order.url));
        if let Some(tag) = if_match {
            request = request.header("if-match", tag);
        }
        let r = request.send().await.unwrap();
        let status = r.status();
        let etag = r
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, etag, r.json().await.unwrap())
    }

    async fn get(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/orders/{id}", self.order.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until the product service has returned the order's stock. After a broker
    /// outage the order relay and both consumers each reconnect after a pause of up to
    /// 5 s, to a broker that has just restarted; CI once took more than 10 s.
    async fn stock_returned(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let order = self.get(id).await;
            if order["stock_returned_at"].is_string() {
                return order;
            }
            assert!(Instant::now() < deadline, "stock never returned: {order}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn a_cancelled_order_gives_its_stock_back_once(backend: Backend) {
    let shop = Shop::start(backend).await;
    let order = shop.place("1", 3).await;
    let id = order["id"].as_str().unwrap();
    assert_eq!(
        (order["status"].as_str(), order["version"].as_i64()),
        (Some("pending"), Some(1))
    );
    assert_eq!(shop.peers.stock("1").await, 7);

    let (status, etag, cancelled) = shop.change(id, "cancel", None).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(etag.as_deref(), Some("\"2\""));
    assert!(cancelled["cancelled_at"].is_string(), "{cancelled}");

    let settled = shop.stock_returned(id).await;
    assert_eq!(shop.peers.stock("1").await, 10, "the three units are back");
    // Cancelling again answers the order as it is, and returns nothing twice.
    let (status, _, again) = shop.change(id, "cancel", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, settled);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(shop.peers.stock("1").await, 10);
    assert_eq!(
        metric_sum(
            &shop.order.url,
            "events_published_total",
            &[("type", "order.cancelled")]
        )
        .await,
        1.0,
        "one event for one cancellation"
    );
    // The user service counted the order and its cancellation from the same events.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let user: Value = shop
            .http
            .get(format!("{}/users/1", shop.peers.user.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if user["orders"] == json!({"placed": 1, "cancelled": 1}) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "order counts never caught up: {user}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A cancelled order cannot be confirmed.
    let (status, _, refused) = shop.change(id, "confirm", None).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_transition"))
    );
}

async fn confirm_then_cancel_and_if_match_guards_each_change(backend: Backend) {
    let shop = Shop::start(backend).await;
    let order = shop.place("2", 1).await;
    let id = order["id"].as_str().unwrap();

    let (status, _, refused) = shop.change(id, "confirm", Some("\"7\"")).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (StatusCode::PRECONDITION_FAILED, Some("precondition_failed"))
    );
    let (status, _, refused) = shop.change(id, "confirm", Some("W/\"1\"")).await;
    assert_eq!(
        status,
        StatusCode::PRECONDITION_FAILED,
        "a weak tag never matches: {refused}"
    );
    let (status, _, refused) = shop.change(id, "confirm", Some("1")).await;
    assert_eq!(
        (status, refused["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("If-Match"))
    );
    assert_eq!(shop.get(id).await["status"], "pending", "nothing changed");

    let (status, etag, confirmed) = shop.change(id, "confirm", Some("\"1\"")).await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    assert_eq!(
        (confirmed["status"].as_str(), etag.as_deref()),
        (Some("confirmed"), Some("\"2\""))
    );
    assert!(confirmed["confirmed_at"].is_string());
    // Confirming again is a repeat, whatever version the client last saw.
    let (status, _, again) = shop.change(id, "confirm", Some("\"1\"")).await;
    assert_eq!((status, again), (StatusCode::OK, confirmed.clone()));
    // A change based on a stale read is refused; on the current one it goes through.
    let (status, _, _) = shop.change(id, "cancel", Some("\"1\"")).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    let (status, _, cancelled) = shop.change(id, "cancel", Some("\"2\"")).await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    shop.stock_returned(id).await;
    assert_eq!(shop.peers.stock("2").await, 100);

    // GET carries the same tag, and answers 304 to it.
    let r = shop
        .http
        .get(format!("{}/orders/{id}", shop.order.url))
        .send()
        .await
        .unwrap();
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let r = shop
        .http
        .get(format!("{}/orders/{id}", shop.order.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);

    for (path, code) in [
        ("/orders/nope/cancel", StatusCode::NOT_FOUND),
        ("/orders/a%20b/confirm", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let r = shop
            .http
            .post(format!("{}{path}", shop.order.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), code, "{path}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"]["code"].is_string(), "{path}: {body}");
    }
}

/// 200 concurrent cancels and re-cancels of 50 orders: every order is cancelled once,
/// announced once, and its stock returned once.
async fn concurrent_cancels_return_each_orders_stock_exactly_once(backend: Backend) {
    concurrent_cancels(Shop::start(backend).await).await;
}

async fn concurrent_cancels(shop: Shop) {
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(shop.place("2", 1).await["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(shop.peers.stock("2").await, 50);
    let cancels = ids
        .iter()
        .cycle()
        .take(200)
        .map(|id| shop.change(id, "cancel", None));
    for (status, _, body) in futures_util::future::join_all(cancels).await {
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "cancelled");
    }
    for id in &ids {
        shop.stock_returned(id).await;
    }
    assert_eq!(
        shop.peers.stock("2").await,
        100,
        "every unit back, none twice"
    );
    // The counters settle at one per order, and stay there.
    let counted = [
        (
            &shop.order.url,
            "events_published_total",
            ("type", "order.cancelled"),
        ),
        (
            &shop.peers.product.url,
            "events_consumed_total",
            ("outcome", "applied"),
        ),
        (
            &shop.order.url,
            "orders_status_changes_total",
            ("to", "cancelled"),
        ),
    ];
    for (url, name, label) in counted {
        metric_reaches(url, name, &[label], 50.0).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (url, name, label) in counted {
        assert_eq!(metric_sum(url, name, &[label]).await, 50.0, "{name}");
    }
}

/// The same through RabbitMQ.
#[tokio::test]
async fn concurrent_cancels_through_rabbitmq_return_each_orders_stock_exactly_once() {
    let Some(rabbit) = RabbitMq::start("concurrent_cancels_through_rabbitmq") else {
        return;
    };
    concurrent_cancels(Shop::start_with(Backend::Sqlite, Broker::Amqp(rabbit.url.clone())).await)
        .await;
}

/// With the broker down, orders are still placed and cancelled; their events wait in
/// the outboxes, and once it is back every one is delivered and applied, once.
#[tokio::test]
async fn orders_placed_while_the_broker_is_down_have_their_events_delivered_once_it_is_back() {
    let Some(rabbit) = RabbitMq::start("orders_placed_while_the_broker_is_down") else {
        return;
    };
    rabbit.stop();
    let shop = Shop::start_with(Backend::Sqlite, Broker::Amqp(rabbit.url.clone())).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(shop.place("2", 1).await["id"].as_str().unwrap().to_owned());
    }
    for id in &ids[..10] {
        let (status, _, body) = shop.change(id, "cancel", None).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (StatusCode::OK, Some("cancelled"))
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_sum(&shop.order.url, "outbox_pending_events", &[]).await != 30.0 {
        assert!(
            Instant::now() < deadline,
            "20 placed and 10 cancelled should wait"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        shop.peers.stock("2").await,
        80,
        "no stock returned without the broker"
    );

    rabbit.restart();
    for id in &ids[..10] {
        shop.stock_returned(id).await;
    }
    assert_eq!(shop.peers.stock("2").await, 90);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_sum(&shop.order.url, "outbox_pending_events", &[]).await != 0.0 {
        assert!(Instant::now() < deadline, "the outbox never emptied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (kind, count) in [("order.placed", 20.0), ("order.cancelled", 10.0)] {
        let published =
            metric_sum(&shop.order.url, "events_published_total", &[("type", kind)]).await;
        assert_eq!(published, count, "{kind}");
    }
    let applied = metric_sum(
        &shop.peers.product.url,
        "events_consumed_total",
        &[("outcome", "applied")],
    )
    .await;
    assert_eq!(applied, 10.0);
    for id in &ids[10..] {
        assert_eq!(shop.get(id).await["status"], "pending");
    }
}

shop_platform::backend_tests!(
    a_cancelled_order_gives_its_stock_back_once,
    confirm_then_cancel_and_if_match_guards_each_change,
    concurrent_cancels_return_each_orders_stock_exactly_once,
);
