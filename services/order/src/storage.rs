//! The order service's storage interface and its SQL implementation, one for both
//! backends (SQLite and PostgreSQL through `sqlx::Any`).

use async_trait::async_trait;
use shop_platform::{Database, Migrations, Money, PageRequest};
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};

use crate::domain::{Order, OrderItem, units};

pub static MIGRATIONS: Migrations = Migrations {
    sqlite: sqlx::migrate!("./migrations/sqlite"),
    postgres: sqlx::migrate!("./migrations/postgres"),
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("an order with id {0:?} already exists")]
    DuplicateId(String),
    #[error("the checkout outlived CHECKOUT_TIMEOUT and its reservation is being released")]
    CheckoutAbandoned,
    #[error("another request stored an order under this Idempotency-Key first")]
    IdempotencyKeyTaken,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A checkout in progress: stock may be reserved under `reservation_id` while no order
/// is stored yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    pub reservation_id: String,
    pub order_id: String,
    pub started_at_ms: i64,
}

/// What an `Idempotency-Key` answered the first time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub key: String,
    /// SHA-256 of the request body in canonical form.
    pub request_hash: String,
    pub order_id: String,
    pub status: u16,
    pub response: String,
}

#[async_trait]
pub trait OrderStore: Send + Sync + 'static {
    /// Records a checkout before its stock is reserved: the saga's first step.
    async fn begin_checkout(&self, checkout: &Checkout) -> Result<(), StoreError>;
    /// Stores the order and its lines, the idempotency record if any, and ends the
    /// checkout, atomically. Refuses with `CheckoutAbandoned` if the recovery loop took
    /// the checkout over, and `IdempotencyKeyTaken` if a concurrent request won the key.
    async fn create(
        &self,
        order: &Order,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<(), StoreError>;
    /// Forgets a checkout whose reservation is released (or was never taken).
    async fn end_checkout(&self, reservation_id: &str) -> Result<(), StoreError>;
    /// Claims the checkouts started before `started_before_ms` for compensation; from
    /// then on they can no longer store their order. Returns their reservation ids.
    async fn claim_abandoned(&self, started_before_ms: i64) -> Result<Vec<String>, StoreError>;
    async fn idempotency_record(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<Order>, StoreError>;
    async fn exists(&self, id: &str) -> Result<bool, StoreError>;
    async fn list(
        &self,
        user_id: Option<&str>,
        page: PageRequest,
    ) -> Result<Vec<(i64, Order)>, StoreError>;
}

pub struct SqlOrderStore {
    pool: AnyPool,
    writer: AnyPool,
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

impl SqlOrderStore {
    pub fn new(db: &Database) -> Self {
        Self {
            pool: db.pool().clone(),
            writer: db.writer().clone(),
        }
    }

    async fn items(&self, order_id: &str) -> Result<Vec<OrderItem>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT product_id, name, quantity, unit_price_cents FROM order_items
             WHERE order_id = $1 ORDER BY position",
        )
        .bind(order_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let quantity: i64 = row.try_get("quantity")?;
                let unit_price = Money::from_cents(row.try_get("unit_price_cents")?);
                Ok(OrderItem {
                    product_id: row.try_get("product_id")?,
                    name: row.try_get("name")?,
                    quantity,
                    unit_price,
                    line_total: Money::from_cents(unit_price.cents() * quantity),
                })
            })
            .collect()
    }

    async fn hydrate(&self, row: &AnyRow) -> Result<(i64, Order), sqlx::Error> {
        let id: String = row.try_get("id")?;
        let items = self.items(&id).await?;
        Ok((
            row.try_get("seq")?,
            Order {
                products: units(&items),
                items,
                id,
                user_id: row.try_get("user_id")?,
                total: Money::from_cents(row.try_get("total_cents")?),
                status: row.try_get("status")?,
                created_at: row.try_get("created_at")?,
                reservation_id: row.try_get("reservation_id")?,
            },
        ))
    }
}

