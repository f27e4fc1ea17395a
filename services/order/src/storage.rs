//! The order service's storage interface and its SQL implementation, one for both
//! backends (SQLite and PostgreSQL through `sqlx::Any`). Storing an order is one round
//! trip to PostgreSQL and one hand-off to SQLite's connection thread, whatever the
//! number of lines: checkout is the path that earns the money.

use async_trait::async_trait;
use shop_platform::db::{BatchRow, Coalescer, column, together_or_alone};
use shop_platform::events::{Handled, NewEvent, Outbox, inbox};
use shop_platform::{Backend, Database, Migrations, Money, PageRequest};
use sqlx::Row;
use sqlx::any::AnyRow;
use sqlx::postgres::PgPool;

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

/// Whether a checkout could start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutStart {
    Started,
    /// An order with this id, or one placed under this `Idempotency-Key`, is stored.
    AlreadyPlaced,
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
    /// Records a checkout before its stock is reserved: the saga's first step. Starts
    /// nothing if the order id, or the `Idempotency-Key`, already has a stored order.
    async fn begin_checkout(
        &self,
        checkout: &Checkout,
        idempotency_key: Option<&str>,
    ) -> Result<CheckoutStart, StoreError>;
    /// Stores the order and its lines, the idempotency record if any, and its
    /// `order.placed` event, and ends the checkout, atomically. Refuses with
    /// `CheckoutAbandoned` if the recovery loop took the checkout over, and
    /// `IdempotencyKeyTaken` if a concurrent request won the key.
    async fn create(
        &self,
        order: &Order,
        idempotency: Option<&IdempotencyRecord>,
        placed: &NewEvent,
    ) -> Result<(), StoreError>;
    /// Moves `order` to `status` with its event, atomically, if it is still at
    /// `order.version`; `None` if another change came first.
    async fn transition(
        &self,
        order: &Order,
        status: &'static str,
        at: &str,
        event: &NewEvent,
    ) -> Result<Option<Order>, StoreError>;
    /// Records that the stock of the order holding `reservation_id` is back on sale, once
    /// per event (`queue`'s inbox).
    async fn stock_returned(
        &self,
        queue: &str,
        event_id: &str,
        reservation_id: &str,
        at: &str,
    ) -> Result<Handled, StoreError>;
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
    db: Database,
    outbox: Outbox,
    /// PostgreSQL: the checkouts begun and the orders stored at the same time, one
    /// statement a group (see [`Coalescer`]).
    grouped: Option<Grouped>,
}

struct Grouped {
    claims: Coalescer<ClaimCall, Result<CheckoutStart, StoreError>>,
    stores: Coalescer<StoreCall, Result<bool, StoreError>>,
}

/// At most the checkouts a replica has in flight at the benchmark's 32 connections, with
/// room. One group of each at a time: with two, groups were half as large and the order
/// load ran 7-11% slower (two alternating pairs).
const GROUP: usize = 64;
const GROUPS_IN_FLIGHT: usize = 1;
const CLAIM_WRITE: &str = "checkout_claim";
const STORE_WRITE: &str = "order_store";

/// A checkout to begin, a row of [`BEGIN_CHECKOUTS_POSTGRES`].
struct ClaimCall {
    reservation_id: String,
    order_id: String,
    started_at_ms: i64,
    key: Option<String>,
}

/// An order to store, a row of [`STORE_ORDERS_POSTGRES`].
struct StoreCall {
    reservation_id: String,
    id: String,
    user_id: String,
    total_cents: i64,
    status: String,
    created_at: String,
    event_id: String,
    kind: &'static str,
    body: String,
    traceparent: Option<String>,
    event_created_at_ms: i64,
    lines: Vec<LineRow>,
    key: Option<String>,
    request_hash: Option<String>,
    response_status: Option<i64>,
    response: Option<String>,
}

struct LineRow {
    position: i64,
    product_id: String,
    name: String,
    quantity: i64,
    price: i64,
}

