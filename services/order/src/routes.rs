//! HTTP routes: orders, plus the seed's compatibility routes.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus::{IntCounter, IntCounterVec};
use serde::Deserialize;
use shop_platform::events::NewEvent;
use shop_platform::{
    ApiJson, ApiQuery, AppError, AppResult, Caller, Metrics, Page, PageRequest, Preconditions,
    Representation, ServiceClient,
};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::checkout::{IdempotencyKey, Placed, place_order};
use crate::domain::{Action, NewOrder, Order, OrderEvent, Step};
use crate::storage::{OrderStore, StoreError};

/// The router's state: one `Arc`, as axum clones it for every request.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub store: Arc<dyn OrderStore>,
    pub products: ServiceClient,
    pub users: ServiceClient,
    created: IntCounter,
    failed: IntCounterVec,
    changed: IntCounterVec,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(
        store: Arc<dyn OrderStore>,
        products: ServiceClient,
        users: ServiceClient,
        metrics: &Metrics,
    ) -> Self {
        Self(Arc::new(Shared {
            store,
            products,
            users,
            created: metrics.counter("orders_created_total", "Orders placed."),
            failed: metrics.counter_vec(
                "orders_failed_total",
                "Orders refused or failed, by error code (validation_failed, insufficient_stock, dependency_unavailable, ...).",
                "reason",
                // What placing an order can answer; any other code still gets its series.
                &[
                    "validation_failed",
                    "insufficient_stock",
                    "order_exists",
                    "forbidden",
                    "invalid_token",
                    "dependency_unavailable",
                    "internal",
                ],
            ),
            changed: metrics.counter_vec(
                "orders_status_changes_total",
                "Orders confirmed or cancelled, by the status they moved to.",
                "to",
                &["confirmed", "cancelled"],
            ),
        }))
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
    routes().split_for_parts().0.with_state(state)
}

/// The service's OpenAPI document, from the same annotations the router is built from.
pub fn openapi() -> serde_json::Value {
    let mut doc = shop_platform::openapi::document(routes().split_for_parts().1);
    // Exactly one of the two forms (checked by NewOrder::validate).
    doc["components"]["schemas"]["NewOrder"]["oneOf"] =
        serde_json::json!([{"required": ["products"]}, {"required": ["items"]}]);
    doc
}

#[derive(OpenApi)]
#[openapi(
    info(title = "shop order service", description = "Places orders (priced and stock-checked by the product service) and lists them."),
    tags(
        (name = "orders", description = "Orders."),
        (name = "compatibility", description = "The seed API's routes, kept for its walkthrough."),
    )
)]
struct ApiDoc;

fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_order, list_orders))
        .routes(routes!(get_order))
        .routes(routes!(cancel_order))
        .routes(routes!(confirm_order))
        .routes(routes!(create_order_seed))
}

const CREATE_ERRORS_403: &str =
    "`forbidden`: `user_id` names someone else and the caller is not an admin";
const CREATE_ERRORS_409: &str = "`order_exists`: an order with this id exists\n\n`insufficient_stock`: not enough units of a product";
const CREATE_ERRORS_422: &str = "`validation_failed`: a field breaks its constraints, a product or the user does not exist, `total` differs from the computed total, or the `Idempotency-Key` was used with another body";

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The request's `Idempotency-Key` value, if any: taken alone, where a `HeaderMap`
/// extractor would copy every header of the request.
struct IdempotencyKeyHeader(Option<axum::http::HeaderValue>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IdempotencyKeyHeader {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(parts.headers.get(IDEMPOTENCY_KEY).cloned()))
    }
}

/// Marks a response replayed from an earlier request with the same key.
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Place an order. Totals are computed by the server; the order is stored only once
/// stock is reserved. With `Idempotency-Key`, a retry returns the first answer.
#[utoipa::path(post, path = "/orders", tag = "orders", operation_id = "create_order",
    request_body = NewOrder,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe: the same key and body return the first answer", min_length = 1, max_length = 255, pattern = "^[!-~]{1,255}$")),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Placed", body = Order, headers(
            ("Location" = String, description = "the order's URL"),
            ("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same key"))),
        (status = 403, description = CREATE_ERRORS_403),
        (status = 409, description = CREATE_ERRORS_409),
        (status = 422, description = CREATE_ERRORS_422),
    ))]
