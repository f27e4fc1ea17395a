//! Placing an order across services, as a saga: the user must exist, the product
//! service reserves the stock atomically and says at which prices (the reservation is
//! the quote, so a price cannot change between the two), and the order is stored here.
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
//! The checkout row is written only if neither the key nor the order id has an order,
//! so a replay costs no reservation.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shop_platform::events::NewEvent;
use shop_platform::{AppError, Caller, Money, PeerResponse};

use crate::domain::{NewOrder, Order, OrderEvent, OrderItem, OrderRequest, price_lines, units};
use crate::routes::AppState;
use crate::storage::{Checkout, CheckoutStart, IdempotencyRecord, StoreError};

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
        let request_hash = hex::encode(Sha256::digest(&canonical));
        Ok(Self {
            key: key.to_owned(),
            request_hash,
        })
    }
}

/// What `POST /orders` answers.
#[derive(Debug)]
pub enum Placed {
    /// The order, and its JSON: written once, for the answer and the idempotency record.
    Created { order: Order, json: String },
    /// An earlier request with the same `Idempotency-Key`: its stored response.
    Replayed(IdempotencyRecord),
}

#[derive(Debug, Deserialize)]
struct PeerProduct {
    name: String,
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
    /// Absent from product services older than this field; then it is looked up.
    #[serde(default)]
    name: Option<String>,
    quantity: i64,
    unit_price: Money,
}

