//! The user service's storage interface and its SQL implementation, one for both
//! backends (SQLite and PostgreSQL through `sqlx::Any`).

use async_trait::async_trait;
use shop_platform::db::{Coalescer, column, together_or_alone};
use shop_platform::events::Handled;
use shop_platform::{Backend, Database, Migrations};
use sqlx::Row;
use sqlx::postgres::PgPool;

use crate::domain::{OrderCounts, Role, User};

pub static MIGRATIONS: Migrations = Migrations {
    sqlite: sqlx::migrate!("./migrations/sqlite"),
    postgres: sqlx::migrate!("./migrations/postgres"),
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a user with id {0:?} already exists")]
    DuplicateId(String),
    #[error("that email address is already registered")]
    DuplicateEmail,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

#[async_trait]
pub trait UserStore: Send + Sync + 'static {
    async fn create(&self, user: &User, password_hash: &str) -> Result<(), StoreError>;
    /// Which uniqueness rule a new user would break, if any: the id first, so a retried
    /// registration hears "exists" rather than "email taken".
    async fn conflict(&self, id: &str, email: &str) -> Result<Option<StoreError>, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<User>, StoreError>;
    /// Adds an order event to `user_id`'s counts, once per event (`queue`'s inbox). A
    /// user this service does not know is left alone; the event is still consumed.
    async fn count_order(
        &self,
        queue: &str,
        event_id: &str,
        user_id: &str,
        counts: OrderCounts,
    ) -> Result<Handled, StoreError>;
    /// What a login needs to know about the account registered under `email`.
    async fn login_record(&self, email: &str) -> Result<Option<LoginRecord>, StoreError>;
    /// Gives the account under `email` the admin role; false if there is no such account.
    async fn make_admin(&self, email: &str) -> Result<bool, StoreError>;
    /// Failed logins counted against each key in its current window, with the window's
    /// start (Unix ms). Windows that began before `window_start_after` count as empty.
    async fn failures(
        &self,
        keys: &[&str],
        window_start_after: i64,
    ) -> Result<Vec<(String, i64, i64)>, StoreError>;
    /// Counts one failed login against each key: a key whose window began at or before
    /// `window_start_after` starts a new window at `now`.
    async fn record_failure(
        &self,
        keys: &[&str],
        now: i64,
        window_start_after: i64,
    ) -> Result<(), StoreError>;
    async fn clear_failures(&self, key: &str) -> Result<(), StoreError>;
}

pub struct LoginRecord {
    pub id: String,
    pub role: Role,
    pub password_hash: String,
}

pub struct SqlUserStore {
    db: Database,
    /// PostgreSQL: the counts of events applied at the same time, one statement a group.
    counts: Option<Coalescer<CountCall, Result<Handled, StoreError>>>,
}

impl SqlUserStore {
    pub fn new(db: &Database) -> Self {
        let counts = db.typed_postgres().map(|typed| {
            let (group_db, typed) = (db.clone(), typed.clone());
            // One group at a time: the events of a burst mostly count for the same few
            // accounts, whose rows two groups would only queue on.
            Coalescer::new(
                COUNT_WRITE,
                db.write_groups(),
                COUNT_GROUP,
                1,
                move |calls| count_group(group_db.clone(), typed.clone(), calls),
            )
        });
        Self {
            db: db.clone(),
            counts,
        }
    }
}

/// At most as many as a consumer applies at once (`events::amqp::MAX_BATCH`).
const COUNT_GROUP: usize = 64;
const COUNT_WRITE: &str = "order_count";

/// One `count_order` call, a row of [`COUNT_ORDERS_POSTGRES`].
struct CountCall {
    queue: String,
    event_id: String,
    user_id: String,
    placed: i64,
    cancelled: i64,
}

/// The inbox row (see `shop_platform::events::inbox`) and the count, the count only if
/// the row is new. SQLite has no data-modifying CTEs, so statements of one committed
/// batch (`Database::committed_batch`), guarded by `changes()` (rows the insert added;
/// a `SELECT` leaves it as it was). The `SELECT`'s row says the event was new: read so,
/// not with `RETURNING` (`SqliteBatches` says why).
const COUNT_ORDER_SQLITE: &str = "
    INSERT INTO inbox (queue, event_id, processed_at_ms) VALUES ($1, $2, $3)
        ON CONFLICT (queue, event_id) DO NOTHING;
    SELECT 1 AS first WHERE changes() = 1;
    UPDATE users SET orders_placed = orders_placed + $4,
        orders_cancelled = orders_cancelled + $5 WHERE id = $6 AND changes() = 1;";

