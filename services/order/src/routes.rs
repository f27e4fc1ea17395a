//! HTTP routes: orders, plus the seed's compatibility routes.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus::{IntCounter, IntCounterVec};
use serde::Deserialize;
use shop_platform::{
    ApiJson, ApiQuery, AppError, AppResult, Caller, Metrics, Page, PageRequest, ServiceClient,
};

use crate::checkout::{IdempotencyKey, Placed, place_order};
use crate::domain::NewOrder;
use crate::storage::{OrderStore, StoreError};

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn OrderStore>,
    pub products: ServiceClient,
    pub users: ServiceClient,
    created: IntCounter,
    failed: IntCounterVec,
}

impl AppState {
    pub fn new(
        store: Arc<dyn OrderStore>,
        products: ServiceClient,
        users: ServiceClient,
        metrics: &Metrics,
    ) -> Self {
        Self {
            store,
            products,
            users,
            created: metrics.counter("orders_created_total", "Orders placed."),
            failed: metrics.counter_vec(
                "orders_failed_total",
                "Orders refused or failed, by error code (validation_failed, insufficient_stock, dependency_unavailable, ...).",
                &["reason"],
            ),
        }
    }
}

impl From<StoreError> for AppError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::DuplicateId(_) => AppError::conflict("order_exists", err.to_string()),
            StoreError::CheckoutAbandoned | StoreError::IdempotencyKeyTaken => {
                AppError::internal(err)
            }
            StoreError::Database(db) => db.into(),
        }
    }
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/orders", post(create_order).get(list_orders))
        .route("/orders/{id}", get(get_order))
        .route("/order", post(create_order))
        .with_state(state)
}

const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Marks a response replayed from an earlier request with the same key.
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

async fn create_order(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<NewOrder>,
) -> AppResult<Response> {
    let outcome = async {
        body.resolve_owner(&caller)?;
        let key = match headers.get(IDEMPOTENCY_KEY) {
            Some(value) => Some(IdempotencyKey::new(
                value.to_str().map_err(|_| {
                    AppError::validation("Idempotency-Key", "must be visible ASCII")
                })?,
                &body,
            )?),
            None => None,
        };
        place_order(&state, &caller, body.validate()?, key).await
    }
    .await;
    match outcome {
        Ok(Placed::Created(order)) => {
            state.created.inc();
            let location = format!("/orders/{}", order.id);
            Ok((
                StatusCode::CREATED,
                [(header::LOCATION, location)],
                axum::Json(order),
            )
                .into_response())
        }
        Ok(Placed::Replayed(record)) => {
            let status = StatusCode::from_u16(record.status).unwrap_or(StatusCode::CREATED);
            let location = format!("/orders/{}", record.order_id);
            Ok((
                status,
                [
                    (header::LOCATION, location),
                    (header::CONTENT_TYPE, "application/json".to_owned()),
                    (IDEMPOTENT_REPLAYED, "true".to_owned()),
                ],
                record.response,
            )
                .into_response())
        }
        Err(err) => {
            // Codes come from a closed set in this crate and the platform.
            state.failed.with_label_values(&[err.code.as_ref()]).inc();
            Err(err)
        }
    }
}

#[derive(Debug, Deserialize)]
struct ListParams {
    user_id: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// A customer lists their own orders (`user_id` defaults to them); admins, and everyone
/// when authentication is off, may list anyone's or all.
async fn list_orders(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> AppResult<Response> {
    let page = PageRequest::parse(params.limit, params.cursor.as_deref())?;
    let mut user_id = params.user_id.filter(|u| !u.is_empty());
    if let Some(user_id) = &user_id {
        shop_platform::validate::id("user_id", user_id)?;
        caller.require_access(user_id, "orders")?;
    } else if !caller.is_admin() {
        user_id = caller.user_id().map(str::to_owned);
    }
    let rows = state.store.list(user_id.as_deref(), page).await?;
    let query = match &user_id {
        Some(user_id) => format!("user_id={user_id}&limit={}", page.limit),
        None => format!("limit={}", page.limit),
    };
    Ok(Page::from_rows(rows, page).into_response("/orders", &query))
}

async fn get_order(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Response> {
    match state.store.get(&id).await? {
        Some(order) => {
            caller.require_access(&order.user_id, "orders")?;
            Ok(axum::Json(order).into_response())
        }
        None => Err(AppError::not_found(format!("no order with id {id:?}"))),
    }
}