pub async fn place_order(
    state: &AppState,
    caller: &Caller,
    request: OrderRequest,
    key: Option<IdempotencyKey>,
) -> Result<Placed, AppError> {
    let checkout = Checkout {
        reservation_id: uuid::Uuid::now_v7().to_string(),
        order_id: request.id.clone(),
        started_at_ms: now_ms(),
    };
    // Neither step needs the other: the user is checked while the checkout is recorded.
    let (started, user) = tokio::join!(
        state
            .store
            .begin_checkout(&checkout, key.as_ref().map(|k| k.key.as_str())),
        check_user(state, caller, &request.user_id),
    );
    if started? == CheckoutStart::AlreadyPlaced {
        return already_placed(state, key.as_ref(), &request.id).await;
    }
    if let Err(err) = user {
        forget(state, &checkout.reservation_id).await;
        return Err(err);
    }

    // The reservation is the quote: it takes the stock at the price of that moment, and
    // the order is charged exactly that.
    let reservation = match reserve(state, &request, &checkout.reservation_id).await {
        Ok(reservation) => reservation,
        Err(Refusal::Definite(err)) => {
            // The product service rolled back: nothing is held under this id.
            forget(state, &checkout.reservation_id).await;
            return Err(err);
        }
        Err(Refusal::Unknown(err)) => {
            compensate(state, &checkout.reservation_id).await;
            return Err(err);
        }
    };
    let (items, total) = match price(state, &request, reservation).await {
        Ok(priced) => priced,
        Err(err) => {
            compensate(state, &checkout.reservation_id).await;
            return Err(err);
        }
    };
    if let Some(client_total) = request.client_total
        && client_total != total
    {
        compensate(state, &checkout.reservation_id).await;
        return Err(AppError::validation(
            "total",
            format!(
                "the order costs {total}, not {client_total}; totals are computed by the server"
            ),
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
        version: 1,
        confirmed_at: None,
        cancelled_at: None,
        stock_returned_at: None,
        reservation_id: checkout.reservation_id,
    };
    let json = serde_json::to_string(&order).map_err(AppError::internal)?;
    let record = key.as_ref().map(|key| IdempotencyRecord {
        key: key.key.clone(),
        request_hash: key.request_hash.clone(),
        order_id: order.id.clone(),
        status: 201,
        response: json.clone(),
    });
    let placed = NewEvent::new("order.placed", &OrderEvent::from(&order));
    match state.store.create(&order, record.as_ref(), &placed).await {
        Ok(()) => Ok(Placed::Created { order, json }),
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

/// The order may be placed for this user: it exists, and the caller may act for it
/// (`resolve_owner` has already refused anyone else who is not an admin).
///
/// A caller ordering for themself asks no one: their verified token is the user
/// service's own statement that the account exists (it signs tokens only for accounts it
/// holds, and accounts are never deleted). That takes a hop and a connection per order off
/// checkout. An admin ordering for someone else, or anyone in demo mode, names an account
/// nothing has vouched for, so the user service is asked.
async fn check_user(state: &AppState, caller: &Caller, user_id: &str) -> Result<(), AppError> {
    if caller.user_id() == Some(user_id) {
        return Ok(());
    }
    // On the caller's behalf: the user service checks they may see this account.
    let response = state
        .users
        .get_as(&format!("/users/{user_id}"), caller)
        .await?
        .fail_on_server_error()?;
    match response.status.as_u16() {
        200 => Ok(()),
        404 => Err(AppError::validation(
            "user_id",
            format!("no user with id {user_id:?}"),
        )),
        // The user service judged the relayed credentials itself and refused them.
        401 => Err(shop_platform::auth::TokenError::Invalid.into_app_error()),
        403 => Err(shop_platform::identity::forbidden(
            "you may not place orders for this user",
        )),
        other => Err(AppError::unavailable("user", format!("answered {other}"))),
    }
}

/// Why the checkout could not start: the stored answer to this key, or the order id is
/// taken.
async fn already_placed(
    state: &AppState,
    key: Option<&IdempotencyKey>,
    order_id: &str,
) -> Result<Placed, AppError> {
    if let Some(key) = key
        && let Some(replay) = replay(state, key).await?
    {
        return Ok(replay);
    }
    if state.store.exists(order_id).await? {
        return Err(order_exists(order_id));
    }
    // Neither is ever deleted, so one of them was found when the checkout was refused.
    Err(AppError::internal(anyhow::anyhow!(
        "checkout refused, yet neither order {order_id:?} nor its key is stored"
    )))
}

/// The order's lines, in the request's order, at the reserved prices.
async fn price(
    state: &AppState,
    request: &OrderRequest,
    reservation: Reservation,
) -> Result<(Vec<OrderItem>, Money), AppError> {
    let mut priced = Vec::with_capacity(request.lines.len());
    for line in &request.lines {
        let reserved = reservation
            .items
            .iter()
            .find(|r| r.product_id == line.product_id && r.quantity == line.quantity)
            .ok_or_else(|| {
                AppError::unavailable("product", "answered with a reservation of other lines")
            })?;
        let name = match &reserved.name {
            Some(name) => name.clone(),
            None => product_name(state, &line.product_id).await?,
        };
        priced.push((
            line.product_id.clone(),
            name,
            line.quantity,
            reserved.unit_price,
        ));
    }
    price_lines(&priced)
}

async fn product_name(state: &AppState, product_id: &str) -> Result<String, AppError> {
    let response = state
        .products
        .get(&format!("/products/{product_id}"))
        .await?
        .fail_on_server_error()?;
    if !response.status.is_success() {
        return Err(AppError::unavailable(
            "product",
            format!(
                "answered {} for a reserved product",
                response.status.as_u16()
            ),
        ));
    }
    Ok(response.json::<PeerProduct>()?.name)
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
        // The product service names the line by its place in the body sent, which is the
        // request's order; the caller's own field is reported.
        422 => {
            let line = response
                .invalid_field()
                .and_then(|field| {
                    let index = field.strip_prefix("items[")?.split(']').next()?;
                    request.lines.get(index.parse::<usize>().ok()?)
                })
                .filter(|_| response.error_code().as_deref() == Some("validation_failed"));
            Err(Refusal::Definite(match line {
                Some(line) => AppError::validation(
                    line.field.clone(),
                    format!("no product with id {:?}", line.product_id),
                ),
                None => AppError::validation("products", message("a product does not exist")),
            }))
        }
        other => Err(Refusal::Unknown(AppError::unavailable(
            "product",
            format!("answered {other}: {}", message("no reason given")),
        ))),
    }
}

/// Forgets a checkout that holds no stock (the reservation was refused, or never asked
/// for). If that fails, the recovery loop releases the id, which holds nothing, and
/// forgets it.
async fn forget(state: &AppState, reservation_id: &str) {
    if let Err(err) = state.store.end_checkout(reservation_id).await {
        tracing::warn!(reservation_id, error = %err, "could not forget a checkout; recovery will");
    }
}

/// Undoes a checkout: releases its reservation, then forgets the checkout. If either
/// step fails the checkout row stays and the recovery loop finishes the job.
async fn compensate(state: &AppState, reservation_id: &str) {
    if let Err(err) = release(state, reservation_id).await {
        tracing::warn!(reservation_id, error = %err, "could not release a reservation yet; recovery will retry");
        return;
    }
    forget(state, reservation_id).await;
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
