//! When an order cannot be completed after stock was reserved, the reservation is
//! released: at once by the request (compensation), or later by the recovery loop when
//! the request's process died or its compensation could not be delivered.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::http::{Method, StatusCode};
use axum::routing::{delete, get, post};
use common::Peers;
use serde_json::json;
use shop_order::checkout::recover_abandoned;
use shop_order::domain::Order;
use shop_order::storage::{
    Checkout, CheckoutStart, IdempotencyRecord, MIGRATIONS, OrderStore, StoreError,
};
use shop_order::{AppState, SqlOrderStore, app};
use shop_platform::events::{Handled, NewEvent, Outbox};
use shop_platform::pagination::PageRequest;
use shop_platform::server::stack;
use shop_platform::testing::{Backend, TestDatabase, call, call_with_headers};
use shop_platform::{Metrics, ServerConfig, ServiceClient};

/// How a wrapped store misbehaves when the order is stored.
#[derive(Clone, Copy)]
enum Fault {
    /// Fails as if the database went away mid-request.
    CannotWrite,
    /// Takes so long that the recovery loop takes the checkout over first.
    TooSlow,
}

struct FaultyStore(Arc<SqlOrderStore>, Fault);

#[async_trait]
impl OrderStore for FaultyStore {
    async fn create(
        &self,
        order: &Order,
        idempotency: Option<&IdempotencyRecord>,
        placed: &NewEvent,
    ) -> Result<(), StoreError> {
        match self.1 {
            Fault::CannotWrite => Err(StoreError::Database(sqlx::Error::PoolClosed)),
            Fault::TooSlow => {
                self.0.claim_abandoned(i64::MAX).await?;
                self.0.create(order, idempotency, placed).await
            }
        }
    }
    async fn transition(
        &self,
        order: &Order,
        status: &'static str,
        at: &str,
        event: &NewEvent,
    ) -> Result<Option<Order>, StoreError> {
        self.0.transition(order, status, at, event).await
    }
    async fn stock_returned(
        &self,
        queue: &str,
        event_id: &str,
        reservation_id: &str,
        at: &str,
    ) -> Result<Handled, StoreError> {
        self.0
            .stock_returned(queue, event_id, reservation_id, at)
            .await
    }
    async fn begin_checkout(
        &self,
        checkout: &Checkout,
        idempotency_key: Option<&str>,
    ) -> Result<CheckoutStart, StoreError> {
        self.0.begin_checkout(checkout, idempotency_key).await
    }
    async fn end_checkout(&self, reservation_id: &str) -> Result<(), StoreError> {
        self.0.end_checkout(reservation_id).await
    }
    async fn claim_abandoned(&self, started_before_ms: i64) -> Result<Vec<String>, StoreError> {
        self.0.claim_abandoned(started_before_ms).await
    }
    async fn idempotency_record(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.0.idempotency_record(key).await
    }
    async fn get(&self, id: &str) -> Result<Option<Order>, StoreError> {
        self.0.get(id).await
    }
    async fn exists(&self, id: &str) -> Result<bool, StoreError> {
        self.0.exists(id).await
    }
    async fn list(
        &self,
        user_id: Option<&str>,
        page: PageRequest,
    ) -> Result<Vec<(i64, Order)>, StoreError> {
        self.0.list(user_id, page).await
    }
}

fn state(store: Arc<dyn OrderStore>, product_url: &str, user_url: &str) -> AppState {
    let metrics = Metrics::new("order");
    let timeout = Duration::from_secs(2);
    let products = ServiceClient::new("product", product_url, timeout, metrics.clone()).unwrap();
    let users = ServiceClient::new("user", user_url, timeout, metrics.clone()).unwrap();
    AppState::new(store, products, users, &metrics)
}

fn router(state: AppState) -> axum::Router {
    let metrics = Metrics::new("order");
    stack(
        app(state).layer(axum::Extension(shop_platform::Authenticator::demo())),
        &ServerConfig::ephemeral(),
        metrics,
    )
}

async fn open_store(dir: &TestDatabase) -> Arc<SqlOrderStore> {
    let db = dir.storage().open("order", &MIGRATIONS).await.unwrap();
    Arc::new(SqlOrderStore::new(&db, Outbox::default()))
}

