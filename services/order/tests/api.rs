//! Router tests for the order service (`oneshot` through the production stack), with the
//! real product and user services answering on loopback.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{Method, StatusCode, header};
use common::Peers;
use serde_json::json;
use shop_order::storage::MIGRATOR;
use shop_order::{AppState, SqliteOrderStore, app};
use shop_platform::server::stack;
use shop_platform::testing::{TestBody, TestResponse, call, closed_port_url, temp_dir};
use shop_platform::{Metrics, ServerConfig, ServiceClient, StorageConfig};
use tempfile::TempDir;

struct Harness {
    router: Router,
    peers: Peers,
    _dir: TempDir,
}

async fn order_router(dir: &TempDir, product_url: &str, user_url: &str) -> Router {
    let pool = StorageConfig::in_dir(dir.path())
        .open_sqlite("order", &MIGRATOR)
        .await
        .unwrap();
    let metrics = Metrics::new("order");
    let timeout = Duration::from_secs(2);
    let products = ServiceClient::new("product", product_url, timeout, metrics.clone()).unwrap();
    let users = ServiceClient::new("user", user_url, timeout, metrics.clone()).unwrap();
    let state = AppState::new(
        Arc::new(SqliteOrderStore::new(pool)),
        products,
        users,
        &metrics,
    );
    stack(app(state), &ServerConfig::ephemeral(), metrics)
}

impl Harness {
    async fn new() -> Self {
        let peers = Peers::start().await;
        let dir = temp_dir();
        let router = order_router(&dir, &peers.product.url, &peers.user.url).await;
        Self {
            router,
            peers,
            _dir: dir,
        }
    }

    async fn post(&self, uri: &str, body: impl Into<TestBody>) -> TestResponse {
        call(&self.router, Method::POST, uri, body).await
    }

    async fn get(&self, uri: &str) -> TestResponse {
        call(&self.router, Method::GET, uri, ()).await
    }

    async fn order_count(&self) -> usize {
        self.get("/orders").await.body.as_array().unwrap().len()
    }

    async fn stocks(&self) -> (i64, i64) {
        (self.peers.stock("1").await, self.peers.stock("2").await)
    }
}

#[tokio::test]
async fn seed_order_is_priced_by_the_server_and_listed() {
    let h = Harness::new().await;
    let r = h
        .post(
            "/order",
            json!({"id": "1", "user_id": "1", "products": ["1", "2"], "total": 1024.98}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["total"], json!(1024.98));
    assert_eq!(r.body["products"], json!(["1", "2"]));
    assert_eq!(r.body["status"], "pending");
    assert_eq!(r.body["items"][0]["unit_price"], json!(999.99));
    assert_eq!(r.headers[header::LOCATION], "/orders/1");
    assert_eq!(h.stocks().await, (9, 99));

    let listed = h.get("/orders?user_id=1").await;
    assert_eq!(listed.body, json!([r.body.clone()]));
    assert_eq!(h.get("/orders/1").await.body, r.body);
    assert_eq!(h.get("/orders?user_id=2").await.body, json!([]));
}

#[tokio::test]
async fn total_is_optional_and_quantities_multiply() {
    let h = Harness::new().await;
    let r = h
        .post("/orders", json!({"user_id": "1", "items": [{"product_id": "2", "quantity": 3}], "total": "74.97"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["total"], json!(74.97));
    assert_eq!(r.body["products"], json!(["2", "2", "2"]));
    let r = h
        .post("/orders", json!({"user_id": "1", "products": ["1", "1"]}))
        .await;
    assert_eq!(r.body["total"], json!(1999.98));
    assert_eq!(h.stocks().await, (8, 97));
}

#[tokio::test]
async fn a_wrong_client_total_is_refused_naming_both_values() {
    let h = Harness::new().await;
    let r = h
        .post(
            "/order",
            json!({"user_id": "1", "products": ["1", "2"], "total": 1.00}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_field()),
        (StatusCode::UNPROCESSABLE_ENTITY, "total")
    );
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("1024.98") && message.contains("1.00"),
        "{message}"
    );
    assert_eq!(h.stocks().await, (10, 100), "nothing reserved");
    assert_eq!(h.order_count().await, 0);
}

#[tokio::test]
async fn insufficient_stock_is_409_and_takes_nothing() {
    let h = Harness::new().await;
    let r = h
        .post(
            "/orders",
            json!({"user_id": "1", "items": [
            {"product_id": "2", "quantity": 5}, {"product_id": "1", "quantity": 11}]}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "insufficient_stock")
    );
    assert_eq!(h.stocks().await, (10, 100));
    assert_eq!(h.order_count().await, 0);
}

#[tokio::test]
async fn unknown_user_or_product_is_422_naming_the_field() {
    let h = Harness::new().await;
    let r = h
        .post("/orders", json!({"user_id": "42", "products": ["1"]}))
        .await;
    assert_eq!(
        (r.status, r.error_field()),
        (StatusCode::UNPROCESSABLE_ENTITY, "user_id")
    );
    let r = h
        .post(
            "/orders",
            json!({"user_id": "1", "products": ["1", "nope"]}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_field()),
        (StatusCode::UNPROCESSABLE_ENTITY, "products[1]")
    );
    let r = h
        .post(
            "/orders",
            json!({"user_id": "1", "items": [{"product_id": "nope", "quantity": 1}]}),
        )
        .await;
    assert_eq!(r.error_field(), "items[0].product_id");
    assert_eq!(h.stocks().await, (10, 100));
    assert_eq!(h.order_count().await, 0);
}

#[tokio::test]
async fn a_reused_order_id_is_409_and_reserves_nothing_more() {
    let h = Harness::new().await;
    let body = json!({"id": "o-1", "user_id": "1", "products": ["2"]});
    assert_eq!(
        h.post("/orders", body.clone()).await.status,
        StatusCode::CREATED
    );
    let r = h.post("/orders", body).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "order_exists")
    );
    assert_eq!(h.stocks().await, (10, 99));
}

