//! Router tests for the order service (`oneshot` through the production stack), with the
//! real product and user services answering on loopback.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{Method, StatusCode, header};
use common::Peers;
use serde_json::json;
use shop_order::storage::MIGRATIONS;
use shop_order::{AppState, SqlOrderStore, app};
use shop_platform::auth::{DEFAULT_AUDIENCE, DEFAULT_ISSUER, KeyPair, Role, TokenSigner};
use shop_platform::server::stack;
use shop_platform::testing::{
    Backend, TestBody, TestDatabase, TestResponse, call, call_with_headers, closed_port_url,
};
use shop_platform::{AuthConfig, Authenticator, Metrics, ServerConfig, ServiceClient};

struct Harness {
    router: Router,
    peers: Peers,
    _dir: TestDatabase,
}

async fn order_router(dir: &TestDatabase, product_url: &str, user_url: &str) -> Router {
    order_router_with(dir, product_url, user_url, Authenticator::demo()).await
}

async fn order_router_with(
    dir: &TestDatabase,
    product_url: &str,
    user_url: &str,
    authenticator: Authenticator,
) -> Router {
    let db = dir.storage().open("order", &MIGRATIONS).await.unwrap();
    let metrics = Metrics::new("order");
    let timeout = Duration::from_secs(2);
    let products = ServiceClient::new("product", product_url, timeout, metrics.clone()).unwrap();
    let users = ServiceClient::new("user", user_url, timeout, metrics.clone()).unwrap();
    let state = AppState::new(
        Arc::new(SqlOrderStore::new(
            &db,
            shop_platform::events::Outbox::default(),
        )),
        products,
        users,
        &metrics,
    );
    stack(
        app(state).layer(axum::Extension(authenticator)),
        &ServerConfig::ephemeral(),
        metrics,
    )
}