impl StoreCall {
    fn new(order: &Order, idempotency: Option<&IdempotencyRecord>, placed: &NewEvent) -> Self {
        Self {
            reservation_id: order.reservation_id.clone(),
            id: order.id.clone(),
            user_id: order.user_id.clone(),
            total_cents: order.total.cents(),
            status: order.status.clone(),
            created_at: order.created_at.clone(),
            event_id: placed.id.clone(),
            kind: placed.kind,
            body: placed.body.clone(),
            traceparent: placed.traceparent.clone(),
            event_created_at_ms: placed.created_at_ms,
            lines: (0..)
                .zip(&order.items)
                .map(|(position, item)| LineRow {
                    position,
                    product_id: item.product_id.clone(),
                    name: item.name.clone(),
                    quantity: item.quantity,
                    price: item.unit_price.cents(),
                })
                .collect(),
            key: idempotency.map(|record| record.key.clone()),
            request_hash: idempotency.map(|record| record.request_hash.clone()),
            response_status: idempotency.map(|record| i64::from(record.status)),
            response: idempotency.map(|record| record.response.clone()),
        }
    }
}

/// [`BEGIN_CHECKOUT_POSTGRES`] for a group, its rows as one array a column; returns the
/// checkouts begun. The look-ups are `LATERAL ... LIMIT 1`, one index probe a row: as
/// `NOT EXISTS` the planner may hash-join the whole `orders` table (it guesses the set's
/// size), and the plan is cached while the table grows. Measured so: 4.3 ms a group.
const BEGIN_CHECKOUTS_POSTGRES: &str =
    "INSERT INTO checkouts (reservation_id, order_id, state, started_at_ms)
     SELECT b.reservation_id, b.order_id, 'reserving', b.started_at_ms
     FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[])
            AS b (reservation_id, order_id, started_at_ms, key)
        LEFT JOIN LATERAL (SELECT 1 AS found FROM orders WHERE id = b.order_id LIMIT 1)
            AS stored ON true
        LEFT JOIN LATERAL (SELECT 1 AS found FROM idempotency_keys WHERE key = b.key LIMIT 1)
            AS keyed ON true
     WHERE stored.found IS NULL AND keyed.found IS NULL
     RETURNING reservation_id";

/// A checkout, begun only if neither its order nor its `Idempotency-Key` has an order.
macro_rules! begin_checkout {
    () => {
        "INTO checkouts (reservation_id, order_id, state, started_at_ms)
         SELECT $1, $2, 'reserving', $3
         WHERE NOT EXISTS (SELECT 1 FROM orders WHERE id = $2)
           AND NOT EXISTS (SELECT 1 FROM idempotency_keys WHERE key = $4)"
    };
}

/// Returns a row if the checkout was begun.
const BEGIN_CHECKOUT_POSTGRES: &str = concat!("INSERT ", begin_checkout!(), " RETURNING 1");

/// Returns `begun`, 1 if the checkout was begun: `OR FAIL` and a `SELECT` of `changes()`
/// instead of `RETURNING`, as SQLite's batch path wants them (`SqliteBatches`).
const BEGIN_CHECKOUT_SQLITE: &str = concat!(
    "INSERT OR FAIL ",
    begin_checkout!(),
    "; SELECT changes() AS begun"
);

/// For the writes on SQLite's batch path (`SqliteBatches` says why).
const SQLITE_OR_FAIL: &str = "OR FAIL ";