async fn a_failed_write_gives_the_reserved_stock_back(backend: Backend) {
    let peers = Peers::start(backend).await;
    let dir = peers.order_db().await;
    let inner = open_store(&dir).await;
    let store = Arc::new(FaultyStore(inner.clone(), Fault::CannotWrite));
    let router = router(state(store, &peers.product.url, &peers.user.url));

    let r = call(
        &router,
        Method::POST,
        "/orders",
        json!({"user_id": "1", "items": [{"product_id": "1", "quantity": 4}]}),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "dependency_unavailable")
    );
    assert_eq!(peers.stock("1").await, 10, "the reservation was released");
    assert!(
        inner.claim_abandoned(i64::MAX).await.unwrap().is_empty(),
        "the compensated checkout is forgotten"
    );
}

/// A checkout that outlives CHECKOUT_TIMEOUT loses to the recovery loop: its order is
/// not stored, and its stock comes back exactly once.
async fn a_checkout_overtaken_by_recovery_stores_nothing(backend: Backend) {
    let peers = Peers::start(backend).await;
    let dir = peers.order_db().await;
    let inner = open_store(&dir).await;
    let store = Arc::new(FaultyStore(inner.clone(), Fault::TooSlow));
    let state = state(store, &peers.product.url, &peers.user.url);
    let router = router(state.clone());

    let r = call_with_headers(
        &router,
        Method::POST,
        "/orders",
        &[("Idempotency-Key", "slow-key")],
        json!({"id": "slow-1", "user_id": "1", "items": [{"product_id": "1", "quantity": 3}]}),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "dependency_unavailable"),
        "{:?}",
        r.body
    );
    assert!(!inner.exists("slow-1").await.unwrap(), "no order stored");
    // Nor anything stored with it: its lines, its event, its idempotency record.
    let db = dir.storage().open("order", &MIGRATIONS).await.unwrap();
    for table in ["order_items", "outbox", "idempotency_keys"] {
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(rows, 0, "{table}");
    }
    db.close().await;
    assert_eq!(peers.stock("1").await, 7, "held until recovery releases it");
    assert_eq!(recover_abandoned(&state, Duration::ZERO).await.unwrap(), 1);
    assert_eq!(peers.stock("1").await, 10);
    assert_eq!(recover_abandoned(&state, Duration::ZERO).await.unwrap(), 0);
    assert_eq!(peers.stock("1").await, 10, "released once");
}

