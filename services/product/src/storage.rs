//! The product service's storage interface and its SQL implementation, one for both
//! backends (SQLite and PostgreSQL through `sqlx::Any`). Catalogue reads are served from
//! memory ([`crate::catalogue`]); every write returns the rows it changed, so the writing
//! replica's copy is updated at once.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shop_platform::db::{Announcer, Coalescer, RowColumns, column};
use shop_platform::events::{NewEvent, Outbox, inbox};
use shop_platform::{Backend, Database, Migrations, Money};
use sqlx::postgres::PgPool;
use sqlx::{AnyConnection, Row};

use crate::domain::{Product, ProductPatch, Reservation, ReservationLine, ReservedLine};

/// The columns [`product_from_row`] reads, for `concat!` into statements.
macro_rules! product_columns {
    () => {
        "seq, rev, id, name, price_cents, quantity"
    };
}

/// Takes `$1` units of product `$2` (stamped `$3`) only if that many are in stock; the
/// condition makes the check and the decrement one atomic step.
macro_rules! decrement {
    () => {
        "products SET quantity = quantity - $1, rev = rev + 1, updated_at = $3
         WHERE id = $2 AND quantity >= $1"
    };
}

/// [`decrement!`], returning the row.
macro_rules! take_units {
    () => {
        concat!("UPDATE ", decrement!(), " RETURNING ", product_columns!())
    };
}

/// [`take_units!`] as SQLite's batch path wants it (`SqliteBatches`): `OR FAIL`, and
/// the row read by a `SELECT` under `changes() = 1` instead of `RETURNING`.
macro_rules! take_units_sqlite {
    () => {
        concat!(
            "UPDATE OR FAIL ",
            decrement!(),
            "; SELECT ",
            product_columns!(),
            " FROM products WHERE id = $2 AND changes() = 1"
        )
    };
}

pub static MIGRATIONS: Migrations = Migrations {
    sqlite: sqlx::migrate!("./migrations/sqlite"),
    postgres: sqlx::migrate!("./migrations/postgres"),
};

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
    #[error("reservation {0:?} was released; reserve under a new id")]
    ReservationReleased(String),
    #[error("reservation {0:?} already exists with different items")]
    ReservationMismatch(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Release {
    /// The units went back to stock; the products as committed.
    Released(Vec<ProductRow>),
    AlreadyReleased,
    /// The event asking for it was applied before: nothing was done.
    Duplicate,
    /// Nothing was held under that id; it is now closed so a late reserve cannot take stock.
    NeverHeld,
}

/// A reservation, and whether this call made it (false: a retry found it held).
#[derive(Debug)]
pub struct Reserved {
    pub reservation: Reservation,
    pub created: bool,
    /// The products whose stock this call took, as committed.
    pub changed: Vec<ProductRow>,
}

/// A product as stored: `seq` orders the catalogue, `rev` counts the row's changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductRow {
    pub seq: i64,
    pub rev: i64,
    pub product: Product,
}

/// A change as announced on the `catalogue` channel: by the `products_announce` trigger,
/// or, for grouped reservations, by the writing replica once they committed
/// ([`announcement`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct Announcement {
    seq: i64,
    id: String,
    name: String,
    price_cents: i64,
    quantity: i64,
    rev: i64,
}

impl From<Announcement> for ProductRow {
    fn from(a: Announcement) -> Self {
        ProductRow {
            seq: a.seq,
            rev: a.rev,
            product: Product {
                id: a.id,
                name: a.name,
                price: Money::from_cents(a.price_cents),
                quantity: a.quantity,
            },
        }
    }
}

/// The payload the trigger would send for `row`: the row, or its id alone when too large
/// for a notification (under 8000 bytes), which makes listeners re-read the catalogue.
pub fn announcement(row: &ProductRow) -> String {
    let payload = serde_json::to_string(&Announcement {
        seq: row.seq,
        id: row.product.id.clone(),
        name: row.product.name.clone(),
        price_cents: row.product.price.cents(),
        quantity: row.product.quantity,
        rev: row.rev,
    })
    .expect("plain fields serialize");
    if payload.len() > 7900 {
        return serde_json::json!({ "id": row.product.id }).to_string();
    }
    payload
}

