//! The order service's storage interface and its SQLite implementation.

use async_trait::async_trait;
use shop_platform::{Money, PageRequest};
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use crate::domain::{Order, OrderItem, units};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("an order with id {0:?} already exists")]
    DuplicateId(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

#[async_trait]
pub trait OrderStore: Send + Sync + 'static {
    /// Stores the order and its lines atomically.
    async fn create(&self, order: &Order) -> Result<(), StoreError>;
    async fn get(&self, id: &str) -> Result<Option<Order>, StoreError>;
    async fn exists(&self, id: &str) -> Result<bool, StoreError>;
    async fn list(
        &self,
        user_id: Option<&str>,
        page: PageRequest,
    ) -> Result<Vec<(i64, Order)>, StoreError>;
}

pub struct SqliteOrderStore {
    pool: SqlitePool,
}

impl SqliteOrderStore {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    async fn items(&self, order_id: &str) -> Result<Vec<OrderItem>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT product_id, name, quantity, unit_price_cents FROM order_items
             WHERE order_id = ?1 ORDER BY position",
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

    async fn hydrate(&self, row: &sqlx::sqlite::SqliteRow) -> Result<(i64, Order), sqlx::Error> {
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
impl OrderStore for SqliteOrderStore {
    async fn create(&self, order: &Order) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO orders (id, user_id, total_cents, status, reservation_id, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&order.id)
        .bind(&order.user_id)
        .bind(order.total.cents())
        .bind(&order.status)
        .bind(&order.reservation_id)
        .bind(&order.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|err| match &err {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::DuplicateId(order.id.clone())
            }
            _ => err.into(),
        })?;
        for (position, item) in order.items.iter().enumerate() {
            sqlx::query(
                "INSERT INTO order_items (order_id, position, product_id, name, quantity, unit_price_cents)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
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

    async fn get(&self, id: &str) -> Result<Option<Order>, StoreError> {
        let row = sqlx::query(
            "SELECT seq, id, user_id, total_cents, status, reservation_id, created_at
             FROM orders WHERE id = ?1",
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
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM orders WHERE id = ?1")
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
             WHERE seq > ?1 AND (?2 IS NULL OR user_id = ?2)
             ORDER BY seq LIMIT ?3",
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