/// The same in one PostgreSQL statement, atomic without a transaction of its own.
const COUNT_ORDER_POSTGRES: &str =
    "WITH first AS (INSERT INTO inbox (queue, event_id, processed_at_ms) VALUES ($1, $2, $3)
        ON CONFLICT (queue, event_id) DO NOTHING RETURNING 1),
    counted AS (UPDATE users SET orders_placed = orders_placed + $4,
        orders_cancelled = orders_cancelled + $5
        WHERE id = $6 AND EXISTS (SELECT 1 FROM first) RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM first)";

/// A group of calls in one statement, their rows as one array a column (`$1` to `$5`),
/// `$6` the time. An event twice in the group counts once (`DISTINCT ON`); the rows
/// returned are the events new to the inbox. The counts go on per account, summed.
const COUNT_ORDERS_POSTGRES: &str = "WITH batch AS (
        SELECT DISTINCT ON (queue, event_id) queue, event_id, user_id, placed, cancelled
        FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[])
            AS b (queue, event_id, user_id, placed, cancelled)
    ), first AS (
        INSERT INTO inbox (queue, event_id, processed_at_ms)
        SELECT queue, event_id, $6 FROM batch
        ON CONFLICT (queue, event_id) DO NOTHING
        RETURNING queue, event_id
    ), counted AS (
        UPDATE users SET orders_placed = orders_placed + totals.placed,
            orders_cancelled = orders_cancelled + totals.cancelled
        FROM (SELECT batch.user_id, SUM(batch.placed)::bigint AS placed,
                SUM(batch.cancelled)::bigint AS cancelled
            FROM batch JOIN first USING (queue, event_id) GROUP BY batch.user_id) AS totals
        WHERE users.id = totals.user_id
        RETURNING 1
    )
    SELECT queue, event_id FROM first";

/// Counts a group, in one statement when it can ([`together_or_alone`]).
async fn count_group(
    db: Database,
    typed: PgPool,
    calls: Vec<CountCall>,
) -> Vec<Result<Handled, StoreError>> {
    let together = async {
        let answers = count_together(&typed, &calls).await?;
        Ok::<_, sqlx::Error>(answers.into_iter().map(Ok).collect())
    };
    together_or_alone(COUNT_WRITE, db.write_groups(), &calls, together, |call| {
        count_one(&db, call)
    })
    .await
}

async fn count_together(typed: &PgPool, calls: &[CountCall]) -> Result<Vec<Handled>, sqlx::Error> {
    let mut new: Vec<(String, String)> = sqlx::query_as(COUNT_ORDERS_POSTGRES)
        .bind(column(calls, |call| call.queue.as_str()))
        .bind(column(calls, |call| call.event_id.as_str()))
        .bind(column(calls, |call| call.user_id.as_str()))
        .bind(column(calls, |call| call.placed))
        .bind(column(calls, |call| call.cancelled))
        .bind(chrono::Utc::now().timestamp_millis())
        .fetch_all(typed)
        .await?;
    // The first call of each new event applied it; any other was a duplicate.
    Ok(calls
        .iter()
        .map(|call| {
            match new
                .iter()
                .position(|(queue, event_id)| *queue == call.queue && *event_id == call.event_id)
            {
                Some(at) => {
                    new.swap_remove(at);
                    Handled::Applied
                }
                None => Handled::Duplicate,
            }
        })
        .collect())
}

/// One call on its own, in one statement.
async fn count_one(db: &Database, call: &CountCall) -> Result<Handled, StoreError> {
    let sql = match db.backend() {
        Backend::Sqlite => COUNT_ORDER_SQLITE,
        Backend::Postgres => COUNT_ORDER_POSTGRES,
    };
    let query = sqlx::query(sql)
        .bind(&call.queue)
        .bind(&call.event_id)
        .bind(chrono::Utc::now().timestamp_millis())
        .bind(call.placed)
        .bind(call.cancelled)
        .bind(&call.user_id);
    let first = match db.backend() {
        Backend::Sqlite => !db.committed_batch(query).await?.is_empty(),
        Backend::Postgres => query.fetch_one(db.writer()).await?.try_get::<bool, _>(0)?,
    };
    Ok(if first {
        Handled::Applied
    } else {
        Handled::Duplicate
    })
}

#[async_trait]
impl UserStore for SqlUserStore {
    async fn create(&self, user: &User, password_hash: &str) -> Result<(), StoreError> {
        let result = sqlx::query(
            "INSERT INTO users (id, name, email, password_hash, created_at, role) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&user.id)
        .bind(&user.name)
        .bind(&user.email)
        .bind(password_hash)
        .bind(&user.created_at)
        .bind(user.role.as_str())
        .execute(self.db.writer())
        .await
        .map_err(|err| match &err {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::DuplicateEmail
            }
            _ => err.into(),
        });
        match result {
            // Lost a race with a concurrent registration: name the rule it broke.
            Err(StoreError::DuplicateEmail) => Err(self
                .conflict(&user.id, &user.email)
                .await?
                .unwrap_or(StoreError::DuplicateEmail)),
            other => other.map(|_| ()),
        }
    }