#[async_trait]
pub trait ProductStore: Send + Sync + 'static {
    /// The whole catalogue, in `seq` order.
    async fn all(&self) -> Result<Vec<ProductRow>, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<ProductRow>, StoreError>;
    async fn create(&self, product: &Product) -> Result<ProductRow, StoreError>;
    async fn update(
        &self,
        id: &str,
        patch: &ProductPatch,
    ) -> Result<Option<ProductRow>, StoreError>;
    async fn is_empty(&self) -> Result<bool, StoreError>;
    /// Takes every line's units or none, atomically. The caller picks the id, so a retry
    /// finds the reservation it already made instead of taking the stock twice.
    async fn reserve(
        &self,
        id: &str,
        order_id: Option<&str>,
        lines: &[ReservationLine],
    ) -> Result<Reserved, StoreError>;
    /// Gives a held reservation's units back, once, and announces it (`stock.released`)
    /// in the same transaction. `event`: the queue and id of the event asking for it,
    /// recorded in the inbox in that transaction too, so a repeat changes nothing.
    async fn release(
        &self,
        reservation_id: &str,
        event: Option<(&str, &str)>,
    ) -> Result<Release, StoreError>;
}

/// The `data` of `stock.released` (version 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StockReleased {
    pub reservation_id: String,
    pub order_id: Option<String>,
    pub items: Vec<ReleasedLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ReleasedLine {
    pub product_id: String,
    pub quantity: i64,
}

pub struct SqlProductStore {
    db: Database,
    outbox: Outbox,
    /// PostgreSQL: one-line reservations made at the same time, one statement a group.
    reservations: Option<Coalescer<ReserveCall, Option<ProductRow>>>,
}

/// A one-line reservation, a row of [`RESERVE_GROUP_POSTGRES`]; `n` is its place in the
/// group.
struct ReserveCall {
    n: i64,
    id: String,
    order_id: Option<String>,
    product_id: String,
    quantity: i64,
}

/// At most this many reservations share a statement.
const RESERVE_GROUP: usize = 64;
const RESERVE_WRITE: &str = "reservation";

/// One-line reservations for a group, their rows as one array a column (`$1` to `$5`),
/// `$6` the time.
///
/// Every reservation of a product takes that product's row lock until its commit, so
/// under load they queue on it, and how long each holds it (its statement, its commit,
/// the wake-up of the next one) bounds the orders per second one product can take. A
/// group takes the lock once: it locks its products (in id order, as every multi-line
/// reservation does), reads their stock as committed, accepts reservations in group order
/// while their running sum fits, takes the accepted units in one update per product
/// (guarded again by the stock) and records them. Returns each accepted reservation's id
/// with its product's row as committed. The rest (a retry of an id made before, a line
/// that did not fit, an unknown product) run alone, which says why.
///
/// The statement tells the `products_announce` trigger (migration 0005) to stay silent:
/// the caller announces the products' new stock after the commit, coalesced
/// ([`Announcer`]). `batch` sets it before any row is read, so before any row changes.
const RESERVE_GROUP_POSTGRES: &str = concat!(
    "WITH announced_after_commit AS (
        SELECT set_config('shop.announce_catalogue', 'after_commit', true)
    ), batch AS (
        SELECT b.* FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::int8[])
            AS b (n, id, order_id, product_id, quantity), announced_after_commit
    ), fresh AS (
        SELECT batch.* FROM batch
            LEFT JOIN LATERAL (SELECT 1 AS found FROM reservations WHERE id = batch.id LIMIT 1)
                AS made ON true
        WHERE made.found IS NULL
    ), locked AS (
        SELECT id, quantity FROM products
        WHERE id = ANY (ARRAY(SELECT DISTINCT product_id FROM fresh))
        ORDER BY id FOR UPDATE
    ), accepted AS (
        SELECT ranked.n, ranked.id, ranked.order_id, ranked.product_id, ranked.quantity
        FROM (SELECT fresh.*,
                SUM(fresh.quantity) OVER (PARTITION BY fresh.product_id ORDER BY fresh.n) AS running
            FROM fresh) AS ranked
            JOIN locked ON locked.id = ranked.product_id
        WHERE ranked.running <= locked.quantity
    ), taken AS (
        UPDATE products SET quantity = products.quantity - totals.units,
            rev = products.rev + 1, updated_at = $6
        FROM (SELECT product_id, SUM(quantity)::bigint AS units FROM accepted GROUP BY product_id)
            AS totals
        WHERE products.id = totals.product_id AND products.quantity >= totals.units
        RETURNING products.seq, products.rev, products.id, products.name,
            products.price_cents, products.quantity
    ), reservation AS (
        INSERT INTO reservations (id, order_id, status, created_at)
        SELECT accepted.id, accepted.order_id, 'held', $6
        FROM accepted JOIN taken ON taken.id = accepted.product_id
    ), held AS (
        INSERT INTO reservation_items (reservation_id, product_id, quantity, unit_price_cents)
        SELECT accepted.id, taken.id, accepted.quantity, taken.price_cents
        FROM accepted JOIN taken ON taken.id = accepted.product_id
    )
    SELECT accepted.id AS reservation_id, ",
    "taken.seq, taken.rev, taken.id, taken.name, taken.price_cents, taken.quantity
    FROM accepted JOIN taken ON taken.id = accepted.product_id"
);

