//! When an order cannot be completed after stock was reserved, the reservation is released.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::http::{Method, StatusCode};
use axum::routing::{delete, get, post};
use common::Peers;
use serde_json::json;
use shop_order::domain::Order;
use shop_order::storage::{MIGRATOR, OrderStore, StoreError};
use shop_order::{AppState, SqliteOrderStore, app};
use shop_platform::pagination::PageRequest;
use shop_platform::server::stack;
use shop_platform::testing::{call, temp_dir};
use shop_platform::{Metrics, ServerConfig, ServiceClient, StorageConfig};

/// Reads work; storing an order fails as if the database went away mid-request.
struct StoreThatCannotWrite(SqliteOrderStore);

#[async_trait]
impl OrderStore for StoreThatCannotWrite {
    async fn create(&self, _order: &Order) -> Result<(), StoreError> {
        Err(StoreError::Database(sqlx::Error::PoolClosed))
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

fn router(store: Arc<dyn OrderStore>, product_url: &str, user_url: &str) -> axum::Router {
    let metrics = Metrics::new("order");
    let timeout = Duration::from_secs(2);
    let products = ServiceClient::new("product", product_url, timeout, metrics.clone()).unwrap();
    let users = ServiceClient::new("user", user_url, timeout, metrics.clone()).unwrap();
    stack(
        app(AppState::new(store, products, users, &metrics)),
        &ServerConfig::ephemeral(),
        metrics,
    )
}

#[tokio::test]
async fn a_failed_write_gives_the_reserved_stock_back() {
    let peers = Peers::start().await;
    let dir = temp_dir();
    let pool = StorageConfig::in_dir(dir.path())
        .open_sqlite("order", &MIGRATOR)
        .await
        .unwrap();
    let store = Arc::new(StoreThatCannotWrite(SqliteOrderStore::new(pool)));
    let router = router(store, &peers.product.url, &peers.user.url);

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
}

#[tokio::test]
async fn a_price_change_between_quote_and_reservation_is_refused_and_released() {
    let released: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let r2 = released.clone();
    // Quotes 999.99 but reserves at 1099.99, as if the price changed in between.
    let product = stub(
        Router::new()
            .route("/products/{id}", get(|| async { axum::Json(json!({"id": "1", "name": "Laptop", "price": 999.99, "quantity": 10})) }))
            .route("/reservations", post(|| async {
                (StatusCode::CREATED, axum::Json(json!({"id": "r-9", "items": [{"product_id": "1", "unit_price": 1099.99}]})))
            }))
            .route("/reservations/{id}", delete(move |axum::extract::Path(id): axum::extract::Path<String>| {
                r2.lock().unwrap().push(id);
                async { StatusCode::NO_CONTENT }
            })),
    )
    .await;
    let user = stub(Router::new().route(
        "/users/{id}",
        get(|| async { axum::Json(json!({"id": "1"})) }),
    ))
    .await;
    let dir = temp_dir();
    let pool = StorageConfig::in_dir(dir.path())
        .open_sqlite("order", &MIGRATOR)
        .await
        .unwrap();
    let store = Arc::new(SqliteOrderStore::new(pool));
    let router = router(store.clone(), &product, &user);

    let r = call(
        &router,
        Method::POST,
        "/orders",
        json!({"id": "o-1", "user_id": "1", "products": ["1"]}),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "price_changed")
    );
    assert_eq!(*released.lock().unwrap(), vec!["r-9".to_owned()]);
    assert!(!store.exists("o-1").await.unwrap(), "nothing stored");
}

async fn stub(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}