    async fn conflict(&self, id: &str, email: &str) -> Result<Option<StoreError>, StoreError> {
        let taken: Option<(i64, i64)> = sqlx::query_as(
            "SELECT MAX(CASE WHEN id = $1 THEN 1 ELSE 0 END), MAX(CASE WHEN email = $2 THEN 1 ELSE 0 END)
             FROM users WHERE id = $1 OR email = $2 HAVING COUNT(*) > 0",
        )
        .bind(id)
        .bind(email)
        .fetch_optional(self.db.pool())
        .await?;
        Ok(match taken {
            Some((1, _)) => Some(StoreError::DuplicateId(id.to_owned())),
            Some((_, 1)) => Some(StoreError::DuplicateEmail),
            _ => None,
        })
    }

    async fn get(&self, id: &str) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, email, created_at, role, orders_placed, orders_cancelled
             FROM users WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.db.pool())
        .await?;
        row.map(|row| {
            Ok(User {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                email: row.try_get("email")?,
                created_at: row.try_get("created_at")?,
                role: role(&row)?,
                orders: OrderCounts {
                    placed: row.try_get("orders_placed")?,
                    cancelled: row.try_get("orders_cancelled")?,
                },
            })
        })
        .transpose()
        .map_err(StoreError::Database)
    }

    async fn count_order(
        &self,
        queue: &str,
        event_id: &str,
        user_id: &str,
        counts: OrderCounts,
    ) -> Result<Handled, StoreError> {
        // Runs for every order placed and cancelled. SQLite: one hand-off to the batch
        // thread, which commits the calls waiting together. PostgreSQL: the calls made
        // together share one statement.
        let call = CountCall {
            queue: queue.to_owned(),
            event_id: event_id.to_owned(),
            user_id: user_id.to_owned(),
            placed: counts.placed,
            cancelled: counts.cancelled,
        };
        match &self.counts {
            // A group task gone (it panicked) fails its calls as a crashed worker would:
            // the consumer delivers them again.
            Some(counts) => counts
                .call(call)
                .await
                .unwrap_or(Err(StoreError::Database(sqlx::Error::WorkerCrashed))),
            None => count_one(&self.db, &call).await,
        }
    }

    async fn login_record(&self, email: &str) -> Result<Option<LoginRecord>, StoreError> {
        let row = sqlx::query("SELECT id, role, password_hash FROM users WHERE email = $1")
            .bind(email)
            .fetch_optional(self.db.pool())
            .await?;
        row.map(|row| {
            Ok(LoginRecord {
                id: row.try_get("id")?,
                role: role(&row)?,
                password_hash: row.try_get("password_hash")?,
            })
        })
        .transpose()
        .map_err(StoreError::Database)
    }

    async fn make_admin(&self, email: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE users SET role = 'admin' WHERE email = $1")
            .bind(email)
            .execute(self.db.writer())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn failures(
        &self,
        keys: &[&str],
        window_start_after: i64,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            let row: Option<(i64, i64)> = sqlx::query_as(
                "SELECT failures, window_start FROM login_failures WHERE key = $1 AND window_start > $2",
            )
            .bind(*key)
            .bind(window_start_after)
            .fetch_optional(self.db.pool())
            .await?;
            if let Some((failures, start)) = row {
                found.push(((*key).to_owned(), failures, start));
            }
        }
        Ok(found)
    }

    async fn record_failure(
        &self,
        keys: &[&str],
        now: i64,
        window_start_after: i64,
    ) -> Result<(), StoreError> {
        for key in keys {
            // One statement, so concurrent failures on replicas all count.
            sqlx::query(
                "INSERT INTO login_failures (key, window_start, failures) VALUES ($1, $2, 1)
                 ON CONFLICT (key) DO UPDATE SET
                   failures = CASE WHEN login_failures.window_start > $3
                                   THEN login_failures.failures + 1 ELSE 1 END,
                   window_start = CASE WHEN login_failures.window_start > $3
                                       THEN login_failures.window_start ELSE $2 END",
            )
            .bind(*key)
            .bind(now)
            .bind(window_start_after)
            .execute(self.db.writer())
            .await?;
        }
        // Expired windows are dead weight; a failure is a fine moment to sweep them.
        sqlx::query("DELETE FROM login_failures WHERE window_start <= $1")
            .bind(window_start_after)
            .execute(self.db.writer())
            .await?;
        Ok(())
    }

    async fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM login_failures WHERE key = $1")
            .bind(key)
            .execute(self.db.writer())
            .await?;
        Ok(())
    }
}

fn role(row: &sqlx::any::AnyRow) -> Result<Role, sqlx::Error> {
    let text: String = row.try_get("role")?;
    Role::parse(&text).ok_or_else(|| sqlx::Error::Decode(format!("unknown role {text:?}").into()))
}
