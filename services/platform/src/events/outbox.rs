//! The outbox relay: publishes committed events in order, marks them sent once the broker
//! confirmed them. Each publishing service's migrations create:
//! `outbox (seq, event_id UNIQUE, kind, body, traceparent, created_at_ms, sent_at_ms, attempts)`.
//!
//! On PostgreSQL every replica runs a relay, and one at a time works: each batch is read,
//! published and marked inside a transaction holding an advisory lock, so a replica that
//! dies mid-batch releases the lock and leaves its rows unsent for the next one. The
//! price of a crash between confirm and commit is a second publication, which consumers
//! absorb (their inbox); never a lost event.
//!
//! A replica that commits an event wakes its own relay ([`Outbox::wake`]). If another
//! replica's relay holds the lock, it tries again every [`LOCK_RETRY`] until it gets the
//! lock and finds the outbox empty: the other may have read its batch before this event
//! committed. No `NOTIFY` is needed for that, and none is sent (each cost a signal to
//! every listening session of the database and a serialized commit); every relay also
//! looks every [`POLL`], for events whose writer died before its relay ran.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::{AnyPool, Row};
use tokio::sync::Notify;

use super::consume::EventMetrics;
use crate::{Backend, Database};

/// One outbox row on its way to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub event_id: String,
    /// The event type, which is also its routing key.
    pub kind: String,
    pub body: String,
    pub traceparent: Option<String>,
    /// Earlier publications that were not confirmed.
    pub attempt: i64,
}

/// The first `confirmed` messages of a batch were confirmed, and the rest may not be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unconfirmed {
    pub confirmed: usize,
    pub reason: String,
}

#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `messages` in order; `Ok` once the broker confirmed every one.
    async fn publish(&self, messages: &[Message]) -> Result<(), Unconfirmed>;
}

/// What a service keeps to wake its relay once it has committed an event, so delivery
/// does not wait for the next poll.
#[derive(Clone, Default)]
pub struct Outbox {
    wake: Arc<Notify>,
}

