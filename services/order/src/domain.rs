//! Orders: what a client may ask for, and what is stored. Totals are always computed
//! here from the product service's prices; a client-sent total is only checked.

use serde::{Deserialize, Serialize};
use shop_platform::{AppError, Caller, Money, validate};
use utoipa::ToSchema;

pub const MAX_LINE_QUANTITY: i64 = 10_000;
pub const MAX_LINES: usize = 100;

/// `POST /orders` body. The seed's form lists product ids, one unit each
/// (`"products": ["1","2"]`); the REST form gives quantities (`"items"`).
/// Serialised only to fingerprint a request for `Idempotency-Key`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"products": ["1", "2"]}))]
pub struct NewOrder {
    /// Optional client-chosen id; generated (a UUID) when absent.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub id: Option<String>,
    /// Whose order: taken from the caller's token; when given it must be the caller (or
    /// the caller an admin). Required only when authentication is off.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub user_id: Option<String>,
    /// The seed's form: product ids, one unit each (repeats add up). Give this or `items`.
    #[schema(min_items = 1, max_items = 100, inline)]
    pub products: Option<Vec<ProductId>>,
    /// Product ids with quantities. Give this or `products`. At most 10000 units of one
    /// product in all.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Option<Vec<OrderLineRequest>>,
    /// Optional: if given, it must equal the computed total.
    pub total: Option<Money>,
}

/// A product id.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(transparent)]
#[schema(
    pattern = "^[A-Za-z0-9_-]{1,64}$",
    min_length = 1,
    max_length = 64,
    example = "1"
)]
pub struct ProductId(pub String);

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderLineRequest {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub product_id: String,
    #[schema(minimum = 1, maximum = 10_000)]
    pub quantity: i64,
}

/// A validated order request: distinct products with their quantities, in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRequest {
    pub id: String,
    pub user_id: String,
    pub lines: Vec<RequestedLine>,
    pub client_total: Option<Money>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedLine {
    pub product_id: String,
    pub quantity: i64,
    /// The request field that named this product, for error messages.
    pub field: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderItem {
    pub product_id: String,
    pub name: String,
    pub quantity: i64,
    pub unit_price: Money,
    pub line_total: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Order {
    pub id: String,
    pub user_id: String,
    /// The seed's shape: one product id per unit ordered.
    pub products: Vec<String>,
    pub items: Vec<OrderItem>,
    pub total: Money,
    /// `pending`, then `confirmed` (by an admin), or `cancelled`.
    #[schema(example = "pending")]
    pub status: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Counts the order's changes, from 1; the `ETag` of the order is this number, quoted.
    #[serde(default = "first_version")]
    pub version: i64,
    #[serde(default)]
    #[schema(format = DateTime)]
    pub confirmed_at: Option<String>,
    #[serde(default)]
    #[schema(format = DateTime)]
    pub cancelled_at: Option<String>,
    /// When the product service put a cancelled order's stock back on sale: it hears of
    /// the cancellation through an event, so this follows `cancelled_at` shortly.
    #[serde(default)]
    #[schema(format = DateTime)]
    pub stock_returned_at: Option<String>,
    #[serde(skip)]
    pub reservation_id: String,
}

fn first_version() -> i64 {
    1
}

/// A change of an order's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Confirm,
    Cancel,
}

/// What an action does to an order in a given status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The order is in the action's status already: answered as is, nothing changes.
    AlreadyDone,
    To(&'static str),
}

impl Action {
    /// The lifecycle: `pending` -> `confirmed` -> `cancelled`, and `pending` -> `cancelled`.
    pub fn step(self, status: &str) -> Result<Step, AppError> {
        match (self, status) {
            (Action::Confirm, "pending") => Ok(Step::To("confirmed")),
            (Action::Confirm, "confirmed") | (Action::Cancel, "cancelled") => Ok(Step::AlreadyDone),
            (Action::Cancel, "pending" | "confirmed") => Ok(Step::To("cancelled")),
            (Action::Confirm, "cancelled") => Err(AppError::conflict(
                "invalid_transition",
                "a cancelled order cannot be confirmed",
            )),
            (_, other) => Err(AppError::internal(anyhow::anyhow!(
                "an order has the unknown status {other:?}"
            ))),
        }
    }

    /// The event a change announces.
    pub fn event(self) -> &'static str {
        match self {
            Action::Confirm => "order.confirmed",
            Action::Cancel => "order.cancelled",
        }
    }
}