/// [`store_order_postgres`] for a group, its orders as one array a column (`$1` to `$15`)
/// and their lines likewise (`$16` to `$21`); returns the ids of the orders stored (those
/// whose checkout was still ours to claim). The claim looks its checkouts up by key
/// (`= ANY`), not by a join that could scan the table.
const STORE_ORDERS_POSTGRES: &str = "WITH batch AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[],
                $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::int8[],
                $12::text[], $13::text[], $14::int8[], $15::text[])
            AS b (reservation_id, id, user_id, total_cents, status, created_at, event_id,
                kind, body, traceparent, event_created_at_ms, key, request_hash,
                response_status, response)
    ), claimed AS (
        DELETE FROM checkouts
        WHERE reservation_id = ANY ($1::text[]) AND state = 'reserving'
        RETURNING reservation_id
    ), stored AS (
        INSERT INTO orders (id, user_id, total_cents, status, reservation_id, created_at)
        SELECT id, user_id, total_cents, status, reservation_id, created_at
        FROM batch JOIN claimed USING (reservation_id)
        RETURNING id
    ), lines AS (
        INSERT INTO order_items (order_id, position, product_id, name, quantity, unit_price_cents)
        SELECT line.order_id, line.position, line.product_id, line.name, line.quantity,
            line.price
        FROM unnest($16::text[], $17::int8[], $18::text[], $19::text[], $20::int8[],
                $21::int8[])
            AS line (order_id, position, product_id, name, quantity, price)
            JOIN stored ON stored.id = line.order_id
    ), announced AS (
        INSERT INTO outbox (event_id, kind, body, traceparent, created_at_ms)
        SELECT event_id, kind, body, traceparent, event_created_at_ms
        FROM batch JOIN stored USING (id)
    ), keyed AS (
        INSERT INTO idempotency_keys (key, request_hash, status, response, order_id, created_at)
        SELECT key, request_hash, response_status, response, id, created_at
        FROM batch JOIN stored USING (id) WHERE key IS NOT NULL
    )
    SELECT id FROM stored";

/// Begins a group of checkouts, in one statement when it can ([`together_or_alone`]).
async fn begin_group(
    db: Database,
    typed: PgPool,
    calls: Vec<ClaimCall>,
) -> Vec<Result<CheckoutStart, StoreError>> {
    let together = async {
        let begun: Vec<String> = sqlx::query_scalar(BEGIN_CHECKOUTS_POSTGRES)
            .bind(column(&calls, |call| call.reservation_id.as_str()))
            .bind(column(&calls, |call| call.order_id.as_str()))
            .bind(column(&calls, |call| call.started_at_ms))
            .bind(column(&calls, |call| call.key.as_deref()))
            .fetch_all(&typed)
            .await?;
        Ok::<_, sqlx::Error>(
            calls
                .iter()
                .map(|call| Ok(started(begun.contains(&call.reservation_id))))
                .collect(),
        )
    };
    together_or_alone(CLAIM_WRITE, db.write_groups(), &calls, together, |call| {
        begin_one(&db, call)
    })
    .await
}

/// Stores a group of orders, as [`begin_group`] begins checkouts.
async fn store_group(
    db: Database,
    typed: PgPool,
    calls: Vec<StoreCall>,
) -> Vec<Result<bool, StoreError>> {
    let together = async {
        let lines: Vec<(&str, &LineRow)> = calls
            .iter()
            .flat_map(|call| call.lines.iter().map(|line| (call.id.as_str(), line)))
            .collect();
        let stored: Vec<String> = sqlx::query_scalar(STORE_ORDERS_POSTGRES)
            .bind(column(&calls, |call| call.reservation_id.as_str()))
            .bind(column(&calls, |call| call.id.as_str()))
            .bind(column(&calls, |call| call.user_id.as_str()))
            .bind(column(&calls, |call| call.total_cents))
            .bind(column(&calls, |call| call.status.as_str()))
            .bind(column(&calls, |call| call.created_at.as_str()))
            .bind(column(&calls, |call| call.event_id.as_str()))
            .bind(column(&calls, |call| call.kind))
            .bind(column(&calls, |call| call.body.as_str()))
            .bind(column(&calls, |call| call.traceparent.as_deref()))
            .bind(column(&calls, |call| call.event_created_at_ms))
            .bind(column(&calls, |call| call.key.as_deref()))
            .bind(column(&calls, |call| call.request_hash.as_deref()))
            .bind(column(&calls, |call| call.response_status))
            .bind(column(&calls, |call| call.response.as_deref()))
            .bind(column(&lines, |(order_id, _)| *order_id))
            .bind(column(&lines, |(_, line)| line.position))
            .bind(column(&lines, |(_, line)| line.product_id.as_str()))
            .bind(column(&lines, |(_, line)| line.name.as_str()))
            .bind(column(&lines, |(_, line)| line.quantity))
            .bind(column(&lines, |(_, line)| line.price))
            .fetch_all(&typed)
            .await?;
        Ok::<_, sqlx::Error>(
            calls
                .iter()
                .map(|call| Ok(stored.contains(&call.id)))
                .collect(),
        )
    };
    together_or_alone(STORE_WRITE, db.write_groups(), &calls, together, |call| {
        store_one(&db, call)
    })
    .await
}

