//! HTTP routes: the REST API plus the seed's compatibility routes.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use prometheus::{IntCounter, IntCounterVec};
use serde::Deserialize;
use shop_platform::validate::{self, IdQuery};
use shop_platform::{ApiJson, ApiQuery, AppError, AppResult, Caller, Metrics, Page, PageRequest};

use crate::domain::{NewProduct, ProductPatch, ReservationRequest};
use crate::storage::{ProductStore, Release, Reserved, StoreError};

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn ProductStore>,
    counters: Counters,
}

#[derive(Clone)]
struct Counters {
    created: IntCounter,
    reservations: IntCounterVec,
    released: IntCounter,
}

impl AppState {
    pub fn new(store: Arc<dyn ProductStore>, metrics: &Metrics) -> Self {
        Self {
            store,
            counters: Counters {
                created: metrics.counter("products_created_total", "Products added to the catalogue."),
                reservations: metrics.counter_vec(
                    "stock_reservations_total",
                    "Stock reservation attempts by outcome (reserved, replayed, insufficient_stock, unknown_product).",
                    &["outcome"],
                ),
                released: metrics.counter(
                    "stock_reservations_released_total",
                    "Reservations whose units were given back.",
                ),
            },
        }
    }
}

impl From<StoreError> for AppError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::DuplicateId(_) => AppError::conflict("product_exists", err.to_string()),
            StoreError::UnknownProduct(_) => AppError::not_found(err.to_string()),
            StoreError::InsufficientStock { .. } => {
                AppError::conflict("insufficient_stock", err.to_string())
            }
            StoreError::ReservationReleased(_) => {
                AppError::conflict("reservation_released", err.to_string())
            }
            StoreError::ReservationMismatch(_) => {
                AppError::conflict("reservation_exists", err.to_string())
            }
            StoreError::Database(db) => db.into(),
        }
    }
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/products", get(list_products).post(create_product))
        .route("/products/{id}", get(get_product).patch(update_product))
        .route("/product", get(get_product_by_query))
        .route("/reservations", post(reserve))
        .route("/reservations/{id}", delete(release))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct ListParams {
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn list_products(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> AppResult<Response> {
    let page = PageRequest::parse(params.limit, params.cursor.as_deref())?;
    let rows = state.store.list(page).await?;
    Ok(Page::from_rows(rows, page).into_response("/products", &format!("limit={}", page.limit)))
}

async fn get_product(State(state): State<AppState>, Path(id): Path<String>) -> AppResult<Response> {
    find(&state, &id).await
}

/// Seed route: `GET /product?id=1`.
async fn get_product_by_query(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<IdQuery>,
) -> AppResult<Response> {
    find(&state, &query.required()?).await
}

async fn find(state: &AppState, id: &str) -> AppResult<Response> {
    match state.store.get(id).await? {
        Some(product) => Ok(axum::Json(product).into_response()),
        None => Err(AppError::not_found(format!("no product with id {id:?}"))),
    }
}

/// Catalogue writes are for admins. Stock reservations are not public: the gateway has
/// no route to them and the chart's NetworkPolicy lets only the order service in.
async fn create_product(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<NewProduct>,
) -> AppResult<Response> {
    caller.require_admin()?;
    let product = body.validate()?;
    state.store.create(&product).await?;
    state.counters.created.inc();
    let location = format!("/products/{}", product.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(product),
    )
        .into_response())
}

async fn update_product(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<ProductPatch>,
) -> AppResult<Response> {
    caller.require_admin()?;
    let patch = patch.validate()?;
    match state.store.update(&id, &patch).await? {
        Some(product) => Ok(axum::Json(product).into_response()),
        None => Err(AppError::not_found(format!("no product with id {id:?}"))),
    }
}

async fn reserve(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ReservationRequest>,
) -> AppResult<Response> {
    let (id, order_id, lines) = body.validate()?;
    let outcome = state.store.reserve(&id, order_id.as_deref(), &lines).await;
    let label = match &outcome {
        Ok(Reserved { created: true, .. }) => "reserved",
        Ok(Reserved { created: false, .. }) => "replayed",
        Err(StoreError::InsufficientStock { .. }) => "insufficient_stock",
        Err(StoreError::UnknownProduct(_)) => "unknown_product",
        Err(_) => "error",
    };
    state
        .counters
        .reservations
        .with_label_values(&[label])
        .inc();
    match outcome {
        Ok(Reserved {
            reservation,
            created,
        }) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((status, axum::Json(reservation)).into_response())
        }
        Err(StoreError::UnknownProduct(product_id)) => {
            let index = lines
                .iter()
                .position(|l| l.product_id == product_id)
                .unwrap_or(0);
            Err(AppError::validation(
                format!("items[{index}].product_id"),
                format!("no product with id {product_id:?}"),
            ))
        }
        Err(other) => Err(other.into()),
    }
}

/// Idempotent: afterwards the reservation holds nothing, whether it held stock, was
/// released before, or never existed (its id is then closed against a late reserve).
async fn release(State(state): State<AppState>, Path(id): Path<String>) -> AppResult<StatusCode> {
    validate::id("id", &id)?;
    if state.store.release(&id).await? == Release::Released {
        state.counters.released.inc();
    }
    Ok(StatusCode::NO_CONTENT)
}