/// Runs a group of reservations; `None` for each one the group did not make, which then
/// runs alone. A group of one runs here too: while it runs, the calls arriving gather
/// into the next group instead of each taking the row lock on its own.
async fn reserve_group(
    db: Database,
    typed: PgPool,
    announcer: Arc<Announcer>,
    calls: Vec<ReserveCall>,
) -> Vec<Option<ProductRow>> {
    let rows = sqlx::query(RESERVE_GROUP_POSTGRES)
        .bind(column(&calls, |call| call.n))
        .bind(column(&calls, |call| call.id.as_str()))
        .bind(column(&calls, |call| call.order_id.as_deref()))
        .bind(column(&calls, |call| call.product_id.as_str()))
        .bind(column(&calls, |call| call.quantity))
        .bind(now())
        .fetch_all(&typed)
        .await;
    let made: Vec<(String, ProductRow)> = match rows.and_then(|rows| {
        rows.iter()
            .map(|row| Ok((row.try_get("reservation_id")?, product_from_row(row)?)))
            .collect()
    }) {
        Ok(made) => made,
        Err(err) => {
            // A retry racing its first call, say: each runs alone and gets its answer.
            db.write_groups().fell_back(RESERVE_WRITE);
            tracing::debug!(error = %err, "a group of reservations failed; each runs alone");
            Vec::new()
        }
    };
    // Every reservation of a product in the group returned the same row: one announcement.
    let mut announced: Vec<&str> = Vec::new();
    for (_, row) in &made {
        if !announced.contains(&row.product.id.as_str()) {
            announced.push(&row.product.id);
            announcer.announce(&row.product.id, row.rev, announcement(row));
        }
    }
    calls
        .iter()
        .map(|call| {
            made.iter()
                .find(|(id, _)| *id == call.id)
                .map(|(_, row)| row.clone())
        })
        .collect()
}

impl SqlProductStore {
    /// `outbox` is woken after each commit that wrote an event.
    pub fn new(db: &Database, outbox: Outbox) -> Self {
        // SQLite's batch thread already commits the writes waiting together. One group at
        // a time: a second would only queue on the first one's rows.
        let reservations = db.typed_postgres().map(|typed| {
            let (group_db, typed) = (db.clone(), typed.clone());
            let announcer = Arc::new(db.announcer("catalogue").expect("PostgreSQL announces"));
            Coalescer::new(
                RESERVE_WRITE,
                db.write_groups(),
                RESERVE_GROUP,
                1,
                move |mut calls: Vec<ReserveCall>| {
                    for (n, call) in (0..).zip(calls.iter_mut()) {
                        call.n = n;
                    }
                    reserve_group(group_db.clone(), typed.clone(), announcer.clone(), calls)
                },
            )
        });
        Self {
            db: db.clone(),
            outbox,
            reservations,
        }
    }

