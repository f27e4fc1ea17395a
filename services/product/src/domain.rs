//! Products and stock reservations, with the validation rules the API enforces.

use serde::{Deserialize, Serialize};
use shop_platform::{AppError, Money, validate};
use utoipa::ToSchema;

pub const MAX_QUANTITY: i64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Product {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub id: String,
    pub name: String,
    pub price: Money,
    /// Units in stock.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub quantity: i64,
}

/// `POST /products` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "Keyboard", "price": 49.9, "quantity": 25}))]
pub struct NewProduct {
    /// Optional client-chosen id; generated (a UUID) when absent.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub id: Option<String>,
    /// Leading and trailing whitespace is trimmed; no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub name: String,
    pub price: Money,
    /// Units in stock (default 0).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1_000_000_000, default = 0)]
    pub quantity: i64,
}

/// `PATCH /products/{id}` body: any subset of the mutable fields.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct ProductPatch {
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub name: Option<String>,
    pub price: Option<Money>,
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub quantity: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationRequest {
    /// Chosen by the caller so a retry is recognised; generated when absent.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub id: Option<String>,
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub order_id: Option<String>,
    /// Repeated products are merged.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<ReservationLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationLine {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub product_id: String,
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    pub quantity: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReservedLine {
    pub product_id: String,
    /// The product's name when the stock was taken (a replay gives its current name).
    pub name: String,
    pub quantity: i64,
    /// The price at the moment the stock was taken; orders are charged this.
    pub unit_price: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Reservation {
    pub id: String,
    pub order_id: Option<String>,
    pub status: String,
    pub items: Vec<ReservedLine>,
}

fn validate_name(name: &str) -> Result<String, AppError> {
    // The limit counts what was sent, as the published schema's maxLength does.
    let too_long = name.chars().count() > 200;
    let name = name.trim();
    if name.is_empty() {
        return Err(AppError::validation("name", "must not be empty"));
    }
    if too_long {
        return Err(AppError::validation(
            "name",
            "must be at most 200 characters",
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(AppError::validation(
            "name",
            "must not contain control characters",
        ));
    }
    Ok(name.to_owned())
}

fn validate_price(price: Money) -> Result<Money, AppError> {
    if price.cents() < 0 {
        return Err(AppError::validation("price", "must not be negative"));
    }
    Ok(price)
}

fn validate_stock(quantity: i64) -> Result<i64, AppError> {
    if !(0..=MAX_QUANTITY).contains(&quantity) {
        return Err(AppError::validation(
            "quantity",
            format!("must be between 0 and {MAX_QUANTITY}"),
        ));
    }
    Ok(quantity)
}

impl NewProduct {
    /// Checks every field and returns the product to store.
    pub fn validate(self) -> Result<Product, AppError> {
        Ok(Product {
            id: validate::id_or_new("id", self.id)?,
            name: validate_name(&self.name)?,
            price: validate_price(self.price)?,
            quantity: validate_stock(self.quantity)?,
        })
    }
}

impl ProductPatch {
    pub fn validate(self) -> Result<ProductPatch, AppError> {
        if self.name.is_none() && self.price.is_none() && self.quantity.is_none() {
            return Err(AppError::validation(
                "body",
                "give at least one of name, price, quantity",
            ));
        }
        Ok(ProductPatch {
            name: self.name.as_deref().map(validate_name).transpose()?,
            price: self.price.map(validate_price).transpose()?,
            quantity: self.quantity.map(validate_stock).transpose()?,
        })
    }
}

impl ReservationRequest {
    /// Merges repeated products so each is reserved in one statement.
    pub fn validate(self) -> Result<(String, Option<String>, Vec<ReservationLine>), AppError> {
        let id = validate::id_or_new("id", self.id)?;
        if self.items.is_empty() {
            return Err(AppError::validation("items", "must not be empty"));
        }
        if self.items.len() > 100 {
            return Err(AppError::validation("items", "at most 100 lines"));
        }
        let mut merged: Vec<ReservationLine> = Vec::new();
        for (i, line) in self.items.into_iter().enumerate() {
            validate::id(&format!("items[{i}].product_id"), &line.product_id)?;
            if !(1..=MAX_QUANTITY).contains(&line.quantity) {
                return Err(AppError::validation(
                    format!("items[{i}].quantity"),
                    format!("must be between 1 and {MAX_QUANTITY}"),
                ));
            }
            match merged.iter_mut().find(|m| m.product_id == line.product_id) {
                Some(existing) => existing.quantity += line.quantity,
                None => merged.push(line),
            }
        }
        if let Some(order_id) = &self.order_id {
            validate::id("order_id", order_id)?;
        }
        Ok((id, self.order_id, merged))
    }
}

/// The two products the seed's walkthrough expects.
pub fn demo_products() -> [Product; 2] {
    [
        Product {
            id: "1".into(),
            name: "Laptop".into(),
            price: Money::from_cents(99_999),
            quantity: 10,
        },
        Product {
            id: "2".into(),
            name: "Mouse".into(),
            price: Money::from_cents(2_499),
            quantity: 100,
        },
    ]
}
