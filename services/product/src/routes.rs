//! HTTP routes: the REST API plus the seed's compatibility routes.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus::{IntCounter, IntCounterVec};
use serde::Deserialize;
use shop_platform::pagination::announce_next_page;
use shop_platform::validate::{self, IdQuery};
use shop_platform::{
    ApiJson, ApiQuery, AppError, AppResult, Caller, Metrics, PageRequest, Preconditions,
};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::catalogue::{Catalogue, Source};
use crate::domain::{NewProduct, Product, ProductPatch, Reservation, ReservationRequest};
use crate::storage::{ProductStore, Release, Reserved, StoreError};

/// Cloned for every request by the router: one reference count, not one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub store: Arc<dyn ProductStore>,
    /// What reads are answered from; writes go to `store` and then here.
    pub catalogue: Arc<Catalogue>,
    counters: Counters,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

struct Counters {
    created: IntCounter,
    reservations: IntCounterVec,
    released: IntCounter,
}

impl AppState {
    pub fn new(store: Arc<dyn ProductStore>, catalogue: Arc<Catalogue>, metrics: &Metrics) -> Self {
        Self(Arc::new(Shared {
            store,
            catalogue,
            counters: Counters {
                created: metrics.counter("products_created_total", "Products added to the catalogue."),
                reservations: metrics.counter_vec(
                    "stock_reservations_total",
                    "Stock reservation attempts by outcome (reserved, replayed, insufficient_stock, unknown_product, error).",
                    "outcome",
                    &["reserved", "replayed", "insufficient_stock", "unknown_product", "error"],
                ),
                released: metrics.counter(
                    "stock_reservations_released_total",
                    "Reservations whose units were given back.",
                ),
            },
        }))
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
    routes().split_for_parts().0.with_state(state)
}

/// The service's OpenAPI document, from the same annotations the router is built from.
pub fn openapi() -> serde_json::Value {
    shop_platform::openapi::document(routes().split_for_parts().1)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "shop product service", description = "The catalogue and its stock. `/reservations` is internal: only the order service may call it (the gateway has no route to it)."),
    tags(
        (name = "products", description = "The catalogue."),
        (name = "reservations", description = "Stock held for orders (internal)."),
        (name = "compatibility", description = "The seed API's routes, kept for its walkthrough."),
    )
)]
struct ApiDoc;

fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_products, create_product))
        .routes(routes!(get_product, update_product))
        .routes(routes!(get_product_by_query))
        .routes(routes!(reserve))
        .routes(routes!(release))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// Page size.
    #[param(minimum = 1, maximum = 100, default = 50)]
    #[serde(default, deserialize_with = "shop_platform::pagination::limit")]
    limit: Option<u32>,
    /// From the previous page's `X-Next-Cursor` header.
    #[param(max_length = 64)]
    cursor: Option<String>,
}

const PAGE_HEADERS: &str =
    "A JSON array; when more rows exist, `Link` (rel=next) and `X-Next-Cursor` name the next page.";

/// List products, oldest first.
#[utoipa::path(get, path = "/products", tag = "products", operation_id = "list_products",
    params(ListParams),
    responses(
        (status = 200, description = PAGE_HEADERS, body = Vec<Product>, headers(
            ("ETag" = String, description = "the page's strong validator"),
            ("Link" = String, description = "`<...>; rel=\"next\"` when another page exists"),
            ("X-Next-Cursor" = String, description = "the cursor of the next page"))),
        (status = 304, description = "`If-None-Match` names the page's current `ETag`"),
        (status = 400, description = "`invalid_cursor`: the cursor is not one this API issued"),
        (status = 422, description = "`validation_failed`: `limit` is out of range"),
    ))]
async fn list_products(
    State(state): State<AppState>,
    headers: Preconditions,
    ApiQuery(params): ApiQuery<ListParams>,
) -> AppResult<Response> {
    let request = PageRequest::parse(params.limit, params.cursor.as_deref())?;
    let page = state.catalogue.page(request.after, request.limit);
    let mut response = page.representation.respond_to(&headers);
    if let Some(after) = page.next_after {
        let query = format!("limit={}", request.limit);
        announce_next_page(response.headers_mut(), "/products", &query, after);
    }
    Ok(response)
}

/// One product.
#[utoipa::path(get, path = "/products/{id}", tag = "products", operation_id = "get_product",
    params(("id" = String, Path, description = "Product id", min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The product", body = Product,
            headers(("ETag" = String, description = "the product's strong validator"))),
        (status = 304, description = "`If-None-Match` names the product's current `ETag`"),
        (status = 404, description = "`not_found`: no product with this id"),
        (status = 422, description = "`validation_failed`: the id breaks its pattern"),
    ))]
async fn get_product(
    State(state): State<AppState>,
    headers: Preconditions,
    Path(id): Path<String>,
) -> AppResult<Response> {
    validate::id("id", &id)?;
    find(&state, &headers, &id).await
}

