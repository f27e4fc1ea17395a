//! Placing an order across services, as a saga: the user must exist, prices come from
//! the product service, stock is reserved there atomically, and the order is stored here.
//!
//! Every step that can leave stock held without an order is covered:
//! 1. a `checkouts` row is written *before* reserving, under a reservation id chosen here;
//! 2. the order is stored in the transaction that deletes that row;
//! 3. if anything fails in between, the reservation is released at once (compensation);
//! 4. if the process dies in between, or the release cannot be delivered, the row stays,
//!    and [`recover_abandoned`] (run by every replica) releases it once it is older than
//!    `CHECKOUT_TIMEOUT`. Claiming the row first makes a slow checkout's store fail, and
//!    releasing an id that was never reserved closes it, so a reserve still in flight
//!    cannot take stock afterwards. Releases are idempotent; replicas may race freely.
//!
//! `Idempotency-Key`: the first response is stored with the order, in the same
//! transaction; a retry with the same key and body gets it back, a different body 422.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shop_platform::{AppError, Caller, Money, PeerResponse};

use crate::domain::{NewOrder, Order, OrderRequest, price_lines, units};
use crate::routes::AppState;
use crate::storage::{Checkout, IdempotencyRecord, StoreError};

/// A validated `Idempotency-Key` and the request it came with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub key: String,
    pub request_hash: String,
}

impl IdempotencyKey {
    /// Keys are opaque to the server: 1-255 visible ASCII characters (a UUID is typical).
    pub fn new(key: &str, body: &NewOrder) -> Result<Self, AppError> {
        if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AppError::validation(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters",
            ));
        }
        // The parsed body re-serialised: the same request hashes the same whatever its
        // whitespace or key order.
        let canonical = serde_json::to_vec(body).map_err(AppError::internal)?;
        let digest = Sha256::digest(&canonical);
        let request_hash = digest.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            key: key.to_owned(),
            request_hash,
        })
    }
}

/// What `POST /orders` answers.
#[derive(Debug)]
pub enum Placed {
    Created(Order),
    /// An earlier request with the same `Idempotency-Key`: its stored response.
    Replayed(IdempotencyRecord),
}

#[derive(Debug, Deserialize)]
struct PeerProduct {
    name: String,
    price: Money,
}

#[derive(Serialize)]
struct ReservationBody<'a> {
    id: &'a str,
    order_id: &'a str,
    items: Vec<ReservationLine<'a>>,
}

#[derive(Serialize)]
struct ReservationLine<'a> {
    product_id: &'a str,
    quantity: i64,
}

#[derive(Debug, Deserialize)]
struct Reservation {
    items: Vec<ReservedLine>,
}

#[derive(Debug, Deserialize)]
struct ReservedLine {
    product_id: String,
    unit_price: Money,
}