fn started(begun: bool) -> CheckoutStart {
    if begun {
        CheckoutStart::Started
    } else {
        CheckoutStart::AlreadyPlaced
    }
}

async fn begin_one(db: &Database, call: &ClaimCall) -> Result<CheckoutStart, StoreError> {
    let sql = match db.backend() {
        Backend::Postgres => BEGIN_CHECKOUT_POSTGRES,
        Backend::Sqlite => BEGIN_CHECKOUT_SQLITE,
    };
    let insert = sqlx::query(sql)
        .bind(&call.reservation_id)
        .bind(&call.order_id)
        .bind(call.started_at_ms)
        .bind(&call.key);
    let begun = match db.backend() {
        Backend::Postgres => insert.fetch_all(db.writer()).await?.len() == 1,
        // Committed with the other writes waiting, on the batch thread.
        Backend::Sqlite => counted_one(&db.committed_batch(insert).await?, "begun")?,
    };
    Ok(started(begun))
}

/// The batch's last row has `column` = 1: its `SELECT changes() AS column` counted one.
fn counted_one(rows: &[BatchRow], column: &str) -> Result<bool, sqlx::Error> {
    Ok(match rows.last() {
        Some(row) => row.get::<i64>(column)? == 1,
        None => false,
    })
}

/// Stores one order; `false`: its checkout was no longer ours to claim.
async fn store_one(db: &Database, call: &StoreCall) -> Result<bool, StoreError> {
    let keyed = call.key.is_some();
    let sql = match db.backend() {
        Backend::Postgres => store_order_postgres(call.lines.len(), keyed),
        Backend::Sqlite => store_order_sqlite(call.lines.len(), keyed),
    };
    // Built from constant text and line counts only; every value is a parameter.
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&call.reservation_id)
        .bind(&call.id)
        .bind(&call.user_id)
        .bind(call.total_cents)
        .bind(&call.status)
        .bind(&call.created_at)
        .bind(&call.event_id)
        .bind(call.kind)
        .bind(&call.body)
        .bind(&call.traceparent)
        .bind(call.event_created_at_ms);
    for line in &call.lines {
        query = query
            .bind(&line.product_id)
            .bind(&line.name)
            .bind(line.quantity)
            .bind(line.price);
    }
    if keyed {
        query = query
            .bind(&call.key)
            .bind(&call.request_hash)
            .bind(call.response_status)
            .bind(&call.response);
    }
    let named = |err: sqlx::Error| match shop_platform::db::unique_violation(&err).as_deref() {
        Some("idempotency_keys") => StoreError::IdempotencyKeyTaken,
        Some("orders") => StoreError::DuplicateId(call.id.clone()),
        _ => err.into(),
    };
    Ok(match db.backend() {
        Backend::Postgres => query
            .fetch_optional(db.writer())
            .await
            .map_err(named)?
            .is_some(),
        Backend::Sqlite => counted_one(&db.committed_batch(query).await.map_err(named)?, "stored")?,
    })
}

/// A group task gone (it panicked) fails its calls as a crashed worker would.
fn gone<T>() -> Result<T, StoreError> {
    Err(StoreError::Database(sqlx::Error::WorkerCrashed))
}

/// Parameters of the statements that store an order: `$1`..`$6` the order, `$7`..`$11`
/// its event, four per line from `$12`, then four for the idempotency record if any.
const ORDER_PARAMS: usize = 11;
const LINE_PARAMS: usize = 4;

