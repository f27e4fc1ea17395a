//! The product service's storage interface and its SQLite implementation. A PostgreSQL
//! implementation is a second `impl ProductStore`, chosen by `DATABASE_URL`.

use async_trait::async_trait;
use shop_platform::{Money, PageRequest};
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, SqliteConnection};

use crate::domain::{Product, ProductPatch, Reservation, ReservationLine, ReservedLine};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a product with id {0:?} already exists")]
    DuplicateId(String),
    #[error("no product with id {0:?}")]
    UnknownProduct(String),
    #[error("only {available} of product {product_id:?} in stock, {requested} requested")]
    InsufficientStock {
        product_id: String,
        available: i64,
        requested: i64,
    },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Release {
    Released,
    AlreadyReleased,
    Unknown,
}

#[async_trait]
pub trait ProductStore: Send + Sync + 'static {
    async fn list(&self, page: PageRequest) -> Result<Vec<(i64, Product)>, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<Product>, StoreError>;
    async fn create(&self, product: &Product) -> Result<(), StoreError>;
    async fn update(&self, id: &str, patch: &ProductPatch) -> Result<Option<Product>, StoreError>;
    async fn is_empty(&self) -> Result<bool, StoreError>;
    /// Takes every line's units or none: all lines succeed in one transaction.
    async fn reserve(
        &self,
        order_id: Option<&str>,
        lines: &[ReservationLine],
    ) -> Result<Reservation, StoreError>;
    /// Gives a held reservation's units back, once.
    async fn release(&self, reservation_id: &str) -> Result<Release, StoreError>;
}

pub struct SqliteProductStore {
    pool: SqlitePool,
}

impl SqliteProductStore {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn product_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<(i64, Product), sqlx::Error> {
    Ok((
        row.try_get("seq")?,
        Product {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            price: Money::from_cents(row.try_get("price_cents")?),
            quantity: row.try_get("quantity")?,
        },
    ))
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

async fn take_stock(
    conn: &mut SqliteConnection,
    line: &ReservationLine,
) -> Result<Money, StoreError> {
    // The condition makes the check and the decrement one atomic step.
    let taken = sqlx::query(
        "UPDATE products SET quantity = quantity - ?1, updated_at = ?3
         WHERE id = ?2 AND quantity >= ?1
         RETURNING price_cents",
    )
    .bind(line.quantity)
    .bind(&line.product_id)
    .bind(now())
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = taken {
        return Ok(Money::from_cents(row.try_get("price_cents")?));
    }
    let available: Option<i64> = sqlx::query_scalar("SELECT quantity FROM products WHERE id = ?1")
        .bind(&line.product_id)
        .fetch_optional(&mut *conn)
        .await?;
    Err(match available {
        None => StoreError::UnknownProduct(line.product_id.clone()),
        Some(available) => StoreError::InsufficientStock {
            product_id: line.product_id.clone(),
            available,
            requested: line.quantity,
        },
    })
}

#[async_trait]
impl ProductStore for SqliteProductStore {
    async fn list(&self, page: PageRequest) -> Result<Vec<(i64, Product)>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, id, name, price_cents, quantity FROM products
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .bind(page.after)
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(product_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn get(&self, id: &str) -> Result<Option<Product>, StoreError> {
        let row =
            sqlx::query("SELECT seq, id, name, price_cents, quantity FROM products WHERE id = ?1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row
            .as_ref()
            .map(product_from_row)
            .transpose()?
            .map(|(_, p)| p))
    }

    async fn create(&self, product: &Product) -> Result<(), StoreError> {
        let now = now();
        sqlx::query(
            "INSERT INTO products (id, name, price_cents, quantity, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
        )
        .bind(&product.id)
        .bind(&product.name)
        .bind(product.price.cents())
        .bind(product.quantity)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|err| {
            if is_unique_violation(&err) {
                StoreError::DuplicateId(product.id.clone())
            } else {
                err.into()
            }
        })?;
        Ok(())
    }

    async fn update(&self, id: &str, patch: &ProductPatch) -> Result<Option<Product>, StoreError> {
        let row = sqlx::query(
            "UPDATE products SET
                name = COALESCE(?2, name),
                price_cents = COALESCE(?3, price_cents),
                quantity = COALESCE(?4, quantity),
                updated_at = ?5
             WHERE id = ?1
             RETURNING seq, id, name, price_cents, quantity",
        )
        .bind(id)
        .bind(patch.name.as_deref())
        .bind(patch.price.map(Money::cents))
        .bind(patch.quantity)
        .bind(now())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row
            .as_ref()
            .map(product_from_row)
            .transpose()?
            .map(|(_, p)| p))
    }

    async fn is_empty(&self) -> Result<bool, StoreError> {
        let any: Option<i64> = sqlx::query_scalar("SELECT 1 FROM products LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(any.is_none())
    }

    async fn reserve(
        &self,
        order_id: Option<&str>,
        lines: &[ReservationLine],
    ) -> Result<Reservation, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut items = Vec::with_capacity(lines.len());
        for line in lines {
            // An error returns early; dropping `tx` rolls every earlier line back.
            let unit_price = take_stock(&mut tx, line).await?;
            items.push(ReservedLine {
                product_id: line.product_id.clone(),
                quantity: line.quantity,
                unit_price,
            });
        }
        let id = uuid::Uuid::now_v7().to_string();
        sqlx::query(
            "INSERT INTO reservations (id, order_id, status, created_at) VALUES (?1, ?2, 'held', ?3)",
        )
        .bind(&id)
        .bind(order_id)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        for item in &items {
            sqlx::query(
                "INSERT INTO reservation_items (reservation_id, product_id, quantity, unit_price_cents)
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(&id)
            .bind(&item.product_id)
            .bind(item.quantity)
            .bind(item.unit_price.cents())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Reservation {
            id,
            order_id: order_id.map(str::to_owned),
            status: "held".into(),
            items,
        })
    }

    async fn release(&self, reservation_id: &str) -> Result<Release, StoreError> {
        let mut tx = self.pool.begin().await?;
        let flipped = sqlx::query(
            "UPDATE reservations SET status = 'released' WHERE id = ?1 AND status = 'held'",
        )
        .bind(reservation_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if flipped == 0 {
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM reservations WHERE id = ?1")
                    .bind(reservation_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            return Ok(if exists.is_some() {
                Release::AlreadyReleased
            } else {
                Release::Unknown
            });
        }
        sqlx::query(
            "UPDATE products
             SET quantity = quantity + (SELECT ri.quantity FROM reservation_items ri
                                        WHERE ri.reservation_id = ?1 AND ri.product_id = products.id),
                 updated_at = ?2
             WHERE id IN (SELECT product_id FROM reservation_items WHERE reservation_id = ?1)",
        )
        .bind(reservation_id)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Release::Released)
    }
}