impl Harness {
    async fn new(backend: Backend) -> Self {
        let peers = Peers::start(backend).await;
        let dir = peers.order_db().await;
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

    /// POST /orders with an `Idempotency-Key`, through the same stack.
    async fn post_with_key(&self, key: &str, body: &serde_json::Value) -> TestResponse {
        call_with_headers(
            &self.router,
            Method::POST,
            "/orders",
            &[("idempotency-key", key)],
            body.clone(),
        )
        .await
    }

    async fn stocks(&self) -> (i64, i64) {
        (self.peers.stock("1").await, self.peers.stock("2").await)
    }
}

async fn seed_order_is_priced_by_the_server_and_listed(backend: Backend) {
    let h = Harness::new(backend).await;
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

async fn total_is_optional_and_quantities_multiply(backend: Backend) {
    let h = Harness::new(backend).await;
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

async fn a_wrong_client_total_is_refused_naming_both_values(backend: Backend) {
    let h = Harness::new(backend).await;
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

async fn insufficient_stock_is_409_and_takes_nothing(backend: Backend) {
    let h = Harness::new(backend).await;
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

async fn unknown_user_or_product_is_422_naming_the_field(backend: Backend) {
    let h = Harness::new(backend).await;
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

async fn a_reused_order_id_is_409_and_reserves_nothing_more(backend: Backend) {
    let h = Harness::new(backend).await;
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

async fn bad_order_input_is_refused_and_writes_nothing(backend: Backend) {
    let h = Harness::new(backend).await;
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

async fn lists_page_by_cursor_and_filter_by_user(backend: Backend) {
    let h = Harness::new(backend).await;
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

async fn a_dependency_down_is_a_quick_503_not_a_hang(backend: Backend) {
    let peers = Peers::start(backend).await;
    let dir = peers.order_db().await;
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

    let dir2 = peers.order_db().await;
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

/// A customer ordering for themself is vouched for by their token (the user service signs
/// tokens only for accounts it holds, and never deletes one): the order is placed with the
/// user service down. An admin naming someone else is not, and the user service is asked.
async fn a_token_vouches_for_its_own_account_and_no_other(backend: Backend) {
    let peers = Peers::start(backend).await;
    let dir = peers.order_db().await;
    let pair = KeyPair::generate().unwrap();
    let authenticator = Authenticator::new(&AuthConfig::with_pair(&pair)).unwrap();
    let router =
        order_router_with(&dir, &peers.product.url, &closed_port_url(), authenticator).await;
    let signer = TokenSigner::new(
        &pair,
        DEFAULT_ISSUER,
        DEFAULT_AUDIENCE,
        Duration::from_secs(60),
    );
    let as_caller = async |id: &str, role: Role, body: serde_json::Value| {
        let bearer = format!("Bearer {}", signer.issue(id, role).access_token);
        let headers = [
            (header::AUTHORIZATION.as_str(), bearer.as_str()),
            ("x-user-id", id),
            ("x-user-role", role.as_str()),
        ];
        call_with_headers(&router, Method::POST, "/orders", &headers, body).await
    };

    let own = as_caller("alice", Role::Customer, json!({"products": ["1"]})).await;
    assert_eq!(own.status, StatusCode::CREATED, "{:?}", own.body);
    assert_eq!(own.body["user_id"], json!("alice"));
    let named = as_caller(
        "alice",
        Role::Customer,
        json!({"user_id": "alice", "products": ["1"]}),
    )
    .await;
    assert_eq!(named.status, StatusCode::CREATED, "{:?}", named.body);
    assert_eq!(peers.stock("1").await, 8);

    let for_bob = as_caller(
        "root",
        Role::Admin,
        json!({"user_id": "bob", "products": ["1"]}),
    )
    .await;
    assert_eq!(
        (for_bob.status, for_bob.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "dependency_unavailable"),
        "{:?}",
        for_bob.body
    );
    assert!(
        for_bob.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("user"),
        "{:?}",
        for_bob.body
    );
    assert_eq!(peers.stock("1").await, 8, "nothing reserved for bob");
}

async fn a_peer_that_hangs_is_cut_off_by_the_upstream_timeout(backend: Backend) {
    // Accepts connections but never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let peers = Peers::start(backend).await;
    let dir = peers.order_db().await;
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

async fn a_retry_with_the_same_idempotency_key_creates_nothing_new(backend: Backend) {
    let h = Harness::new(backend).await;
    // No id: without the key, each attempt would be a new order.
    let body = json!({"user_id": "1", "items": [{"product_id": "1", "quantity": 2}]});
    let first = h.post_with_key("key-1", &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    assert!(first.headers.get("idempotent-replayed").is_none());
    // The answer is the order's JSON, written once and kept as the record's copy.
    assert_eq!(first.headers[header::CONTENT_TYPE], "application/json");
    // Same body in another spelling: key order and whitespace do not matter.
    let respelled: serde_json::Value = serde_json::from_str(
        r#"{ "items": [ {"quantity": 2, "product_id": "1"} ], "user_id": "1" }"#,
    )
    .unwrap();
    let again = h.post_with_key("key-1", &respelled).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body, first.body, "the first response, replayed");
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(
        again.headers[header::LOCATION],
        first.headers[header::LOCATION]
    );
    assert_eq!(h.order_count().await, 1);
    assert_eq!(h.stocks().await.0, 8, "stock taken once");

    let other = json!({"user_id": "1", "items": [{"product_id": "1", "quantity": 3}]});
    let r = h.post_with_key("key-1", &other).await;
    assert_eq!(
        (r.status, r.error_field()),
        (StatusCode::UNPROCESSABLE_ENTITY, "Idempotency-Key"),
        "{:?}",
        r.body
    );
    assert_eq!(h.order_count().await, 1);
    assert_eq!(h.stocks().await.0, 8);

    for bad in ["", &"k".repeat(256)] {
        let r = h.post_with_key(bad, &body).await;
        assert_eq!(r.error_field(), "Idempotency-Key", "{bad:?}");
    }
    // A refusal is not stored: nothing was created, so a retry is judged afresh.
    let too_many = json!({"user_id": "1", "items": [{"product_id": "1", "quantity": 9}]});
    let r = h.post_with_key("key-2", &too_many).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(h.order_count().await, 1);
}

async fn concurrent_retries_with_one_idempotency_key_make_one_order(backend: Backend) {
    let h = Arc::new(Harness::new(backend).await);
    let body = json!({"user_id": "1", "items": [{"product_id": "2", "quantity": 5}]});
    let attempts: Vec<_> = (0..10)
        .map(|_| {
            let (h, body) = (h.clone(), body.clone());
            tokio::spawn(async move { h.post_with_key("same-key", &body).await })
        })
        .collect();
    let mut responses = Vec::new();
    for attempt in attempts {
        responses.push(attempt.await.unwrap());
    }
    for r in &responses {
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        assert_eq!(r.body, responses[0].body, "every retry sees the one order");
    }
    assert_eq!(h.order_count().await, 1);
    assert_eq!(
        h.stocks().await.1,
        95,
        "the losers' reservations were released"
    );
}

/// 200 buyers, 10 laptops: exactly 10 orders, stock 0, everyone else a clean 409.
async fn two_hundred_concurrent_orders_for_ten_units_sell_exactly_ten(backend: Backend) {
    let h = Arc::new(Harness::new(backend).await);
    let attempts: Vec<_> = (0..200)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move {
                h.post(
                    "/orders",
                    json!({"id": format!("rush-{i}"), "user_id": "1", "products": ["1"]}),
                )
                .await
            })
        })
        .collect();
    let mut created = 0;
    let mut refused = 0;
    for attempt in attempts {
        let r = attempt.await.unwrap();
        match (r.status, r.error_code()) {
            (StatusCode::CREATED, _) => created += 1,
            (StatusCode::CONFLICT, "insufficient_stock") => refused += 1,
            other => panic!("unexpected answer {other:?}: {:?}", r.body),
        }
    }
    assert_eq!((created, refused), (10, 190));
    assert_eq!(h.stocks().await.0, 0);
    let listed = h.get("/orders?limit=100").await;
    assert_eq!(listed.body.as_array().unwrap().len(), 10);
}

shop_platform::backend_tests!(
    a_retry_with_the_same_idempotency_key_creates_nothing_new,
    concurrent_retries_with_one_idempotency_key_make_one_order,
    two_hundred_concurrent_orders_for_ten_units_sell_exactly_ten,
    seed_order_is_priced_by_the_server_and_listed,
    total_is_optional_and_quantities_multiply,
    a_wrong_client_total_is_refused_naming_both_values,
    insufficient_stock_is_409_and_takes_nothing,
    unknown_user_or_product_is_422_naming_the_field,
    a_reused_order_id_is_409_and_reserves_nothing_more,
    bad_order_input_is_refused_and_writes_nothing,
    lists_page_by_cursor_and_filter_by_user,
    a_dependency_down_is_a_quick_503_not_a_hang,
    a_token_vouches_for_its_own_account_and_no_other,
    a_peer_that_hangs_is_cut_off_by_the_upstream_timeout,
);

/// The router and the OpenAPI document describe the same routes, both ways.
#[tokio::test]
async fn the_router_and_the_openapi_document_agree() {
    let h = Harness::new(Backend::Sqlite).await;
    shop_platform::testing::assert_router_matches_document(
        &h.router,
        &shop_order::openapi(),
        include_str!("../src/routes.rs"),
    )
    .await;
}