/// `(0, $12, $13, $14, $15), (1, $16, ...)`: position, product id, name, quantity, price.
fn line_values(lines: usize, casts: bool) -> String {
    let (int, text) = if casts {
        ("::bigint", "::text")
    } else {
        ("", "")
    };
    (0..lines)
        .map(|position| {
            let p = ORDER_PARAMS + position * LINE_PARAMS;
            format!(
                "({position}, ${}{text}, ${}{text}, ${}{int}, ${}{int})",
                p + 1,
                p + 2,
                p + 3,
                p + 4
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

const OUTBOX_COLUMNS: &str = "(event_id, kind, body, traceparent, created_at_ms)";

/// The idempotency record's columns: its four parameters (numbered after the lines'),
/// then the order id and time it shares with the order.
const RECORD_COLUMNS: &str = "(key, request_hash, status, response, order_id, created_at)";

/// `$k, $k+1, $k+2, $k+3`: the record's key, request hash, status and response.
fn record_values(lines: usize) -> String {
    let first = ORDER_PARAMS + lines * LINE_PARAMS + 1;
    (first..first + 4)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// PostgreSQL: one statement, so one round trip and its own transaction. Each insert
/// depends on the one before through `RETURNING`, so nothing is stored unless the
/// checkout was still ours to claim.
fn store_order_postgres(lines: usize, keyed: bool) -> String {
    let keyed = if keyed {
        format!(
            ", keyed AS (INSERT INTO idempotency_keys {RECORD_COLUMNS}
                SELECT {}, id, $6 FROM stored)",
            record_values(lines)
        )
    } else {
        String::new()
    };
    format!(
        "WITH claimed AS (
            DELETE FROM checkouts WHERE reservation_id = $1 AND state = 'reserving'
            RETURNING reservation_id
        ), stored AS (
            INSERT INTO orders (id, user_id, total_cents, status, reservation_id, created_at)
            SELECT $2, $3, $4, $5, reservation_id, $6 FROM claimed
            RETURNING id
        ), lines AS (
            INSERT INTO order_items (order_id, position, product_id, name, quantity, unit_price_cents)
            SELECT stored.id, line.position, line.product_id, line.name, line.quantity, line.price
            FROM stored, (VALUES {values}) AS line (position, product_id, name, quantity, price)
        ), announced AS (
            INSERT INTO outbox {OUTBOX_COLUMNS} SELECT $7, $8, $9, $10, $11 FROM stored
        ){keyed}
        SELECT id FROM stored",
        values = line_values(lines, true),
    )
}

/// SQLite: the same writes as statements of one committed batch
/// (`Database::committed_batch`), so one hand-off to the batch thread for all of them.
/// SQLite has no data-modifying CTEs and the batch commits whatever it did, so every
/// write is guarded by the checkout still being ours to claim (nothing else writes
/// inside the batch's transaction), and the claim comes last: `stored` is 1 if it took
/// the checkout, and so whether the order was stored. The guard is a look-up, not
/// `changes() = 1` after the claim (`SqliteBatches` says why).
fn store_order_sqlite(lines: usize, keyed: bool) -> String {
    let ours = "EXISTS (SELECT 1 FROM checkouts WHERE reservation_id = $1 AND state = 'reserving')";
    let keyed = if keyed {
        format!(
            "INSERT {SQLITE_OR_FAIL}INTO idempotency_keys {RECORD_COLUMNS}
            SELECT {}, $2, $6 WHERE {ours};",
            record_values(lines)
        )
    } else {
        String::new()
    };
    format!(
        "{keyed}
        INSERT {SQLITE_OR_FAIL}INTO orders
            (id, user_id, total_cents, status, reservation_id, created_at)
        SELECT $2, $3, $4, $5, $1, $6 WHERE {ours};
        INSERT {SQLITE_OR_FAIL}INTO order_items
            (order_id, position, product_id, name, quantity, unit_price_cents)
        SELECT $2, column1, column2, column3, column4, column5 FROM (VALUES {values})
        WHERE {ours};
        INSERT {SQLITE_OR_FAIL}INTO outbox {OUTBOX_COLUMNS}
        SELECT $7, $8, $9, $10, $11 WHERE {ours};
        DELETE FROM checkouts WHERE reservation_id = $1 AND state = 'reserving';
        SELECT changes() AS stored;",
        values = line_values(lines, false),
    )
}

const ORDER_COLUMNS: &str = "seq, id, user_id, total_cents, status, reservation_id, created_at,
    version, confirmed_at, cancelled_at, stock_returned_at";

impl SqlOrderStore {
    /// `outbox` is woken after each commit that wrote an event.
    pub fn new(db: &Database, outbox: Outbox) -> Self {
        // SQLite's batch thread already commits the writes waiting together.
        let grouped = db.typed_postgres().map(|typed| {
            let (claims_db, stores_db) = (db.clone(), db.clone());
            let (claims_pool, stores_pool) = (typed.clone(), typed.clone());
            Grouped {
                claims: Coalescer::new(
                    CLAIM_WRITE,
                    db.write_groups(),
                    GROUP,
                    GROUPS_IN_FLIGHT,
                    move |calls| begin_group(claims_db.clone(), claims_pool.clone(), calls),
                ),
                stores: Coalescer::new(
                    STORE_WRITE,
                    db.write_groups(),
                    GROUP,
                    GROUPS_IN_FLIGHT,
                    move |calls| store_group(stores_db.clone(), stores_pool.clone(), calls),
                ),
            }
        });
        Self {
            db: db.clone(),
            outbox,
            grouped,
        }
    }

    async fn items(&self, order_id: &str) -> Result<Vec<OrderItem>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT product_id, name, quantity, unit_price_cents FROM order_items
             WHERE order_id = $1 ORDER BY position",
        )
        .bind(order_id)
        .fetch_all(self.db.pool())
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
                version: row.try_get("version")?,
                confirmed_at: row.try_get("confirmed_at")?,
                cancelled_at: row.try_get("cancelled_at")?,
                stock_returned_at: row.try_get("stock_returned_at")?,
                reservation_id: row.try_get("reservation_id")?,
            },
        ))
    }
}