#[async_trait]
impl OrderStore for SqlOrderStore {
    async fn begin_checkout(&self, checkout: &Checkout) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO checkouts (reservation_id, order_id, state, started_at_ms)
             VALUES ($1, $2, 'reserving', $3)",
        )
        .bind(&checkout.reservation_id)
        .bind(&checkout.order_id)
        .bind(checkout.started_at_ms)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn create(
        &self,
        order: &Order,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        // First statement is a write, so SQLite takes its write lock up front.
        let claimed =
            sqlx::query("DELETE FROM checkouts WHERE reservation_id = $1 AND state = 'reserving'")
                .bind(&order.reservation_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if claimed != 1 {
            return Err(StoreError::CheckoutAbandoned);
        }
        if let Some(record) = idempotency {
            sqlx::query(
                "INSERT INTO idempotency_keys (key, request_hash, order_id, status, response, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&record.key)
            .bind(&record.request_hash)
            .bind(&record.order_id)
            .bind(i64::from(record.status))
            .bind(&record.response)
            .bind(&order.created_at)
            .execute(&mut *tx)
            .await
            .map_err(|err| {
                if is_unique_violation(&err) {
                    StoreError::IdempotencyKeyTaken
                } else {
                    err.into()
                }
            })?;
        }
        sqlx::query(
            "INSERT INTO orders (id, user_id, total_cents, status, reservation_id, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&order.id)
        .bind(&order.user_id)
        .bind(order.total.cents())
        .bind(&order.status)
        .bind(&order.reservation_id)
        .bind(&order.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|err| {
            if is_unique_violation(&err) {
                StoreError::DuplicateId(order.id.clone())
            } else {
                err.into()
            }
        })?;
        for (position, item) in order.items.iter().enumerate() {
            sqlx::query(
                "INSERT INTO order_items (order_id, position, product_id, name, quantity, unit_price_cents)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&order.id)
            .bind(position as i64)
            .bind(&item.product_id)
            .bind(&item.name)
            .bind(item.quantity)
            .bind(item.unit_price.cents())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn end_checkout(&self, reservation_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM checkouts WHERE reservation_id = $1")
            .bind(reservation_id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn claim_abandoned(&self, started_before_ms: i64) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "UPDATE checkouts SET state = 'compensating' WHERE started_at_ms < $1
             RETURNING reservation_id",
        )
        .bind(started_before_ms)
        .fetch_all(&self.writer)
        .await?)
    }

    async fn idempotency_record(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT key, request_hash, order_id, status, response FROM idempotency_keys
             WHERE key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let status: i64 = row.try_get("status")?;
        Ok(Some(IdempotencyRecord {
            key: row.try_get("key")?,
            request_hash: row.try_get("request_hash")?,
            order_id: row.try_get("order_id")?,
            status: u16::try_from(status).unwrap_or(500),
            response: row.try_get("response")?,
        }))
    }

    async fn get(&self, id: &str) -> Result<Option<Order>, StoreError> {
        let row = sqlx::query(
            "SELECT seq, id, user_id, total_cents, status, reservation_id, created_at
             FROM orders WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Some(self.hydrate(&row).await?.1)),
            None => Ok(None),
        }
    }

    async fn exists(&self, id: &str) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT seq FROM orders WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    async fn list(
        &self,
        user_id: Option<&str>,
        page: PageRequest,
    ) -> Result<Vec<(i64, Order)>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, id, user_id, total_cents, status, reservation_id, created_at
             FROM orders
             WHERE seq > $1 AND ($2 IS NULL OR user_id = $2)
             ORDER BY seq LIMIT $3",
        )
        .bind(page.after)
        .bind(user_id)
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .await?;
        let mut orders = Vec::with_capacity(rows.len());
        for row in &rows {
            orders.push(self.hydrate(row).await?);
        }
        Ok(orders)
    }
}