impl Outbox {
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// How often a relay looks at the outbox without being woken: the longest an event
/// waits whose writer died before its own relay ran.
pub const POLL: Duration = Duration::from_secs(1);
/// How soon a relay that found another replica's relay at work tries again.
pub const LOCK_RETRY: Duration = Duration::from_millis(20);
/// How long a woken relay lets more events gather before it reads them (Kafka's
/// `linger.ms`, 5 ms there too): under load a batch then carries the events of 5 ms
/// instead of those committed during one round trip, and every batch costs a read, a
/// confirm and a mark whatever its size.
pub const LINGER: Duration = Duration::from_millis(5);
const BATCH: usize = 100;
/// How long the broker may take to confirm one batch.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Sent rows are kept this long (to answer "was it sent?"), then deleted.
const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// PostgreSQL advisory lock key of the relay: any constant no other lock of this
/// database uses (the migrations lock uses its own).
const RELAY_LOCK: i64 = 0x5ED0_0B0C;

/// Starts the relay. It also runs every `poll`, which bounds how long an event written by
/// another replica (or missed by a notification) waits.
pub fn spawn_relay(
    db: &Database,
    outbox: &Outbox,
    publisher: Arc<dyn Publisher>,
    metrics: EventMetrics,
    poll: Duration,
) -> tokio::task::JoinHandle<()> {
    let relay = Relay {
        db: db.clone(),
        publisher,
        metrics,
    };
    // The first look one period from now: the relay drains at once anyway.
    let mut polls = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
    polls.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let wake = outbox.wake.clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        let mut last_warning: Option<(Instant, String)> = None;
        let mut last_cleanup = Instant::now();
        loop {
            let drained = relay.drain().await;
            if !matches!(drained, Ok(Drained::LockHeldElsewhere)) {
                relay.measure().await;
            }
            match drained {
                Ok(Drained::LockHeldElsewhere) => {
                    tokio::time::sleep(LOCK_RETRY.min(poll)).await;
                }
                Ok(Drained::Empty) => {
                    backoff = Duration::from_millis(100);
                    if last_warning.take().is_some() {
                        tracing::info!("the outbox relay is publishing again");
                    }
                    if last_cleanup.elapsed() > Duration::from_secs(600) {
                        last_cleanup = Instant::now();
                        relay.forget_sent().await;
                    }
                    tokio::select! {
                        _ = polls.tick() => {}
                        _ = wake.notified() => tokio::time::sleep(LINGER.min(poll)).await,
                    }
                }
                Err(reason) => {
                    // Once per reason and minute: a broker that stays away is one
                    // message, not one per retry.
                    let repeat = last_warning.as_ref().is_some_and(|(at, last)| {
                        *last == reason && at.elapsed() < Duration::from_secs(60)
                    });
                    if !repeat {
                        tracing::warn!(%reason, "events wait in the outbox; retrying");
                        last_warning = Some((Instant::now(), reason));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    })
}

struct Relay {
    db: Database,
    publisher: Arc<dyn Publisher>,
    metrics: EventMetrics,
}

/// How a drain ended without an error.
enum Drained {
    /// Fewer than a batch was left: the outbox is empty, or was when last read.
    Empty,
    /// Another replica's relay holds the relay lock (PostgreSQL).
    LockHeldElsewhere,
}

impl Relay {
    /// Publishes batches until the outbox is empty.
    async fn drain(&self) -> Result<Drained, String> {
        loop {
            let published = match self.db.backend() {
                Backend::Postgres => match self.batch_as_leader().await? {
                    Some(published) => published,
                    None => return Ok(Drained::LockHeldElsewhere),
                },
                Backend::Sqlite => self.batch().await?,
            };
            if published < BATCH {
                return Ok(Drained::Empty);
            }
        }
    }

    /// `None`: another replica's relay holds the lock.
    async fn batch_as_leader(&self) -> Result<Option<usize>, String> {
        let mut tx = self.db.writer().begin().await.map_err(db)?;
        let leader: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(RELAY_LOCK)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        if !leader {
            return Ok(None);
        }
        let messages = unsent(&mut tx).await.map_err(db)?;
        let result = self.publish(&messages).await;
        self.count(&messages, &result);
        for query in marks(&messages, &result) {
            query.execute(&mut *tx).await.map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        result.map(|()| Some(messages.len())).map_err(|u| u.reason)
    }

    /// SQLite: one process owns the file, so no lock, and no transaction held while the
    /// broker confirms (it would stop every other write).
    async fn batch(&self) -> Result<usize, String> {
        let mut conn = self.db.pool().acquire().await.map_err(db)?;
        let messages = unsent(&mut conn).await.map_err(db)?;
        drop(conn);
        let result = self.publish(&messages).await;
        self.count(&messages, &result);
        // On the batch thread, with the other writes waiting, where the writer would be
        // held from this task for each statement.
        for query in marks(&messages, &result) {
            self.db.committed_batch(query).await.map_err(db)?;
        }
        result.map(|()| messages.len()).map_err(|u| u.reason)
    }

    async fn publish(&self, messages: &[Message]) -> Result<(), Unconfirmed> {
        if messages.is_empty() {
            return Ok(());
        }
        tokio::time::timeout(PUBLISH_TIMEOUT, self.publisher.publish(messages))
            .await
            .unwrap_or_else(|_| {
                Err(Unconfirmed {
                    confirmed: 0,
                    reason: format!("the broker did not confirm within {PUBLISH_TIMEOUT:?}"),
                })
            })
    }

    /// Counts what the broker confirmed as soon as it answers: marking the rows sent may
    /// fail and send them again, and then the broker has confirmed them twice.
    fn count(&self, messages: &[Message], result: &Result<(), Unconfirmed>) {
        for message in &messages[..confirmed(messages, result)] {
            self.metrics
                .published
                .with_label_values(&[message.kind.as_str()])
                .inc();
        }
    }

    async fn measure(&self) {
        let row = sqlx::query(
            "SELECT COUNT(*) AS pending, MIN(created_at_ms) AS oldest FROM outbox
             WHERE sent_at_ms IS NULL",
        )
        .fetch_one(self.db.pool())
        .await;
        match row {
            Ok(row) => {
                let pending: i64 = row.try_get("pending").unwrap_or(0);
                let oldest: Option<i64> = row.try_get("oldest").unwrap_or(None);
                self.metrics.pending.set(pending);
                let age = oldest
                    .map(|at| (chrono::Utc::now().timestamp_millis() - at).max(0) as f64 / 1000.0)
                    .unwrap_or(0.0);
                self.metrics.oldest_pending_age.set(age);
            }
            Err(err) => tracing::debug!(error = %err, "cannot measure the outbox"),
        }
    }

    async fn forget_sent(&self) {
        let before = chrono::Utc::now().timestamp_millis() - RETENTION.as_millis() as i64;
        if let Err(err) = delete_sent_before(self.db.writer(), before).await {
            tracing::debug!(error = %err, "cannot delete old sent events; will try again");
        }
    }
}

/// Deletes rows sent before `before_ms`; an unsent row stays, however old.
async fn delete_sent_before(writer: &AnyPool, before_ms: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM outbox WHERE sent_at_ms < $1")
        .bind(before_ms)
        .execute(writer)
        .await?;
    Ok(done.rows_affected())
}

fn db(err: sqlx::Error) -> String {
    format!("database: {err}")
}

fn confirmed(messages: &[Message], result: &Result<(), Unconfirmed>) -> usize {
    match result {
        Ok(()) => messages.len(),
        Err(u) => u.confirmed.min(messages.len()),
    }
}

async fn unsent(conn: &mut sqlx::AnyConnection) -> Result<Vec<Message>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT event_id, kind, body, traceparent, attempts FROM outbox
         WHERE sent_at_ms IS NULL ORDER BY seq LIMIT $1",
    )
    .bind(BATCH as i64)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Message {
                event_id: row.try_get("event_id")?,
                kind: row.try_get("kind")?,
                body: row.try_get("body")?,
                traceparent: row.try_get("traceparent")?,
                attempt: row.try_get("attempts")?,
            })
        })
        .collect()
}