#[async_trait]
impl OrderStore for SqlOrderStore {
    async fn begin_checkout(
        &self,
        checkout: &Checkout,
        idempotency_key: Option<&str>,
    ) -> Result<CheckoutStart, StoreError> {
        // Both look-ups ride on the insert: one round trip for the common case, a new
        // order; the caller tells a replay from a duplicate only when this refuses.
        let call = ClaimCall {
            reservation_id: checkout.reservation_id.clone(),
            order_id: checkout.order_id.clone(),
            started_at_ms: checkout.started_at_ms,
            key: idempotency_key.map(str::to_owned),
        };
        match &self.grouped {
            Some(grouped) => grouped.claims.call(call).await.unwrap_or_else(|_| gone()),
            None => begin_one(&self.db, &call).await,
        }
    }

    async fn create(
        &self,
        order: &Order,
        idempotency: Option<&IdempotencyRecord>,
        placed: &NewEvent,
    ) -> Result<(), StoreError> {
        let call = StoreCall::new(order, idempotency, placed);
        let claimed = match &self.grouped {
            Some(grouped) => grouped.stores.call(call).await.unwrap_or_else(|_| gone())?,
            None => store_one(&self.db, &call).await?,
        };
        if claimed {
            self.outbox.wake();
            Ok(())
        } else {
            Err(StoreError::CheckoutAbandoned)
        }
    }