/// The process died between reserving and storing: the checkout row and the held
/// reservation are all that is left. Recovery waits for the timeout, then releases.
async fn a_checkout_left_by_a_dead_process_is_released_after_the_timeout(backend: Backend) {
    let peers = Peers::start(backend).await;
    let dir = peers.order_db().await;
    let store = open_store(&dir).await;
    let state = state(store.clone(), &peers.product.url, &peers.user.url);
    store
        .begin_checkout(
            &Checkout {
                reservation_id: "dead-1".into(),
                order_id: "o-dead".into(),
                started_at_ms: chrono::Utc::now().timestamp_millis(),
            },
            None,
        )
        .await
        .unwrap();
    let reserved = peers
        .http
        .post(format!("{}/reservations", peers.product.url))
        .json(&json!({"id": "dead-1", "items": [{"product_id": "2", "quantity": 5}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(reserved.status(), 201);
    assert_eq!(peers.stock("2").await, 95);

    // Too young: it may belong to a live checkout on another replica.
    assert_eq!(
        recover_abandoned(&state, Duration::from_secs(60))
            .await
            .unwrap(),
        0
    );
    assert_eq!(peers.stock("2").await, 95);
    assert_eq!(recover_abandoned(&state, Duration::ZERO).await.unwrap(), 1);
    assert_eq!(peers.stock("2").await, 100);

    // A checkout that died before its reserve reached the product service: releasing
    // closes the id, so the reserve cannot take stock if it arrives after all.
    store
        .begin_checkout(
            &Checkout {
                reservation_id: "dead-2".into(),
                order_id: "o-dead-2".into(),
                started_at_ms: 0,
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(recover_abandoned(&state, Duration::ZERO).await.unwrap(), 1);
    let late = peers
        .http
        .post(format!("{}/reservations", peers.product.url))
        .json(&json!({"id": "dead-2", "items": [{"product_id": "2", "quantity": 5}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 409);
    assert_eq!(peers.stock("2").await, 100);
}

/// The reservation is the quote: the order is charged the price the stock was taken
/// at, and a client's `total` that disagrees releases what was reserved.
async fn the_order_is_charged_the_reserved_price_and_a_wrong_total_releases_it(backend: Backend) {
    let released: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let reserved: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let (r1, r2) = (reserved.clone(), released.clone());
    // The catalogue would say 999.99; the reservation took the stock at 1099.99.
    let product = stub(
        Router::new()
            .route("/products/{id}", get(|| async { axum::Json(json!({"id": "1", "name": "Laptop", "price": 999.99, "quantity": 10})) }))
            .route("/reservations", post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                let id = body["id"].as_str().unwrap().to_owned();
                r1.lock().unwrap().push(id.clone());
                async move {
                    (StatusCode::CREATED, axum::Json(json!({"id": id, "items": [{"product_id": "1", "name": "Laptop", "quantity": 1, "unit_price": 1099.99}]})))
                }
            }))
            .route("/reservations/{id}", delete(move |axum::extract::Path(id): axum::extract::Path<String>| {
                r2.lock().unwrap().push(id);
                async { StatusCode::NO_CONTENT }
            })),
    )
    .await;
    let user = user_stub().await;
    let dir = TestDatabase::new(backend).await;
    let store = open_store(&dir).await;
    let router = router(state(store.clone(), &product, &user));

    let r = call(
        &router,
        Method::POST,
        "/orders",
        json!({"id": "o-1", "user_id": "1", "products": ["1"], "total": 999.99}),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        "{:?}",
        r.body
    );
    let reserved_ids = reserved.lock().unwrap().clone();
    assert_eq!(reserved_ids.len(), 1);
    assert_eq!(
        *released.lock().unwrap(),
        reserved_ids,
        "the reservation made was released"
    );
    assert!(!store.exists("o-1").await.unwrap(), "nothing stored");
    assert!(
        store.claim_abandoned(i64::MAX).await.unwrap().is_empty(),
        "the compensated checkout is forgotten"
    );

    let r = call(
        &router,
        Method::POST,
        "/orders",
        json!({"id": "o-2", "user_id": "1", "products": ["1"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["total"], json!(1099.99));
    assert_eq!(r.body["items"][0]["name"], json!("Laptop"));
    assert_eq!(released.lock().unwrap().len(), 1, "nothing more released");
}

/// A product service that predates `name` in reservations (a rolling upgrade): the
/// name is looked up, and the order still goes through.
async fn a_reservation_without_names_is_completed_from_the_catalogue(backend: Backend) {
    let product = stub(
        Router::new()
            .route("/products/{id}", get(|| async { axum::Json(json!({"id": "1", "name": "Laptop", "price": 999.99, "quantity": 10})) }))
            .route("/reservations", post(|axum::Json(body): axum::Json<serde_json::Value>| async move {
                (StatusCode::CREATED, axum::Json(json!({"id": body["id"], "items": [{"product_id": "1", "quantity": 2, "unit_price": 999.99}]})))
            })),
    )
    .await;
    let user = user_stub().await;
    let dir = TestDatabase::new(backend).await;
    let store = open_store(&dir).await;
    let router = router(state(store, &product, &user));
    let r = call(
        &router,
        Method::POST,
        "/orders",
        json!({"user_id": "1", "products": ["1", "1"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["items"][0]["name"], json!("Laptop"));
    assert_eq!(r.body["total"], json!(1999.98));
}

/// A user service that knows user 1.
async fn user_stub() -> String {
    stub(Router::new().route(
        "/users/{id}",
        get(|| async { axum::Json(json!({"id": "1"})) }),
    ))
    .await
}

async fn stub(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

shop_platform::backend_tests!(
    a_failed_write_gives_the_reserved_stock_back,
    a_checkout_overtaken_by_recovery_stores_nothing,
    a_checkout_left_by_a_dead_process_is_released_after_the_timeout,
    the_order_is_charged_the_reserved_price_and_a_wrong_total_releases_it,
    a_reservation_without_names_is_completed_from_the_catalogue,
);