    /// A one-line reservation, the common case, in as few trips to the database as the
    /// backend allows, since the product's row is held from the decrement to the commit
    /// and that hold is what bounds the orders per second one product can take:
    /// - PostgreSQL: one statement, its own implicit transaction, with no round trip to
    ///   this process in between;
    /// - SQLite (no data-modifying CTEs): the three writes as statements of one batch that
    ///   is committed as one (`Database::committed_batch`), one hand-off to the batch
    ///   thread instead of three to the connection's. Each write is under the same
    ///   condition (enough units), which nothing else can change inside the transaction,
    ///   so when the decrement takes nothing the batch has written nothing either.
    ///
    /// Nothing is kept unless the stock was taken.
    async fn reserve_one(
        &self,
        id: &str,
        order_id: Option<&str>,
        line: &ReservationLine,
    ) -> Result<Reserved, StoreError> {
        if let Some(group) = &self.reservations {
            let call = ReserveCall {
                n: 0,
                id: id.to_owned(),
                order_id: order_id.map(str::to_owned),
                product_id: line.product_id.clone(),
                quantity: line.quantity,
            };
            if let Ok(Some(row)) = group.call(call).await {
                return Ok(reserved_one(id, order_id, line, row));
            }
        }
        let sql = match self.db.backend() {
            Backend::Postgres => concat!(
                "WITH taken AS (",
                take_units!(),
                "), reservation AS (
                    INSERT INTO reservations (id, order_id, status, created_at)
                    SELECT $4, $5, 'held', $3 FROM taken
                    RETURNING id
                ), held AS (
                    INSERT INTO reservation_items
                        (reservation_id, product_id, quantity, unit_price_cents)
                    SELECT reservation.id, taken.id, $1, taken.price_cents FROM taken, reservation)
                SELECT ",
                product_columns!(),
                " FROM taken"
            ),
            Backend::Sqlite => concat!(
                "INSERT OR FAIL INTO reservations (id, order_id, status, created_at)
                 SELECT $4, $5, 'held', $3
                 WHERE EXISTS (SELECT 1 FROM products WHERE id = $2 AND quantity >= $1);
                 INSERT OR FAIL INTO reservation_items
                    (reservation_id, product_id, quantity, unit_price_cents)
                 SELECT $4, id, $1, price_cents FROM products WHERE id = $2 AND quantity >= $1;",
                take_units_sqlite!()
            ),
        };
        let query = sqlx::query(sql)
            .bind(line.quantity)
            .bind(&line.product_id)
            .bind(now())
            .bind(id)
            .bind(order_id);
        let taken = match self.db.backend() {
            Backend::Postgres => query
                .fetch_optional(self.db.writer())
                .await
                .and_then(|row| row.as_ref().map(product_from_row).transpose()),
            // Every statement's rows: only the read after the decrement returns one.
            Backend::Sqlite => self
                .db
                .committed_batch(query)
                .await
                .and_then(|rows| rows.first().map(product_from_row).transpose()),
        };
        let row = match taken {
            Ok(Some(row)) => row,
            // Nothing taken: a retry of a reservation held already (taking nothing
            // again), or say why (unknown product, or too few units).
            Ok(None) => {
                return match self.existing(id, std::slice::from_ref(line)).await? {
                    Some(existing) => Ok(existing),
                    None => Err(shortfall(self.db.pool(), line).await),
                };
            }
            Err(err) if is_unique_violation(&err) => {
                // A concurrent call under the same id won (or released it first); the
                // whole statement, stock included, was rolled back.
                return self
                    .existing(id, std::slice::from_ref(line))
                    .await?
                    .ok_or(err.into());
            }
            Err(err) => return Err(err.into()),
        };
        Ok(reserved_one(id, order_id, line, row))
    }

    /// A reservation already made under `id`: the same request again is answered with
    /// it; anything else is refused.
    async fn existing(
        &self,
        id: &str,
        lines: &[ReservationLine],
    ) -> Result<Option<Reserved>, StoreError> {
        let row = sqlx::query("SELECT order_id, status FROM reservations WHERE id = $1")
            .bind(id)
            .fetch_optional(self.db.pool())
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let status: String = row.try_get("status")?;
        if status != "held" {
            return Err(StoreError::ReservationReleased(id.to_owned()));
        }
        let items = sqlx::query(
            "SELECT i.product_id, p.name, i.quantity, i.unit_price_cents
             FROM reservation_items i JOIN products p ON p.id = i.product_id
             WHERE i.reservation_id = $1",
        )
        .bind(id)
        .fetch_all(self.db.pool())
        .await?
        .iter()
        .map(|row| {
            Ok(ReservedLine {
                product_id: row.try_get("product_id")?,
                name: row.try_get("name")?,
                quantity: row.try_get("quantity")?,
                unit_price: Money::from_cents(row.try_get("unit_price_cents")?),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let same = items.len() == lines.len()
            && lines.iter().all(|line| {
                items
                    .iter()
                    .any(|i| i.product_id == line.product_id && i.quantity == line.quantity)
            });
        if !same {
            return Err(StoreError::ReservationMismatch(id.to_owned()));
        }
        Ok(Some(Reserved {
            reservation: Reservation {
                id: id.to_owned(),
                order_id: row.try_get("order_id")?,
                status,
                items: in_request_order(items, lines),
            },
            created: false,
            changed: Vec::new(),
        }))
    }
}

/// A one-line reservation just made, `row` its product as committed.
fn reserved_one(
    id: &str,
    order_id: Option<&str>,
    line: &ReservationLine,
    row: ProductRow,
) -> Reserved {
    Reserved {
        reservation: Reservation {
            id: id.to_owned(),
            order_id: order_id.map(str::to_owned),
            status: "held".into(),
            items: vec![ReservedLine {
                product_id: line.product_id.clone(),
                name: row.product.name.clone(),
                quantity: line.quantity,
                unit_price: row.product.price,
            }],
        },
        created: true,
        changed: vec![row],
    }
}

fn in_request_order(mut items: Vec<ReservedLine>, lines: &[ReservationLine]) -> Vec<ReservedLine> {
    items.sort_by_key(|i| lines.iter().position(|l| l.product_id == i.product_id));
    items
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn product_from_row(row: &impl RowColumns) -> Result<ProductRow, sqlx::Error> {
    Ok(ProductRow {
        seq: row.column("seq")?,
        rev: row.column("rev")?,
        product: Product {
            id: row.column("id")?,
            name: row.column("name")?,
            price: Money::from_cents(row.column("price_cents")?),
            quantity: row.column("quantity")?,
        },
    })
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    shop_platform::db::unique_violation(err).is_some()
}

/// Takes one line's units and records them under reservation `id`, inside the caller's
/// transaction. SQLite runs one writer at a time; PostgreSQL re-checks the condition on
/// the row version left by a concurrent writer before updating, and keeps the row locked
/// until the commit.
async fn take_stock(
    conn: &mut AnyConnection,
    id: &str,
    line: &ReservationLine,
) -> Result<ProductRow, StoreError> {
    let taken = sqlx::query(take_units!())
        .bind(line.quantity)
        .bind(&line.product_id)
        .bind(now())
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(row) = &taken {
        sqlx::query(
            "INSERT INTO reservation_items (reservation_id, product_id, quantity, unit_price_cents)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(&line.product_id)
        .bind(line.quantity)
        .bind(row.try_get::<i64, _>("price_cents")?)
        .execute(&mut *conn)
        .await?;
    }
    if let Some(row) = taken {
        return Ok(product_from_row(&row)?);
    }
    Err(shortfall(&mut *conn, line).await)
}

/// Why `line`'s units could not be taken.
async fn shortfall<'e, E>(executor: E, line: &ReservationLine) -> StoreError
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let available: Option<i64> =
        match sqlx::query_scalar("SELECT quantity FROM products WHERE id = $1")
            .bind(&line.product_id)
            .fetch_optional(executor)
            .await
        {
            Ok(available) => available,
            Err(err) => return err.into(),
        };
    match available {
        None => StoreError::UnknownProduct(line.product_id.clone()),
        Some(available) => StoreError::InsufficientStock {
            product_id: line.product_id.clone(),
            available,
            requested: line.quantity,
        },
    }
}

#[async_trait]
impl ProductStore for SqlProductStore {
    async fn all(&self) -> Result<Vec<ProductRow>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            product_columns!(),
            " FROM products ORDER BY seq"
        ))
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .iter()
            .map(product_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn get(&self, id: &str) -> Result<Option<ProductRow>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            product_columns!(),
            " FROM products WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.db.pool())
        .await?;
        Ok(row.as_ref().map(product_from_row).transpose()?)
    }

    async fn create(&self, product: &Product) -> Result<ProductRow, StoreError> {
        let now = now();
        let row = sqlx::query(concat!(
            "INSERT INTO products (id, name, price_cents, quantity, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $5)
             RETURNING ",
            product_columns!()
        ))
        .bind(&product.id)
        .bind(&product.name)
        .bind(product.price.cents())
        .bind(product.quantity)
        .bind(now)
        .fetch_one(self.db.writer())
        .await
        .map_err(|err| {
            if is_unique_violation(&err) {
                StoreError::DuplicateId(product.id.clone())
            } else {
                err.into()
            }
        })?;
        Ok(product_from_row(&row)?)
    }

    async fn update(
        &self,
        id: &str,
        patch: &ProductPatch,
    ) -> Result<Option<ProductRow>, StoreError> {
        let row = sqlx::query(concat!(
            "UPDATE products SET
                name = COALESCE($2, name),
                price_cents = COALESCE($3, price_cents),
                quantity = COALESCE($4, quantity),
                rev = rev + 1,
                updated_at = $5
             WHERE id = $1
             RETURNING ",
            product_columns!()
        ))
        .bind(id)
        .bind(patch.name.as_deref())
        .bind(patch.price.map(Money::cents))
        .bind(patch.quantity)
        .bind(now())
        .fetch_optional(self.db.writer())
        .await?;
        Ok(row.as_ref().map(product_from_row).transpose()?)
    }

    async fn is_empty(&self) -> Result<bool, StoreError> {
        let any: Option<i64> = sqlx::query_scalar("SELECT seq FROM products LIMIT 1")
            .fetch_optional(self.db.pool())
            .await?;
        Ok(any.is_none())
    }

    async fn reserve(
        &self,
        id: &str,
        order_id: Option<&str>,
        lines: &[ReservationLine],
    ) -> Result<Reserved, StoreError> {
        // A retry under the same id is rare: it is found when the reservation's row
        // cannot be inserted, not looked for before every reservation.
        if let [line] = lines {
            return self.reserve_one(id, order_id, line).await;
        }
        // Rows are locked in one global order (by product id) so two reservations
        // sharing products cannot deadlock each other.
        let mut ordered: Vec<&ReservationLine> = lines.iter().collect();
        ordered.sort_by(|a, b| a.product_id.cmp(&b.product_id));
        let mut tx = self.db.writer().begin().await?;
        // The reservation first: a concurrent call under the same id stops here before
        // taking any stock, and product rows are locked only for the statements after.
        let inserted = sqlx::query(
            "INSERT INTO reservations (id, order_id, status, created_at) VALUES ($1, $2, 'held', $3)",
        )
        .bind(id)
        .bind(order_id)
        .bind(now())
        .execute(&mut *tx)
        .await;
        if let Err(err) = inserted {
            if is_unique_violation(&err) {
                // A concurrent call under the same id won (or released it first).
                drop(tx);
                return self.existing(id, lines).await?.ok_or(err.into());
            }
            return Err(err.into());
        }
        let mut items = Vec::with_capacity(lines.len());
        let mut changed = Vec::with_capacity(lines.len());
        for line in ordered {
            // An error returns early; dropping `tx` rolls every earlier line back.
            let row = take_stock(&mut tx, id, line).await?;
            items.push(ReservedLine {
                product_id: line.product_id.clone(),
                name: row.product.name.clone(),
                quantity: line.quantity,
                unit_price: row.product.price,
            });
            changed.push(row);
        }
        tx.commit().await?;
        Ok(Reserved {
            reservation: Reservation {
                id: id.to_owned(),
                order_id: order_id.map(str::to_owned),
                status: "held".into(),
                items: in_request_order(items, lines),
            },
            created: true,
            changed,
        })
    }

    async fn release(
        &self,
        reservation_id: &str,
        event: Option<(&str, &str)>,
    ) -> Result<Release, StoreError> {
        loop {
            let mut tx = self.db.writer().begin().await?;
            if let Some((queue, event_id)) = event
                && !inbox::first_delivery(&mut tx, queue, event_id).await?
            {
                return Ok(Release::Duplicate);
            }
            let flipped: Option<Option<String>> = sqlx::query_scalar(
                "UPDATE reservations SET status = 'released' WHERE id = $1 AND status = 'held'
                 RETURNING order_id",
            )
            .bind(reservation_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(order_id) = flipped {
                let items: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT product_id, quantity FROM reservation_items
                     WHERE reservation_id = $1 ORDER BY product_id",
                )
                .bind(reservation_id)
                .fetch_all(&mut *tx)
                .await?;
                let now = now();
                let mut changed = Vec::with_capacity(items.len());
                let mut lines = Vec::with_capacity(items.len());
                for (product_id, quantity) in items {
                    let row = sqlx::query(concat!(
                        "UPDATE products SET quantity = quantity + $1, rev = rev + 1, updated_at = $3
                         WHERE id = $2
                         RETURNING ",
                        product_columns!()
                    ))
                    .bind(quantity)
                    .bind(&product_id)
                    .bind(&now)
                    .fetch_optional(&mut *tx)
                    .await?;
                    // Products are never deleted; should one be, the release still stands.
                    if let Some(row) = row {
                        changed.push(product_from_row(&row)?);
                    }
                    lines.push(ReleasedLine {
                        product_id,
                        quantity,
                    });
                }
                let released = StockReleased {
                    reservation_id: reservation_id.to_owned(),
                    order_id,
                    items: lines,
                };
                NewEvent::new("stock.released", &released)
                    .append(&mut tx)
                    .await?;
                tx.commit().await?;
                self.outbox.wake();
                return Ok(Release::Released(changed));
            }
            // Not held: close the id, unless it exists already.
            let closed = sqlx::query(
                "INSERT INTO reservations (id, order_id, status, created_at)
                 VALUES ($1, NULL, 'released', $2) ON CONFLICT (id) DO NOTHING",
            )
            .bind(reservation_id)
            .bind(now())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            let status: String = if closed == 1 {
                "never held".into()
            } else {
                sqlx::query_scalar("SELECT status FROM reservations WHERE id = $1")
                    .bind(reservation_id)
                    .fetch_one(&mut *tx)
                    .await?
            };
            // A reserve under this id committed between our two statements: roll back
            // (the inbox row too) and release what it holds.
            if status == "held" {
                continue;
            }
            tx.commit().await?;
            return Ok(if status == "released" {
                Release::AlreadyReleased
            } else {
                Release::NeverHeld
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use shop_platform::testing::{commit_breaks_a_foreign_key, sqlite_migrated_to};

    use super::{Announcement, MIGRATIONS, ProductRow, announcement};
    use crate::domain::Product;

    fn row(name: &str) -> ProductRow {
        ProductRow {
            seq: 3,
            rev: 42,
            product: Product {
                id: "p-1".into(),
                name: name.into(),
                price: shop_platform::Money::from_cents(1999),
                quantity: 7,
            },
        }
    }

    /// What the writer announces parses, on every replica, into the row it committed, in
    /// the trigger's format; a row too large for a notification goes by id alone, which
    /// listeners answer with a re-read.
    #[test]
    fn an_announcement_carries_the_row_or_its_id_alone() {
        let small = row("Desk \"oak\" é");
        let parsed: Announcement = serde_json::from_str(&announcement(&small)).unwrap();
        assert_eq!(ProductRow::from(parsed), small);

        let large = announcement(&row(&"x".repeat(8000)));
        assert_eq!(large, r#"{"id":"p-1"}"#);
    }

    /// A database made before the reservation lines' key was deferred keeps its lines
    /// through the migration that rebuilds their table, and the key still refuses a line
    /// without its reservation, at the commit.
    #[tokio::test]
    async fn deferring_the_reservation_lines_key_keeps_the_lines_and_the_rule() {
        let (_dir, mut conn) = sqlite_migrated_to(&MIGRATIONS.sqlite, 3).await;
        sqlx::raw_sql(
            "INSERT INTO reservations (id, order_id, status, created_at)
             VALUES ('r1', 'o1', 'held', 't');
             INSERT INTO reservation_items (reservation_id, product_id, quantity, unit_price_cents)
             VALUES ('r1', 'p1', 1, 100), ('r1', 'p2', 3, 250);",
        )
        .execute(&mut conn)
        .await
        .unwrap();

        MIGRATIONS.sqlite.run(&mut conn).await.unwrap();
        let lines: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT product_id, quantity, unit_price_cents FROM reservation_items
             WHERE reservation_id = 'r1' ORDER BY product_id",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert_eq!(
            lines,
            [("p1".to_owned(), 1, 100), ("p2".to_owned(), 3, 250)]
        );
        assert!(
            commit_breaks_a_foreign_key(
                &mut conn,
                "INSERT INTO reservation_items
                     (reservation_id, product_id, quantity, unit_price_cents)
                 VALUES ('nobody', 'p1', 1, 100)"
            )
            .await,
            "a line without its reservation was committed"
        );
    }
}