pub async fn place_order(
    state: &AppState,
    caller: &Caller,
    request: OrderRequest,
    key: Option<IdempotencyKey>,
) -> Result<Placed, AppError> {
    if let Some(key) = &key
        && let Some(replay) = replay(state, key).await?
    {
        return Ok(replay);
    }
    if state.store.exists(&request.id).await? {
        return Err(order_exists(&request.id));
    }
    let user_path = format!("/users/{}", request.user_id);
    let product_paths: Vec<String> = request
        .lines
        .iter()
        .map(|line| format!("/products/{}", line.product_id))
        .collect();
    let (user, products) = tokio::join!(
        // On the caller's behalf: the user service checks they may see this account.
        state.users.get_as(&user_path, caller),
        futures_util::future::join_all(product_paths.iter().map(|p| state.products.get(p))),
    );
    match user?.fail_on_server_error()?.status.as_u16() {
        200 => {}
        404 => {
            return Err(AppError::validation(
                "user_id",
                format!("no user with id {:?}", request.user_id),
            ));
        }
        // The user service judged the relayed credentials itself and refused them.
        401 => return Err(shop_platform::auth::TokenError::Invalid.into_app_error()),
        403 => {
            return Err(shop_platform::identity::forbidden(
                "you may not place orders for this user",
            ));
        }
        other => return Err(AppError::unavailable("user", format!("answered {other}"))),
    }

    let mut priced = Vec::with_capacity(request.lines.len());
    for (line, response) in request.lines.iter().zip(products) {
        let response = response?.fail_on_server_error()?;
        match response.status.as_u16() {
            200 => {
                let product: PeerProduct = response.json()?;
                priced.push((
                    line.product_id.clone(),
                    product.name,
                    line.quantity,
                    product.price,
                ));
            }
            404 => {
                return Err(AppError::validation(
                    line.field.clone(),
                    format!("no product with id {:?}", line.product_id),
                ));
            }
            other => {
                return Err(AppError::unavailable(
                    "product",
                    format!("answered {other}"),
                ));
            }
        }
    }
    let (items, total) = price_lines(&priced)?;
    if let Some(client_total) = request.client_total
        && client_total != total
    {
        return Err(AppError::validation(
            "total",
            format!(
                "the order costs {total}, not {client_total}; totals are computed by the server"
            ),
        ));
    }

    let checkout = Checkout {
        reservation_id: uuid::Uuid::now_v7().to_string(),
        order_id: request.id.clone(),
        started_at_ms: now_ms(),
    };
    state.store.begin_checkout(&checkout).await?;
    let reservation = match reserve(state, &request, &checkout.reservation_id).await {
        Ok(reservation) => reservation,
        Err(Refusal::Definite(err)) => {
            // The product service rolled back: nothing is held under this id.
            if let Err(end) = state.store.end_checkout(&checkout.reservation_id).await {
                tracing::warn!(error = %end, "could not forget a refused checkout; recovery will");
            }
            return Err(err);
        }
        Err(Refusal::Unknown(err)) => {
            compensate(state, &checkout.reservation_id).await;
            return Err(err);
        }
    };
    // Prices could change between pricing and reserving; charge only what was quoted.
    let repriced = reservation.items.iter().all(|reserved| {
        priced
            .iter()
            .any(|(id, _, _, price)| *id == reserved.product_id && *price == reserved.unit_price)
    });
    if !repriced {
        compensate(state, &checkout.reservation_id).await;
        return Err(AppError::conflict(
            "price_changed",
            "a price changed while the order was placed; review the products and retry",
        ));
    }

    let order = Order {
        id: request.id,
        user_id: request.user_id,
        products: units(&items),
        items,
        total,
        status: "pending".into(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        reservation_id: checkout.reservation_id,
    };
    let record = match &key {
        Some(key) => Some(IdempotencyRecord {
            key: key.key.clone(),
            request_hash: key.request_hash.clone(),
            order_id: order.id.clone(),
            status: 201,
            response: serde_json::to_string(&order).map_err(AppError::internal)?,
        }),
        None => None,
    };
    match state.store.create(&order, record.as_ref()).await {
        Ok(()) => Ok(Placed::Created(order)),
        // The recovery loop owns the reservation now and is releasing it.
        Err(StoreError::CheckoutAbandoned) => Err(AppError::unavailable(
            "order",
            "the order took too long to place and was rolled back; retry",
        )),
        Err(err) => {
            compensate(state, &order.reservation_id).await;
            match (err, &key) {
                (StoreError::IdempotencyKeyTaken, Some(key)) => {
                    replay(state, key).await?.ok_or_else(|| {
                        AppError::internal(anyhow::anyhow!("idempotency record vanished"))
                    })
                }
                (StoreError::DuplicateId(id), _) => Err(order_exists(&id)),
                (other, _) => Err(other.into()),
            }
        }
    }
}

/// The stored answer to an earlier request with this key, if there was one.
async fn replay(state: &AppState, key: &IdempotencyKey) -> Result<Option<Placed>, AppError> {
    match state.store.idempotency_record(&key.key).await? {
        None => Ok(None),
        Some(record) if record.request_hash == key.request_hash => {
            Ok(Some(Placed::Replayed(record)))
        }
        Some(_) => Err(AppError::validation(
            "Idempotency-Key",
            "this key was used with a different request body; use a new key for a new order",
        )),
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn order_exists(id: &str) -> AppError {
    AppError::conflict(
        "order_exists",
        format!("an order with id {id:?} already exists"),
    )
}

/// Why a reservation was not made: refused (nothing held), or unknown (a timeout, a
/// 5xx, a broken connection: stock may be held and must be released).
enum Refusal {
    Definite(AppError),
    Unknown(AppError),
}

async fn reserve(
    state: &AppState,
    request: &OrderRequest,
    reservation_id: &str,
) -> Result<Reservation, Refusal> {
    let body = ReservationBody {
        id: reservation_id,
        order_id: &request.id,
        items: request
            .lines
            .iter()
            .map(|l| ReservationLine {
                product_id: &l.product_id,
                quantity: l.quantity,
            })
            .collect(),
    };
    let response: PeerResponse = state
        .products
        .post_json("/reservations", &body)
        .await
        .and_then(PeerResponse::fail_on_server_error)
        .map_err(Refusal::Unknown)?;
    let message = |fallback: &str| {
        response
            .error_message()
            .unwrap_or_else(|| fallback.to_owned())
    };
    match response.status.as_u16() {
        201 => response.json().map_err(Refusal::Unknown),
        409 if response.error_code().as_deref() == Some("insufficient_stock") => {
            Err(Refusal::Definite(AppError::conflict(
                "insufficient_stock",
                message("not enough stock"),
            )))
        }
        422 => Err(Refusal::Definite(AppError::validation(
            "products",
            message("a product no longer exists"),
        ))),
        other => Err(Refusal::Unknown(AppError::unavailable(
            "product",
            format!("answered {other}: {}", message("no reason given")),
        ))),
    }
}

/// Undoes a checkout: releases its reservation, then forgets the checkout. If either
/// step fails the checkout row stays and the recovery loop finishes the job.
async fn compensate(state: &AppState, reservation_id: &str) {
    if let Err(err) = release(state, reservation_id).await {
        tracing::warn!(reservation_id, error = %err, "could not release a reservation yet; recovery will retry");
        return;
    }
    if let Err(err) = state.store.end_checkout(reservation_id).await {
        tracing::warn!(reservation_id, error = %err, "released, but could not forget the checkout; recovery will");
    }
}

async fn release(state: &AppState, reservation_id: &str) -> Result<(), String> {
    let response = state
        .products
        .delete(&format!("/reservations/{reservation_id}"))
        .await
        .map_err(|e| e.message.clone())?;
    if response.status.is_success() {
        Ok(())
    } else {
        Err(format!("product answered {}", response.status))
    }
}

/// Releases the reservations of checkouts that have not stored their order within
/// `timeout`: their process died, or their compensation could not be delivered.
/// Returns how many were released.
pub async fn recover_abandoned(state: &AppState, timeout: Duration) -> Result<usize, AppError> {
    let cutoff = now_ms() - i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    let abandoned = state.store.claim_abandoned(cutoff).await?;
    let mut released = 0;
    for reservation_id in abandoned {
        match release(state, &reservation_id).await {
            Ok(()) => {
                state.store.end_checkout(&reservation_id).await?;
                released += 1;
                tracing::info!(
                    reservation_id,
                    "released the reservation of an abandoned checkout"
                );
            }
            Err(err) => {
                tracing::warn!(reservation_id, error = %err, "could not release an abandoned checkout's reservation; will retry");
            }
        }
    }
    Ok(released)
}