#[tokio::test]
async fn bad_order_input_is_refused_and_writes_nothing() {
    let h = Harness::new().await;
    let cases: Vec<(TestBody, StatusCode, &str)> = vec![
        ("{\"user_id\":".into(), StatusCode::BAD_REQUEST, ""),
        (
            json!({"user_id": "1", "products": []}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "products",
        ),
        (
            json!({"user_id": "1"}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "products",
        ),
        (
            json!({"products": ["1"]}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "user_id",
        ),
        (
            json!({"user_id": 1, "products": ["1"]}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "user_id",
        ),
        (
            json!({"user_id": "1", "products": "1"}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "products",
        ),
        (
            json!({"user_id": "1", "items": [{"product_id": "1", "quantity": -1}]}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "items[0].quantity",
        ),
        (
            json!({"user_id": "1", "items": [{"product_id": "1"}]}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "items[0].quantity",
        ),
        (
            json!({"user_id": "1", "products": ["1"], "total": -5}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "total",
        ),
        (
            json!({"user_id": "1", "products": ["1"], "total": 1.001}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "total",
        ),
        (
            json!({"user_id": "1", "products": ["1"], "status": "paid"}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "status",
        ),
        (
            TestBody::Raw(Some("text/plain"), b"{}".to_vec()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "",
        ),
    ];
    for (body, status, field) in cases {
        let r = h.post("/orders", body).await;
        assert_eq!(r.status, status, "{:?}", r.body);
        if !field.is_empty() {
            assert_eq!(r.error_field(), field, "{:?}", r.body);
        }
    }
    assert_eq!(h.order_count().await, 0);
    assert_eq!(h.stocks().await, (10, 100));
}

#[tokio::test]
async fn lists_page_by_cursor_and_filter_by_user() {
    let h = Harness::new().await;
    for _ in 0..3 {
        assert_eq!(
            h.post("/orders", json!({"user_id": "1", "products": ["2"]}))
                .await
                .status,
            StatusCode::CREATED
        );
    }
    let first = h.get("/orders?user_id=1&limit=2").await;
    assert_eq!(first.body.as_array().unwrap().len(), 2);
    let cursor = first.headers["x-next-cursor"].to_str().unwrap();
    let link = first.headers[header::LINK].to_str().unwrap();
    assert!(link.contains("user_id=1"), "{link}");
    let rest = h
        .get(&format!("/orders?user_id=1&limit=2&cursor={cursor}"))
        .await;
    assert_eq!(rest.body.as_array().unwrap().len(), 1);
    assert_eq!(
        h.get("/orders?user_id=bad%20id").await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        h.get("/orders?limit=0").await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let r = h.get("/orders/missing").await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
}

#[tokio::test]
async fn a_dependency_down_is_a_quick_503_not_a_hang() {
    let peers = Peers::start().await;
    let dir = temp_dir();
    let dead = closed_port_url();

    let no_products = order_router(&dir, &dead, &peers.user.url).await;
    let started = Instant::now();
    let r = call(
        &no_products,
        Method::POST,
        "/orders",
        json!({"user_id": "1", "products": ["1"]}),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "dependency_unavailable")
    );
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("product"),
        "{:?}",
        r.body
    );
    assert!(r.headers.contains_key(header::RETRY_AFTER));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    let dir2 = temp_dir();
    let no_users = order_router(&dir2, &peers.product.url, &dead).await;
    let r = call(
        &no_users,
        Method::POST,
        "/orders",
        json!({"user_id": "1", "products": ["1"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("user"),
        "{:?}",
        r.body
    );
    assert_eq!(
        peers.stock("1").await,
        10,
        "nothing reserved when a check fails"
    );
}

#[tokio::test]
async fn a_peer_that_hangs_is_cut_off_by_the_upstream_timeout() {
    // Accepts connections but never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let peers = Peers::start().await;
    let dir = temp_dir();
    let router = order_router(&dir, &peers.product.url, &silent_url).await;
    let started = Instant::now();
    let r = call(
        &router,
        Method::POST,
        "/orders",
        json!({"user_id": "1", "products": ["1"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    hold.abort();
}