/// What a relay writes once the broker answered: the confirmed events marked sent, and
/// the first unconfirmed one's attempt counted. At most two statements, each numbered
/// from `$1`, so either backend runs them as they are.
fn marks(
    messages: &[Message],
    result: &Result<(), Unconfirmed>,
) -> Vec<sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>> {
    let done = confirmed(messages, result);
    let mut queries = Vec::with_capacity(2);
    if done > 0 {
        let placeholders = (2..done + 2)
            .map(|n| format!("${n}"))
            .collect::<Vec<_>>()
            .join(", ");
        // Built from a count only; every value is a parameter.
        let sql = format!("UPDATE outbox SET sent_at_ms = $1 WHERE event_id IN ({placeholders})");
        let mut query =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(chrono::Utc::now().timestamp_millis());
        for message in &messages[..done] {
            query = query.bind(message.event_id.clone());
        }
        queries.push(query);
    }
    if let Some(stuck) = messages.get(done)
        && result.is_err()
    {
        queries.push(
            sqlx::query("UPDATE outbox SET attempts = attempts + 1 WHERE event_id = $1")
                .bind(stuck.event_id.clone()),
        );
    }
    queries
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SQLite database in `dir` with no migrations: each test creates its own outbox.
    async fn bare_sqlite(dir: &std::path::Path) -> Database {
        let none = crate::Migrations {
            sqlite: sqlx::migrate::Migrator::DEFAULT,
            postgres: sqlx::migrate::Migrator::DEFAULT,
        };
        crate::db::StorageConfig::in_dir(dir)
            .open("t", &none)
            .await
            .unwrap()
    }

    /// [`bare_sqlite`] with an outbox shaped as the services' migrations make it.
    async fn sqlite_with_outbox(dir: &std::path::Path) -> Database {
        let db = bare_sqlite(dir).await;
        sqlx::raw_sql(
            "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, event_id TEXT UNIQUE NOT NULL,
                 kind TEXT NOT NULL, body TEXT NOT NULL, traceparent TEXT,
                 created_at_ms BIGINT NOT NULL DEFAULT 0, sent_at_ms BIGINT,
                 attempts BIGINT NOT NULL DEFAULT 0)",
        )
        .execute(db.writer())
        .await
        .unwrap();
        db
    }

    /// What a relay writes after a publication the broker confirmed only in part: the
    /// confirmed events sent, the first unconfirmed one's attempt counted, the rest as
    /// they were; and the attempt alone when nothing was confirmed.
    #[tokio::test]
    async fn marks_record_what_the_broker_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let db = bare_sqlite(dir.path()).await;
        sqlx::raw_sql(
            "CREATE TABLE outbox (event_id TEXT PRIMARY KEY, sent_at_ms BIGINT,
                 attempts BIGINT NOT NULL DEFAULT 0);
             INSERT INTO outbox (event_id) VALUES ('a'), ('b'), ('c'), ('d');",
        )
        .execute(db.writer())
        .await
        .unwrap();
        let message = |id: &str| Message {
            event_id: id.into(),
            kind: "k".into(),
            body: "{}".into(),
            traceparent: None,
            attempt: 0,
        };
        let unconfirmed = |confirmed| {
            Err(Unconfirmed {
                confirmed,
                reason: "nack".into(),
            })
        };
        let abc = [message("a"), message("b"), message("c")];
        let d = [message("d")];
        for query in marks(&abc, &unconfirmed(1))
            .into_iter()
            .chain(marks(&d, &unconfirmed(0)))
        {
            db.committed_batch(query).await.unwrap();
        }
        assert!(marks(&[], &Ok(())).is_empty());

        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT event_id, sent_at_ms IS NOT NULL, attempts FROM outbox ORDER BY event_id",
        )
        .fetch_all(db.pool())
        .await
        .unwrap();
        let expected = [("a", 1, 0), ("b", 0, 1), ("c", 0, 0), ("d", 0, 1)];
        let expected: Vec<_> = expected
            .iter()
            .map(|&(id, sent, attempts)| (id.to_owned(), sent, attempts))
            .collect();
        assert_eq!(rows, expected);
    }

    /// Confirms every message, then takes the outbox away, so marking them sent fails.
    struct ConfirmsThenBreaksTheOutbox(Database);

    #[async_trait]
    impl Publisher for ConfirmsThenBreaksTheOutbox {
        async fn publish(&self, _: &[Message]) -> Result<(), Unconfirmed> {
            sqlx::query("ALTER TABLE outbox RENAME TO gone")
                .execute(self.0.writer())
                .await
                .unwrap();
            Ok(())
        }
    }

    /// `events_published_total` counts what the broker confirmed, even when marking it
    /// sent then fails (the rows go out again, and are counted again: the broker has
    /// confirmed them twice).
    #[tokio::test]
    async fn what_the_broker_confirmed_is_counted_though_marking_it_fails() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite_with_outbox(dir.path()).await;
        sqlx::query(
            "INSERT INTO outbox (event_id, kind, body) VALUES ('a', 'k', '{}'), ('b', 'k', '{}')",
        )
        .execute(db.writer())
        .await
        .unwrap();
        let relay = Relay {
            db: db.clone(),
            publisher: Arc::new(ConfirmsThenBreaksTheOutbox(db.clone())),
            metrics: EventMetrics::new(&crate::Metrics::new("t"), &["k"], &[]),
        };
        assert!(relay.batch().await.is_err(), "marking them sent failed");
        assert_eq!(relay.metrics.published.with_label_values(&["k"]).get(), 2);
    }

    /// Records when each publication came and which events it carried.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<(Instant, Vec<String>)>>);

    #[async_trait]
    impl Publisher for Recorder {
        async fn publish(&self, messages: &[Message]) -> Result<(), Unconfirmed> {
            let ids = messages.iter().map(|m| m.event_id.clone()).collect();
            self.0.lock().unwrap().push((Instant::now(), ids));
            Ok(())
        }
    }

    /// A woken relay waits [`LINGER`] before it reads the outbox, so the events committed
    /// meanwhile go out in the same publication.
    #[tokio::test]
    async fn a_woken_relay_lingers_so_events_committed_meanwhile_go_out_together() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite_with_outbox(dir.path()).await;
        let recorder = Arc::new(Recorder::default());
        let outbox = Outbox::default();
        let metrics = EventMetrics::new(&crate::Metrics::new("t"), &["k"], &[]);
        let relay = spawn_relay(
            &db,
            &outbox,
            recorder.clone(),
            metrics,
            Duration::from_secs(600),
        );
        // Its first drain, at start, finds nothing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let insert = |id: &'static str| {
            sqlx::query("INSERT INTO outbox (event_id, kind, body) VALUES ($1, 'k', '{}')")
                .bind(id)
                .execute(db.writer())
        };
        insert("a").await.unwrap();
        let woken = Instant::now();
        outbox.wake();
        insert("b").await.unwrap();
        let b_committed = woken.elapsed();
        outbox.wake();

        let deadline = Instant::now() + Duration::from_secs(10);
        let published = || -> usize {
            recorder
                .0
                .lock()
                .unwrap()
                .iter()
                .map(|(_, ids)| ids.len())
                .sum()
        };
        while published() < 2 {
            assert!(Instant::now() < deadline, "the events were not published");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        relay.abort();
        let publications = recorder.0.lock().unwrap().clone();
        let (first_at, first) = &publications[0];
        let waited = first_at.duration_since(woken);
        assert!(waited >= LINGER, "published {waited:?} after the wake");
        // Only meaningful when the second commit fell inside the window (a slow machine
        // may take longer than that for one insert).
        if b_committed < LINGER {
            assert_eq!(
                first,
                &["a", "b"],
                "committed {b_committed:?} after the wake"
            );
        }
    }

    #[tokio::test]
    async fn only_rows_sent_longer_ago_than_the_retention_are_deleted() {
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::query(
            "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, event_id TEXT UNIQUE NOT NULL,
             created_at_ms BIGINT NOT NULL, sent_at_ms BIGINT)",
        )
        .execute(&pool)
        .await
        .unwrap();
        let now = chrono::Utc::now().timestamp_millis();
        let day = 24 * 3600 * 1000;
        for (id, created, sent) in [
            ("sent-8-days-ago", now - 9 * day, Some(now - 8 * day)),
            ("sent-6-days-ago", now - 9 * day, Some(now - 6 * day)),
            ("never-sent-30-days-old", now - 30 * day, None),
            ("sent-just-now", now, Some(now)),
        ] {
            sqlx::query(
                "INSERT INTO outbox (event_id, created_at_ms, sent_at_ms) VALUES ($1, $2, $3)",
            )
            .bind(id)
            .bind(created)
            .bind(sent)
            .execute(&pool)
            .await
            .unwrap();
        }
        let deleted = delete_sent_before(&pool, now - RETENTION.as_millis() as i64)
            .await
            .unwrap();
        let left: Vec<String> = sqlx::query_scalar("SELECT event_id FROM outbox ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(deleted, 1);
        assert_eq!(
            left,
            ["sent-6-days-ago", "never-sent-30-days-old", "sent-just-now"]
        );
    }
}
