//! Placing an order across services: the user must exist, prices come from the product
//! service, stock is reserved there atomically, and the order is stored here. If storing
//! fails after stock was reserved, the reservation is released (compensation).

use serde::{Deserialize, Serialize};
use shop_platform::{AppError, Money, PeerResponse};

use crate::domain::{Order, OrderRequest, price_lines, units};
use crate::routes::AppState;
use crate::storage::StoreError;

#[derive(Debug, Deserialize)]
struct PeerProduct {
    name: String,
    price: Money,
}

#[derive(Serialize)]
struct ReservationBody<'a> {
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
    id: String,
    items: Vec<ReservedLine>,
}

#[derive(Debug, Deserialize)]
struct ReservedLine {
    product_id: String,
    unit_price: Money,
}

pub async fn place_order(state: &AppState, request: OrderRequest) -> Result<Order, AppError> {
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
        state.users.get(&user_path),
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

    let reservation = reserve(state, &request).await?;
    // Prices could change between pricing and reserving; charge only what was quoted.
    let repriced = reservation.items.iter().all(|reserved| {
        priced
            .iter()
            .any(|(id, _, _, price)| *id == reserved.product_id && *price == reserved.unit_price)
    });
    if !repriced {
        release(state, &reservation.id).await;
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
        reservation_id: reservation.id,
    };
    if let Err(err) = state.store.create(&order).await {
        release(state, &order.reservation_id).await;
        return Err(match err {
            StoreError::DuplicateId(id) => order_exists(&id),
            other => other.into(),
        });
    }
    Ok(order)
}

fn order_exists(id: &str) -> AppError {
    AppError::conflict(
        "order_exists",
        format!("an order with id {id:?} already exists"),
    )
}

async fn reserve(state: &AppState, request: &OrderRequest) -> Result<Reservation, AppError> {
    let body = ReservationBody {
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
        .await?
        .fail_on_server_error()?;
    match response.status.as_u16() {
        201 => response.json(),
        409 => Err(AppError::conflict(
            "insufficient_stock",
            response
                .error_message()
                .unwrap_or_else(|| "not enough stock".to_owned()),
        )),
        422 => Err(AppError::validation(
            "products",
            response
                .error_message()
                .unwrap_or_else(|| "a product no longer exists".to_owned()),
        )),
        other => Err(AppError::unavailable(
            "product",
            format!("answered {other}"),
        )),
    }
}

/// Best effort: a reservation that cannot be released now is logged for follow-up.
async fn release(state: &AppState, reservation_id: &str) {
    match state
        .products
        .delete(&format!("/reservations/{reservation_id}"))
        .await
    {
        Ok(response) if response.status.is_success() => {}
        Ok(response) => tracing::error!(
            reservation_id,
            status = response.status.as_u16(),
            "could not release a reservation"
        ),
        Err(err) => {
            tracing::error!(reservation_id, error = %err, "could not release a reservation")
        }
    }
}