/// The `data` of `order.placed`, `order.confirmed` and `order.cancelled` (version 1):
/// the order as it is after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEvent {
    pub order_id: String,
    pub user_id: String,
    pub status: String,
    pub items: Vec<EventLine>,
    pub total_cents: i64,
    /// The product service's reservation holding the order's stock.
    pub reservation_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLine {
    pub product_id: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

impl From<&Order> for OrderEvent {
    fn from(order: &Order) -> Self {
        Self {
            order_id: order.id.clone(),
            user_id: order.user_id.clone(),
            status: order.status.clone(),
            items: order
                .items
                .iter()
                .map(|item| EventLine {
                    product_id: item.product_id.clone(),
                    quantity: item.quantity,
                    unit_price_cents: item.unit_price.cents(),
                })
                .collect(),
            total_cents: order.total.cents(),
            reservation_id: order.reservation_id.clone(),
        }
    }
}

impl NewOrder {
    /// Settles whose order this is: the body's `user_id` if the caller may act for that
    /// user, else the caller. Run before validating and fingerprinting, so two users
    /// sending the same body and `Idempotency-Key` never share an order.
    pub fn resolve_owner(&mut self, caller: &Caller) -> Result<(), AppError> {
        match (&self.user_id, caller.user_id()) {
            (Some(named), _) => caller.require_access(named, "orders")?,
            (None, Some(me)) => self.user_id = Some(me.to_owned()),
            (None, None) => {
                return Err(AppError::validation("user_id", "is required"));
            }
        }
        Ok(())
    }

    pub fn validate(self) -> Result<OrderRequest, AppError> {
        let id = validate::id_or_new("id", self.id)?;
        let user_id = self
            .user_id
            .ok_or_else(|| AppError::validation("user_id", "is required"))?;
        validate::id("user_id", &user_id)?;
        let requested: Vec<(String, String, i64)> = match (self.products, self.items) {
            (Some(_), Some(_)) => {
                return Err(AppError::validation(
                    "items",
                    "give either products or items, not both",
                ));
            }
            (None, None) => {
                return Err(AppError::validation(
                    "products",
                    "an order needs products (ids) or items (ids with quantities)",
                ));
            }
            (Some(products), None) => products
                .into_iter()
                .enumerate()
                .map(|(i, id)| (format!("products[{i}]"), id.0, 1))
                .collect(),
            (None, Some(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, l)| (format!("items[{i}]"), l.product_id, l.quantity))
                .collect(),
        };
        if requested.is_empty() {
            return Err(AppError::validation("products", "must not be empty"));
        }
        if requested.len() > MAX_LINES {
            return Err(AppError::validation(
                "products",
                format!("at most {MAX_LINES} entries"),
            ));
        }
        let mut lines: Vec<RequestedLine> = Vec::new();
        for (field, product_id, quantity) in requested {
            let id_field = if field.starts_with("items") {
                format!("{field}.product_id")
            } else {
                field.clone()
            };
            validate::id(&id_field, &product_id)?;
            if !(1..=MAX_LINE_QUANTITY).contains(&quantity) {
                return Err(AppError::validation(
                    format!("{field}.quantity"),
                    format!("must be between 1 and {MAX_LINE_QUANTITY}"),
                ));
            }
            match lines.iter_mut().find(|l| l.product_id == product_id) {
                Some(line) => {
                    line.quantity += quantity;
                    if line.quantity > MAX_LINE_QUANTITY {
                        return Err(AppError::validation(
                            format!("{field}.quantity"),
                            format!("at most {MAX_LINE_QUANTITY} units of one product"),
                        ));
                    }
                }
                None => lines.push(RequestedLine {
                    product_id,
                    quantity,
                    field: id_field,
                }),
            }
        }
        if let Some(total) = self.total
            && total.cents() < 0
        {
            return Err(AppError::validation("total", "must not be negative"));
        }
        Ok(OrderRequest {
            id,
            user_id,
            lines,
            client_total: self.total,
        })
    }
}

/// Prices each line and sums them exactly.
pub fn price_lines(
    lines: &[(String, String, i64, Money)],
) -> Result<(Vec<OrderItem>, Money), AppError> {
    let mut total = Money::ZERO;
    let mut items = Vec::with_capacity(lines.len());
    for (product_id, name, quantity, unit_price) in lines {
        let line_total = unit_price
            .checked_mul(*quantity)
            .ok_or_else(|| AppError::validation("items", "order total is too large"))?;
        total = total
            .checked_add(line_total)
            .ok_or_else(|| AppError::validation("items", "order total is too large"))?;
        items.push(OrderItem {
            product_id: product_id.clone(),
            name: name.clone(),
            quantity: *quantity,
            unit_price: *unit_price,
            line_total,
        });
    }
    Ok((items, total))
}

/// Expands items into the seed's `products` list (one id per unit).
pub fn units(items: &[OrderItem]) -> Vec<String> {
    items
        .iter()
        .flat_map(|i| std::iter::repeat_n(i.product_id.clone(), i.quantity as usize))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<OrderRequest, AppError> {
        shop_platform::error::parse_json::<NewOrder>(json.as_bytes())?.validate()
    }

    #[test]
    fn seed_form_merges_repeated_products() {
        let req = parse(r#"{"user_id":"1","products":["1","2","1"]}"#).unwrap();
        assert_eq!(req.lines.len(), 2);
        assert_eq!(req.lines[0].quantity, 2);
        assert_eq!(req.lines[1].field, "products[1]");
    }

    #[test]
    fn rejects_bad_requests_naming_the_field() {
        let cases = [
            (r#"{"user_id":"1","products":[]}"#, "products"),
            (r#"{"user_id":"1"}"#, "products"),
            (r#"{"user_id":"","products":["1"]}"#, "user_id"),
            (
                r#"{"user_id":"1","items":[{"product_id":"1","quantity":0}]}"#,
                "items[0].quantity",
            ),
            (
                r#"{"user_id":"1","items":[{"product_id":"1","quantity":-3}]}"#,
                "items[0].quantity",
            ),
            (r#"{"user_id":"1","products":["1"],"total":-1}"#, "total"),
            (r#"{"user_id":"1","products":["a b"]}"#, "products[0]"),
            (r#"{"user_id":"1","products":["1"],"items":[]}"#, "items"),
        ];
        for (body, field) in cases {
            let err = parse(body).unwrap_err();
            assert_eq!(err.status.as_u16(), 422, "{body}");
            assert_eq!(err.field.as_deref(), Some(field), "{body}: {}", err.message);
        }
    }

    #[test]
    fn the_lifecycle_allows_what_a_shop_needs_and_repeats_are_no_ops() {
        use Action::*;
        assert_eq!(Confirm.step("pending").unwrap(), Step::To("confirmed"));
        assert_eq!(Cancel.step("pending").unwrap(), Step::To("cancelled"));
        assert_eq!(Cancel.step("confirmed").unwrap(), Step::To("cancelled"));
        assert_eq!(Confirm.step("confirmed").unwrap(), Step::AlreadyDone);
        assert_eq!(Cancel.step("cancelled").unwrap(), Step::AlreadyDone);
        let refused = Confirm.step("cancelled").unwrap_err();
        assert_eq!(
            (refused.status.as_u16(), refused.code.as_ref()),
            (409, "invalid_transition")
        );
    }

    #[test]
    fn totals_are_exact() {
        let (items, total) = price_lines(&[
            ("1".into(), "Laptop".into(), 1, Money::from_cents(99_999)),
            ("2".into(), "Mouse".into(), 3, Money::from_cents(2_499)),
        ])
        .unwrap();
        assert_eq!(total, Money::from_cents(99_999 + 3 * 2_499));
        assert_eq!(units(&items), vec!["1", "2", "2", "2"]);
    }
}