async fn create_order(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    ApiJson(mut body): ApiJson<NewOrder>,
) -> AppResult<Response> {
    let outcome = async {
        body.resolve_owner(&caller)?;
        let key = match key {
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
        Ok(Placed::Created { order, json }) => {
            state.created.inc();
            let location = format!("/orders/{}", order.id);
            Ok((
                StatusCode::CREATED,
                [
                    (header::LOCATION, location),
                    (header::CONTENT_TYPE, "application/json".to_owned()),
                ],
                json,
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

/// Place an order (the seed's route; the same as `POST /orders`).
#[utoipa::path(post, path = "/order", tag = "compatibility", operation_id = "create_order_seed",
    request_body = NewOrder,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe: the same key and body return the first answer", min_length = 1, max_length = 255, pattern = "^[!-~]{1,255}$")),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Placed", body = Order, headers(
            ("Location" = String, description = "the order's URL"),
            ("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same key"))),
        (status = 403, description = CREATE_ERRORS_403),
        (status = 409, description = CREATE_ERRORS_409),
        (status = 422, description = CREATE_ERRORS_422),
    ))]
async fn create_order_seed(
    state: State<AppState>,
    caller: Caller,
    key: IdempotencyKeyHeader,
    body: ApiJson<NewOrder>,
) -> AppResult<Response> {
    create_order(state, caller, key, body).await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// Whose orders (default: the caller's own; admins may name anyone or omit it for all).
    #[param(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$")]
    user_id: Option<String>,
    /// Page size.
    #[param(minimum = 1, maximum = 100, default = 50)]
    #[serde(default, deserialize_with = "shop_platform::pagination::limit")]
    limit: Option<u32>,
    /// From the previous page's `X-Next-Cursor` header.
    #[param(max_length = 64)]
    cursor: Option<String>,
}

/// List orders, oldest first.
#[utoipa::path(get, path = "/orders", tag = "orders", operation_id = "list_orders",
    params(ListParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A JSON array; when more rows exist, `Link` (rel=next) and `X-Next-Cursor` name the next page.", body = Vec<Order>, headers(
            ("Link" = String, description = "`<...>; rel=\"next\"` when another page exists"),
            ("X-Next-Cursor" = String, description = "the cursor of the next page"))),
        (status = 400, description = "`invalid_cursor`: the cursor is not one this API issued"),
        (status = 403, description = "`forbidden`: `user_id` names someone else and the caller is not an admin"),
        (status = 422, description = "`validation_failed`: `limit` is out of range or `user_id` breaks its pattern"),
    ))]
/// A customer lists their own orders (`user_id` defaults to them); admins, and everyone
/// when authentication is off, may list anyone's or all.
async fn list_orders(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> AppResult<Response> {
    let page = PageRequest::parse(params.limit, params.cursor.as_deref())?;
    let mut user_id = params.user_id;
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

/// One order (its owner or an admin).
#[utoipa::path(get, path = "/orders/{id}", tag = "orders", operation_id = "get_order",
    params(("id" = String, Path, description = "Order id", min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The order", body = Order, headers(
            ("ETag" = String, description = "the order's version, quoted: send it in `If-Match` to change the order only as seen"))),
        (status = 304, description = "`If-None-Match` named the current version"),
        (status = 403, description = "`forbidden`: the order is someone else's"),
        (status = 404, description = "`not_found`: no order with this id"),
        (status = 422, description = "`validation_failed`: the id breaks its pattern"),
    ))]
async fn get_order(
    State(state): State<AppState>,
    caller: Caller,
    headers: Preconditions,
    Path(id): Path<String>,
) -> AppResult<Response> {
    shop_platform::validate::id("id", &id)?;
    match state.store.get(&id).await? {
        Some(order) => {
            caller.require_access(&order.user_id, "orders")?;
            Ok(representation(&order)?.respond_to(&headers))
        }
        None => Err(no_order(&id)),
    }
}

fn no_order(id: &str) -> AppError {
    AppError::not_found(format!("no order with id {id:?}"))
}