/// One product by `?id=` (the seed's route).
#[utoipa::path(get, path = "/product", tag = "compatibility", operation_id = "get_product_by_query",
    params(IdQuery),
    responses(
        (status = 200, description = "The product", body = Product,
            headers(("ETag" = String, description = "the product's strong validator"))),
        (status = 304, description = "`If-None-Match` names the product's current `ETag`"),
        (status = 400, description = "`missing_parameter`: no `id` given"),
        (status = 404, description = "`not_found`: no product with this id"),
        (status = 422, description = "`validation_failed`: the id breaks its pattern"),
    ))]
async fn get_product_by_query(
    State(state): State<AppState>,
    headers: Preconditions,
    ApiQuery(query): ApiQuery<IdQuery>,
) -> AppResult<Response> {
    find(&state, &headers, &query.required()?).await
}

/// From memory; a product this replica has not heard of yet (created on another one a
/// moment ago) is looked up in the database before answering 404.
async fn find(state: &AppState, headers: &HeaderMap, id: &str) -> AppResult<Response> {
    let entry = match state.catalogue.get(id) {
        Some(entry) => Some(entry),
        None => state
            .store
            .get(id)
            .await?
            .map(|row| state.catalogue.apply_one(row, Source::Lookup)),
    };
    match entry {
        Some(entry) => Ok(entry.representation().respond_to(headers)),
        None => Err(AppError::not_found(format!("no product with id {id:?}"))),
    }
}

/// Add a product (admins).
#[utoipa::path(post, path = "/products", tag = "products", operation_id = "create_product",
    request_body = NewProduct,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created", body = Product, headers(("Location" = String, description = "the product's URL"))),
        (status = 403, description = "`forbidden`: the caller is not an admin"),
        (status = 409, description = "`product_exists`: a product with this id exists"),
    ))]
/// Catalogue writes are for admins. Stock reservations are not public: the gateway has
/// no route to them and the chart's NetworkPolicy lets only the order service in.
async fn create_product(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<NewProduct>,
) -> AppResult<Response> {
    caller.require_admin()?;
    let product = body.validate()?;
    let row = state.store.create(&product).await?;
    state.counters.created.inc();
    let location = format!("/products/{}", product.id);
    let mut response = state
        .catalogue
        .apply_one(row, Source::Write)
        .representation()
        .with_status(StatusCode::CREATED);
    if let Ok(location) = header::HeaderValue::try_from(location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Change a product's name, price or stock (admins).
#[utoipa::path(patch, path = "/products/{id}", tag = "products", operation_id = "update_product",
    params(("id" = String, Path, description = "Product id", min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$")),
    request_body = ProductPatch,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The updated product", body = Product,
            headers(("ETag" = String, description = "the product's new strong validator"))),
        (status = 403, description = "`forbidden`: the caller is not an admin"),
        (status = 404, description = "`not_found`: no product with this id"),
    ))]
async fn update_product(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<ProductPatch>,
) -> AppResult<Response> {
    caller.require_admin()?;
    validate::id("id", &id)?;
    let patch = patch.validate()?;
    let Some(row) = state.store.update(&id, &patch).await? else {
        return Err(AppError::not_found(format!("no product with id {id:?}")));
    };
    Ok(state
        .catalogue
        .apply_one(row, Source::Write)
        .representation()
        .with_status(StatusCode::OK))
}

/// Reserve stock for an order (internal; idempotent by `id`).
#[utoipa::path(post, path = "/reservations", tag = "reservations", operation_id = "reserve_stock",
    request_body = ReservationRequest,
    responses(
        (status = 201, description = "Reserved", body = Reservation),
        (status = 200, description = "Replayed: this reservation was made before", body = Reservation),
        (status = 409, description = "`insufficient_stock`: not enough units\n\n`reservation_released`, `reservation_exists`: the id was released, or used with other lines"),
    ))]
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
            changed,
        }) => {
            state.catalogue.apply(changed, Source::Write);
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

/// Release a reservation's stock (internal).
#[utoipa::path(delete, path = "/reservations/{id}", tag = "reservations", operation_id = "release_stock",
    params(("id" = String, Path, description = "Reservation id", min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 204, description = "Released (or never held)"),
        (status = 422, description = "`validation_failed`: the id breaks its pattern"),
    ))]
/// Idempotent: afterwards the reservation holds nothing, whether it held stock, was
/// released before, or never existed (its id is then closed against a late reserve).
async fn release(State(state): State<AppState>, Path(id): Path<String>) -> AppResult<StatusCode> {
    validate::id("id", &id)?;
    release_stock(&state, &id, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Releases a reservation (see [`ProductStore::release`]) and shows its stock at once.
pub async fn release_stock(
    state: &AppState,
    reservation_id: &str,
    event: Option<(&str, &str)>,
) -> Result<Release, StoreError> {
    let release = state.store.release(reservation_id, event).await?;
    if let Release::Released(changed) = &release {
        state
            .catalogue
            .apply(changed.iter().cloned(), Source::Write);
        state.counters.released.inc();
    }
    Ok(release)
}