    async fn transition(
        &self,
        order: &Order,
        status: &'static str,
        at: &str,
        event: &NewEvent,
    ) -> Result<Option<Order>, StoreError> {
        let mut tx = self.db.writer().begin().await?;
        let changed = sqlx::query(
            "UPDATE orders SET status = $1, version = version + 1,
                confirmed_at = CASE WHEN $1 = 'confirmed' THEN $2 ELSE confirmed_at END,
                cancelled_at = CASE WHEN $1 = 'cancelled' THEN $2 ELSE cancelled_at END
             WHERE id = $3 AND version = $4",
        )
        .bind(status)
        .bind(at)
        .bind(&order.id)
        .bind(order.version)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            return Ok(None);
        }
        event.append(&mut tx).await?;
        tx.commit().await?;
        self.outbox.wake();
        let mut order = order.clone();
        order.status = status.to_owned();
        order.version += 1;
        match status {
            "confirmed" => order.confirmed_at = Some(at.to_owned()),
            "cancelled" => order.cancelled_at = Some(at.to_owned()),
            _ => {}
        }
        Ok(Some(order))
    }

    async fn stock_returned(
        &self,
        queue: &str,
        event_id: &str,
        reservation_id: &str,
        at: &str,
    ) -> Result<Handled, StoreError> {
        let mut tx = self.db.writer().begin().await?;
        if !inbox::first_delivery(&mut tx, queue, event_id).await? {
            return Ok(Handled::Duplicate);
        }
        // No order holds a reservation released by a checkout's compensation: nothing to
        // record, and the event is still consumed.
        sqlx::query(
            "UPDATE orders SET stock_returned_at = $1, version = version + 1
             WHERE reservation_id = $2 AND stock_returned_at IS NULL",
        )
        .bind(at)
        .bind(reservation_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Handled::Applied)
    }

    async fn end_checkout(&self, reservation_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM checkouts WHERE reservation_id = $1")
            .bind(reservation_id)
            .execute(self.db.writer())
            .await?;
        Ok(())
    }

    async fn claim_abandoned(&self, started_before_ms: i64) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "UPDATE checkouts SET state = 'compensating' WHERE started_at_ms < $1
             RETURNING reservation_id",
        )
        .bind(started_before_ms)
        .fetch_all(self.db.writer())
        .await?)
    }

    async fn idempotency_record(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT key, request_hash, order_id, status, response FROM idempotency_keys
             WHERE key = $1",
        )
        .bind(key)
        .fetch_optional(self.db.pool())
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
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(self.db.pool())
        .await?;
        match row {
            Some(row) => Ok(Some(self.hydrate(&row).await?.1)),
            None => Ok(None),
        }
    }

    async fn exists(&self, id: &str) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT seq FROM orders WHERE id = $1")
            .bind(id)
            .fetch_optional(self.db.pool())
            .await?;
        Ok(found.is_some())
    }

    async fn list(
        &self,
        user_id: Option<&str>,
        page: PageRequest,
    ) -> Result<Vec<(i64, Order)>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ORDER_COLUMNS} FROM orders
                 WHERE seq > $1 AND ($2 IS NULL OR user_id = $2)
                 ORDER BY seq LIMIT $3"
        )))
        .bind(page.after)
        .bind(user_id)
        .bind(page.fetch_limit())
        .fetch_all(self.db.pool())
        .await?;
        let mut orders = Vec::with_capacity(rows.len());
        for row in &rows {
            orders.push(self.hydrate(row).await?);
        }
        Ok(orders)
    }
}

#[cfg(test)]
mod tests {
    use shop_platform::testing::{commit_breaks_a_foreign_key, sqlite_migrated_to};

    use super::MIGRATIONS;

    /// A database made before the lines' key was deferred keeps its lines through the
    /// migration that rebuilds their table, and the key still refuses a line without its
    /// order, at the commit.
    #[tokio::test]
    async fn deferring_the_lines_key_keeps_the_lines_and_the_rule() {
        let (_dir, mut conn) = sqlite_migrated_to(&MIGRATIONS.sqlite, 3).await;
        sqlx::raw_sql(
            "INSERT INTO orders (id, user_id, total_cents, status, reservation_id, created_at)
             VALUES ('o1', 'u1', 300, 'pending', 'r1', 't');
             INSERT INTO order_items
                 (order_id, position, product_id, name, quantity, unit_price_cents)
             VALUES ('o1', 0, 'p1', 'Widget', 1, 100), ('o1', 1, 'p2', 'Gadget', 2, 100);",
        )
        .execute(&mut conn)
        .await
        .unwrap();

        MIGRATIONS.sqlite.run(&mut conn).await.unwrap();
        let lines: Vec<(String, i64, String)> =
            sqlx::query_as("SELECT order_id, position, name FROM order_items ORDER BY position")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert_eq!(
            lines,
            [
                ("o1".to_owned(), 0, "Widget".to_owned()),
                ("o1".to_owned(), 1, "Gadget".to_owned())
            ]
        );
        assert!(
            commit_breaks_a_foreign_key(
                &mut conn,
                "INSERT INTO order_items
                     (order_id, position, product_id, name, quantity, unit_price_cents)
                 VALUES ('nobody', 0, 'p1', 'Widget', 1, 100)"
            )
            .await,
            "a line without its order was committed"
        );
    }
}