/// The order's JSON, tagged with its version.
fn representation(order: &Order) -> Result<Representation, AppError> {
    let body = serde_json::to_vec(order).map_err(AppError::internal)?;
    Ok(Representation::json_tagged(
        body,
        &order.version.to_string(),
    ))
}

const CHANGE_PARAMS_ID: &str = "Order id";

/// Cancel an order: its owner, while it is `pending` or `confirmed`, or an admin. Its
/// reserved stock goes back on sale shortly after (`stock_returned_at` says when).
/// Cancelling a cancelled order answers it again and changes nothing.
#[utoipa::path(post, path = "/orders/{id}/cancel", tag = "orders", operation_id = "cancel_order",
    params(
        ("id" = String, Path, description = CHANGE_PARAMS_ID, min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$"),
        ("If-Match" = Option<String>, Header, description = "Change the order only if its `ETag` is still this one"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Cancelled (now, or before)", body = Order, headers(
            ("ETag" = String, description = "the order's new version, quoted"))),
        (status = 404, description = "`not_found`: no order with this id that the caller may see"),
        (status = 412, description = "`precondition_failed`: `If-Match` names a version the order is no longer at"),
        (status = 422, description = "`validation_failed`: the id breaks its pattern, or `If-Match` is malformed"),
    ))]
async fn cancel_order(
    State(state): State<AppState>,
    caller: Caller,
    headers: Preconditions,
    Path(id): Path<String>,
) -> AppResult<Response> {
    change(&state, &caller, &headers, &id, Action::Cancel).await
}

/// Confirm a pending order (admins only). Confirming a confirmed order answers it again
/// and changes nothing; a cancelled order cannot be confirmed.
#[utoipa::path(post, path = "/orders/{id}/confirm", tag = "orders", operation_id = "confirm_order",
    params(
        ("id" = String, Path, description = CHANGE_PARAMS_ID, min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$"),
        ("If-Match" = Option<String>, Header, description = "Change the order only if its `ETag` is still this one"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Confirmed (now, or before)", body = Order, headers(
            ("ETag" = String, description = "the order's new version, quoted"))),
        (status = 403, description = "`forbidden`: only an admin confirms orders"),
        (status = 404, description = "`not_found`: no order with this id that the caller may see"),
        (status = 409, description = "`invalid_transition`: the order is cancelled"),
        (status = 412, description = "`precondition_failed`: `If-Match` names a version the order is no longer at"),
        (status = 422, description = "`validation_failed`: the id breaks its pattern, or `If-Match` is malformed"),
    ))]
async fn confirm_order(
    State(state): State<AppState>,
    caller: Caller,
    headers: Preconditions,
    Path(id): Path<String>,
) -> AppResult<Response> {
    change(&state, &caller, &headers, &id, Action::Confirm).await
}

/// Reads the order, decides, and writes the change only if the order is still at the
/// version read; a lost race reads again and decides again (the winner may have done
/// this very change, which then answers as a repeat).
async fn change(
    state: &AppState,
    caller: &Caller,
    headers: &Preconditions,
    id: &str,
    action: Action,
) -> AppResult<Response> {
    shop_platform::validate::id("id", id)?;
    loop {
        // Someone else's order is not found: do not confirm it exists.
        let order = state
            .store
            .get(id)
            .await?
            .filter(|order| caller.may_access(&order.user_id))
            .ok_or_else(|| no_order(id))?;
        if action == Action::Confirm && !caller.is_admin() {
            return Err(shop_platform::identity::forbidden(
                "only an admin confirms orders",
            ));
        }
        let current = representation(&order)?;
        let status = match action.step(&order.status)? {
            Step::AlreadyDone => return Ok(current.with_status(StatusCode::OK)),
            Step::To(status) => status,
        };
        if !current.if_match_passes(headers)? {
            return Err(AppError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                format!(
                    "the order is at version {}, not the one If-Match names; read it again",
                    order.version
                ),
            ));
        }
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut after = order.clone();
        after.status = status.to_owned();
        let event = NewEvent::new(action.event(), &OrderEvent::from(&after));
        if let Some(changed) = state.store.transition(&order, status, &at, &event).await? {
            state.changed.with_label_values(&[status]).inc();
            return Ok(representation(&changed)?.with_status(StatusCode::OK));
        }
    }
}
