//! Storage settings and the database every service opens the same way.
//!
//! Two backends behind one `sqlx::AnyPool`, so a service has one storage implementation
//! written in the SQL both understand (`$1` placeholders, `RETURNING`, `ON CONFLICT`):
//! - SQLite, embedded: a file per service under `DATA_DIR` (the local launcher's default);
//! - PostgreSQL, when `DATABASE_URL` is `postgres://...` (what the chart deploys, one
//!   database per service).
//!
//! Migrations are embedded per backend and applied at start-up by one process at a time:
//! a PostgreSQL advisory lock, or a lock file next to the SQLite database, so replicas
//! starting together against an empty database do not race.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::pool::PoolOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Connection};

mod announce;
mod batches;
mod coalesce;
mod listen;

pub use announce::Announcer;
use batches::SqliteFile;
pub use batches::{BatchRow, ColumnValue, RowColumns, SqliteBatches};
pub use coalesce::{Coalescer, Gone, GroupMetrics, column, together_or_alone};
use listen::{Listeners, Subscription};

use crate::config::{ConfigError, Env, Var};
use crate::probes::CheckResult;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A service's migrations, one directory per backend (the DDL differs: identity columns,
/// integer widths); both describe the same tables.
pub struct Migrations {
    pub sqlite: Migrator,
    pub postgres: Migrator,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub statement_timeout: Duration,
    pub startup_timeout: Duration,
}

impl StorageConfig {
    pub const DATA_DIR: Var = Var::new(
        "DATA_DIR",
        "./data",
        "Directory for the embedded SQLite database (<service>.db); created if missing.",
    );
    pub const DATABASE_URL: Var = Var::optional(
        "DATABASE_URL",
        "Database URL; overrides DATA_DIR. postgres://USER:PASSWORD@HOST:PORT/DB (one database per service) or sqlite://PATH.",
    );
    pub const MAX_CONNECTIONS: Var = Var::new("DB_MAX_CONNECTIONS", "8", "Connection pool size.");
    pub const ACQUIRE_TIMEOUT: Var = Var::new(
        "DB_ACQUIRE_TIMEOUT",
        "3s",
        "How long a request waits for a pooled connection before answering 503.",
    );
    pub const STATEMENT_TIMEOUT: Var = Var::new(
        "DB_STATEMENT_TIMEOUT",
        "10s",
        "PostgreSQL: longest one statement may run (statement_timeout); 0 = no limit.",
    );
    pub const STARTUP_TIMEOUT: Var = Var::new(
        "DB_STARTUP_TIMEOUT",
        "60s",
        "How long start-up keeps retrying a database that does not accept connections yet.",
    );
    pub const VARS: &[Var] = &[
        Self::DATA_DIR,
        Self::DATABASE_URL,
        Self::MAX_CONNECTIONS,
        Self::ACQUIRE_TIMEOUT,
        Self::STATEMENT_TIMEOUT,
        Self::STARTUP_TIMEOUT,
    ];

    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let database_url = env.parse_opt::<String>(&Self::DATABASE_URL)?;
        if let Some(url) = &database_url {
            let invalid =
                |reason: String| ConfigError::new(&Self::DATABASE_URL, redact_url(url), reason);
            match backend_of(url) {
                Some(Backend::Sqlite) => {
                    SqliteConnectOptions::from_str(url).map_err(|e| invalid(e.to_string()))?;
                }
                Some(Backend::Postgres) => {
                    // Parse errors may quote the URL; keep the password out of them.
                    sqlx::postgres::PgConnectOptions::from_str(url)
                        .map_err(|e| invalid(redact_url(&e.to_string())))?;
                }
                None => {
                    return Err(invalid(
                        "unsupported scheme; use postgres://... or sqlite://PATH".into(),
                    ));
                }
            }
        }
        let max_connections = env.parse::<u32>(&Self::MAX_CONNECTIONS)?;
        if max_connections == 0 {
            return Err(ConfigError::new(
                &Self::MAX_CONNECTIONS,
                "0",
                "must be at least 1",
            ));
        }
        Ok(Self {
            data_dir: env.parse(&Self::DATA_DIR)?,
            database_url,
            max_connections,
            acquire_timeout: env.duration(&Self::ACQUIRE_TIMEOUT)?,
            statement_timeout: env.duration(&Self::STATEMENT_TIMEOUT)?,
            startup_timeout: env.duration(&Self::STARTUP_TIMEOUT)?,
        })
    }

    /// A private SQLite directory, for tests.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: dir.into(),
            database_url: None,
            max_connections: 4,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(10),
            startup_timeout: Duration::from_secs(5),
        }
    }

    /// The given database URL with test-sized settings.
    pub fn at_url(url: impl Into<String>) -> Self {
        Self {
            database_url: Some(url.into()),
            ..Self::in_dir("unused")
        }
    }

    pub fn backend(&self) -> Backend {
        self.database_url
            .as_deref()
            .and_then(backend_of)
            .unwrap_or(Backend::Sqlite)
    }

    /// Opens this service's database, waiting up to `startup_timeout` for it to accept
    /// connections, and applies the migrations. The pool reconnects by itself afterwards.
    pub async fn open(&self, service: &str, migrations: &Migrations) -> anyhow::Result<Database> {
        sqlx::any::install_default_drivers();
        let backend = self.backend();
        let (url, lock_file, sqlite_file) = match (&self.database_url, backend) {
            (Some(url), Backend::Postgres) => (url.clone(), None, None),
            (url, Backend::Sqlite) => {
                let options = match url {
                    Some(url) => SqliteConnectOptions::from_str(url)?,
                    None => {
                        std::fs::create_dir_all(&self.data_dir).map_err(|e| {
                            anyhow::anyhow!(
                                "cannot create DATA_DIR {}: {e}",
                                self.data_dir.display()
                            )
                        })?;
                        SqliteConnectOptions::new()
                            .filename(self.data_dir.join(format!("{service}.db")))
                    }
                }
                .create_if_missing(true);
                let file = options.get_filename();
                let in_memory = file.to_string_lossy().starts_with("file:sqlx-in-memory");
                let lock_file = (!file.as_os_str().is_empty() && !in_memory).then(|| {
                    let mut name = file.as_os_str().to_owned();
                    name.push(".migrate-lock");
                    PathBuf::from(name)
                });
                let sqlite_file = SqliteFile {
                    path: file.to_owned(),
                    in_memory,
                };
                (
                    options.to_url_lossy().to_string(),
                    lock_file,
                    Some(sqlite_file),
                )
            }
            (None, Backend::Postgres) => unreachable!("postgres is chosen by URL"),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let session = Session {
            backend,
            statement_timeout: self.statement_timeout,
        };

        // SQLite has no advisory locks: an exclusive lock on a file beside the database
        // serialises replicas sharing it, from before the first connection, because
        // switching to WAL needs the database's exclusive lock too, and two connections
        // upgrading at once get SQLITE_BUSY at once, without waiting for busy_timeout.
        let starting = match lock_file {
            Some(path) => Some(lock_exclusively(path).await?),
            None => None,
        };
        let mut conn = self.connect_at_startup(service, &options).await?;
        session.prepare(&mut conn, false).await?;
        migrate(&mut conn, backend, migrations).await?;
        conn.close().await?;
        drop(starting);

        let pool_options = || {
            pinged_if_idle(AnyPoolOptions::new(), self.acquire_timeout)
                .after_connect(move |conn, _| session.prepare(conn, true))
        };
        let pool = pool_options()
            .max_connections(self.max_connections)
            .connect_lazy_with(options.clone());
        // SQLite lets one connection write at a time, and a writer that finds the lock
        // taken polls for it with growing sleeps (busy_timeout): under concurrent writes
        // that, not the work, sets the latency. One writing connection per process turns
        // the contention into the pool's first-come queue.
        // The batch thread holds it as its turn to write (batches.rs), once per group, so
        // it is never pinged: a local file's connection does not drop.
        let (writer, batches) = match sqlite_file {
            Some(file) => {
                let writer = pool_options()
                    .max_connections(1)
                    .before_acquire(|_, _| Box::pin(async { Ok(true) }))
                    .connect_lazy_with(options.clone());
                let batches = SqliteBatches::start(file, writer.clone())?;
                (writer, Some(batches))
            }
            None => (pool.clone(), None),
        };
        let typed = match backend {
            Backend::Postgres => {
                let settings = postgres_settings(self.statement_timeout);
                Some(
                    pinged_if_idle(PgPoolOptions::new(), self.acquire_timeout)
                        .max_connections(TYPED_CONNECTIONS)
                        .after_connect(move |conn, _| {
                            let settings = settings.clone();
                            Box::pin(async move {
                                sqlx::raw_sql(sqlx::AssertSqlSafe(settings))
                                    .execute(conn)
                                    .await
                                    .map(drop)
                            })
                        })
                        .connect_lazy_with(PgConnectOptions::from_str(&url)?),
                )
            }
            Backend::Sqlite => None,
        };
        Ok(Database {
            pool,
            writer,
            typed,
            batches,
            backend,
            connect: Arc::new(Connect { url, options }),
            listeners: Arc::default(),
            write_groups: GroupMetrics::default(),
        })
    }

    async fn connect_at_startup(
        &self,
        service: &str,
        options: &AnyConnectOptions,
    ) -> anyhow::Result<AnyConnection> {
        let deadline = Instant::now() + self.startup_timeout;
        loop {
            match AnyConnection::connect_with(options).await {
                Ok(conn) => return Ok(conn),
                Err(err) if is_unavailable(&err) && Instant::now() < deadline => {
                    tracing::warn!(service, error = %err, "database not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(err) => {
                    return Err(anyhow::anyhow!(
                        "{service}: cannot connect to the database: {err}"
                    ));
                }
            }
        }
    }
}

/// Per-connection settings, applied to every new pooled connection.
#[derive(Debug, Clone, Copy)]
struct Session {
    backend: Backend,
    statement_timeout: Duration,
}

impl Session {
    fn prepare<'c>(
        self,
        conn: &'c mut AnyConnection,
        pooled: bool,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async move {
            match self.backend {
                Backend::Sqlite => {
                    // busy_timeout first, so what follows waits for a lock held briefly
                    // elsewhere. WAL is switched on once, at startup under the file lock;
                    // later connections find it set.
                    // cache_size: each connection keeps its own page cache, 2 MB by
                    // default, on top of the kernel's cache of the same file.
                    // temp_store: statement journals (a savepoint's undo pages) in memory;
                    // as temp files they were written page by page, five times the WAL's
                    // writes under the order load (strace).
                    sqlx::raw_sql(
                        "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL;
                         PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;
                         PRAGMA cache_size = -512; PRAGMA temp_store = MEMORY;",
                    )
                    .execute(&mut *conn)
                    .await?;
                }
                // Not the migrations' connection: they may legitimately run long.
                Backend::Postgres if pooled => {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(postgres_settings(
                        self.statement_timeout,
                    )))
                    .execute(&mut *conn)
                    .await?;
                }
                Backend::Postgres => {}
            }
            Ok(())
        })
    }
}

/// The settings of every pooled PostgreSQL session. Migrations may legitimately run long;
/// requests may not.
///
/// `enable_seqscan`: every statement the services run is keyed by an index, but a prepared
/// statement keeps the generic plan made at its sixth run, or again after each autovacuum.
/// The tables that churn (`checkouts`, the outboxes) are nearly empty then, so that plan
/// scanned the whole table, and they grow by dead rows until the next autovacuum, up to a
/// minute later: a group's claim took 2.5 ms instead of 0.09 once 30,000 checkouts had come
/// and gone. Off, a sequential scan is the last resort, still taken where no index applies.
fn postgres_settings(statement_timeout: Duration) -> String {
    let ms = statement_timeout.as_millis();
    format!("SET statement_timeout = {ms}; SET lock_timeout = {ms}; SET enable_seqscan = off")
}

/// Blocks until this process holds an exclusive lock on `path`, released when the
/// returned file is dropped (or the process dies).
async fn lock_exclusively(path: PathBuf) -> anyhow::Result<std::fs::File> {
    let file = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        file.lock()?;
        Ok(file)
    })
    .await??;
    Ok(file)
}

/// Applies the migrations on a dedicated connection, SQLite's under the caller's file
/// lock. The connection is closed afterwards, so a failed run cannot leave a session
/// lock behind in a pooled connection.
async fn migrate(
    conn: &mut AnyConnection,
    backend: Backend,
    migrations: &Migrations,
) -> anyhow::Result<()> {
    match backend {
        Backend::Postgres => {
            // Waits while another replica migrates; released with the session.
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATION_LOCK_KEY)
                .execute(&mut *conn)
                .await?;
            migrations.postgres.run(&mut *conn).await?;
        }
        Backend::Sqlite => migrations.sqlite.run(&mut *conn).await?,
    }
    Ok(())
}

/// Advisory lock id for "migrating this database" ("shop" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x73686f70;
/// A pooled connection idle this long is pinged before it is handed out (HikariCP skips
/// its check for connections used in the last 500 ms, to the same end).
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);
/// The typed PostgreSQL pool's size: it serves the grouped writes, one group of each kind
/// at a time, and a service has at most two kinds.
const TYPED_CONNECTIONS: u32 = 2;

/// A connection is pinged before use only if it sat idle: one used a moment ago is alive
/// as surely as a ping could say, and a ping per acquire was one more round trip per query
/// (to PostgreSQL, or to SQLite's worker thread).
fn pinged_if_idle<DB: sqlx::Database>(
    options: PoolOptions<DB>,
    acquire_timeout: Duration,
) -> PoolOptions<DB> {
    options
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// An open database: the pool every query goes through, and which backend it speaks.
#[derive(Clone)]
pub struct Database {
    pool: AnyPool,
    writer: AnyPool,
    /// PostgreSQL: a few connections of PostgreSQL's own driver, for statements that bind
    /// arrays, which `sqlx::Any` cannot.
    typed: Option<PgPool>,
    batches: Option<SqliteBatches>,
    backend: Backend,
    connect: Arc<Connect>,
    /// PostgreSQL: the one `LISTEN` session every [`Database::watch`] of this handle
    /// (and its clones) shares.
    listeners: Arc<Listeners>,
    /// The grouped writes' counts ([`Coalescer`]), for the service to register.
    write_groups: GroupMetrics,
}

/// How to open connections outside the pool (a listener, a change check). Holds the
/// password, so it is never printed.
struct Connect {
    url: String,
    options: AnyConnectOptions,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("backend", &self.backend)
            .field("url", &redact_url(&self.connect.url))
            .finish()
    }
}

impl Database {
    /// For reads, and for writes on PostgreSQL.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// For transactions that write: on SQLite a pool of one connection, so this
    /// process's writers queue instead of polling for the database's write lock; on
    /// PostgreSQL the same pool as [`Database::pool`].
    pub fn writer(&self) -> &AnyPool {
        &self.writer
    }

    /// PostgreSQL: a small pool of PostgreSQL's own driver, with the same session
    /// settings, for statements that take a group's rows as arrays, one a column
    /// (`unnest($1::text[], ...)`): PostgreSQL reads them in binary, where the same rows
    /// as JSON were parsed and unescaped character by character. `None` on SQLite.
    pub fn typed_postgres(&self) -> Option<&PgPool> {
        self.typed.as_ref()
    }

    /// PostgreSQL: an [`Announcer`] on `channel`, counted with this handle's grouped
    /// writes. `None` on SQLite, which has no notifications.
    pub fn announcer(&self, channel: &'static str) -> Option<Announcer> {
        self.typed
            .as_ref()
            .map(|typed| Announcer::postgres(typed.clone(), channel, &self.write_groups))
    }

    /// The counts of this handle's grouped writes (shared by its clones).
    pub fn write_groups(&self) -> &GroupMetrics {
        &self.write_groups
    }

    /// SQLite: runs a batch of write statements atomically on the writer, committed
    /// with whatever other batches are waiting ([`SqliteBatches::commit`]). Each
    /// statement runs only if the ones before it did not fail, but the batch commits
    /// whatever they did, so each must be guarded to change nothing when an earlier one
    /// did not apply (`WHERE changes() = 1`, the same condition repeated). PostgreSQL
    /// has data-modifying CTEs for the same job, and no batches.
    pub async fn committed_batch(
        &self,
        body: sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> Result<Vec<BatchRow>, sqlx::Error> {
        match &self.batches {
            Some(batches) => batches.commit(body).await,
            None => Err(sqlx::Error::Configuration(
                "committed batches are for SQLite; on PostgreSQL use one statement".into(),
            )),
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Readiness check: the pool hands out a connection that answers.
    pub async fn ping(&self) -> CheckResult {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub async fn close(&self) {
        if let Some(typed) = &self.typed {
            typed.close().await;
        }
        self.writer.close().await;
        self.pool.close().await
    }

    /// Reports changes that other connections (other replicas, an operator's `psql`) make
    /// to this database, so a service can keep an in-memory copy fresh:
    /// - PostgreSQL: the payloads of `NOTIFY` on `channel`, as they arrive, on the one
    ///   listening connection all watches of this handle share; and
    ///   [`WatchEvent::Resync`] on every (re)connection and every `resync_every`, since a
    ///   notification sent while the listener was away is lost. A watch on a new channel
    ///   reconnects the shared listener with it, so the others resync once too;
    /// - SQLite: [`WatchEvent::Resync`] when `PRAGMA data_version`, checked every
    ///   `resync_every`, shows a commit by any other connection.
    pub fn watch(&self, channel: &'static str, resync_every: Duration) -> Watch {
        // The first tick one period from now: the caller has just read what it keeps.
        let mut interval =
            tokio::time::interval_at(tokio::time::Instant::now() + resync_every, resync_every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let source = match self.backend {
            Backend::Postgres => {
                let (tx, rx) = tokio::sync::mpsc::channel(1024);
                Source::Postgres {
                    events: rx,
                    _subscription: self.listeners.subscribe(&self.connect.url, channel, tx),
                }
            }
            Backend::Sqlite => Source::Sqlite {
                options: self.connect.options.clone(),
                connection: None,
                seen: None,
            },
        };
        Watch { interval, source }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Notification payloads, in the order their transactions committed.
    Notified(Vec<String>),
    /// Changes may have happened unseen: read again what you keep.
    Resync,
}

/// See [`Database::watch`].
pub struct Watch {
    interval: tokio::time::Interval,
    source: Source,
}

enum Source {
    Postgres {
        events: tokio::sync::mpsc::Receiver<WatchEvent>,
        /// Ends the subscription when the watch is dropped.
        _subscription: Subscription,
    },
    Sqlite {
        options: AnyConnectOptions,
        connection: Option<AnyConnection>,
        seen: Option<i64>,
    },
}

impl Watch {
    /// The next change, waiting as long as it takes. Cancel-safe.
    pub async fn next(&mut self) -> WatchEvent {
        loop {
            match &mut self.source {
                Source::Postgres { events, .. } => {
                    tokio::select! {
                        biased;
                        Some(event) = events.recv() => return event,
                        _ = self.interval.tick() => return WatchEvent::Resync,
                    }
                }
                Source::Sqlite {
                    options,
                    connection,
                    seen,
                } => {
                    self.interval.tick().await;
                    match data_version(options, connection).await {
                        Ok(version) if *seen != Some(version) => {
                            *seen = Some(version);
                            return WatchEvent::Resync;
                        }
                        Ok(_) => {}
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot check the database for changes");
                            *connection = None;
                        }
                    }
                }
            }
        }
    }
}

/// SQLite's count of commits by other connections, on a connection kept for this alone
/// (the value is per connection).
async fn data_version(
    options: &AnyConnectOptions,
    connection: &mut Option<AnyConnection>,
) -> Result<i64, sqlx::Error> {
    if connection.is_none() {
        *connection = Some(AnyConnection::connect_with(options).await?);
    }
    let conn = connection.as_mut().expect("connected above");
    sqlx::query_scalar("PRAGMA data_version")
        .fetch_one(conn)
        .await
}

fn backend_of(url: &str) -> Option<Backend> {
    if url.starts_with("sqlite:") {
        Some(Backend::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Some(Backend::Postgres)
    } else {
        None
    }
}

/// The table whose unique constraint (or primary key) `err` broke, if that is what it
/// is, so a store can name the rule: PostgreSQL reports the table; SQLite only in its
/// message ("UNIQUE constraint failed: table.column").
pub fn unique_violation(err: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(db) = err else {
        return None;
    };
    if !db.is_unique_violation() {
        return None;
    }
    if let Some(table) = db.table() {
        return Some(table.to_owned());
    }
    let (_, column) = db.message().rsplit_once(": ")?;
    Some(column.split('.').next()?.to_owned())
}

/// Errors that mean "the database cannot be reached right now" rather than "this
/// request is wrong": I/O, pool exhaustion, and PostgreSQL's connection-exception and
/// shutdown codes (class 08, 57P01-57P03, too many connections). Callers answer 503.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// Hides credentials in a URL for error messages.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SQLite database in `dir` with no migrations, opened as a service opens its own.
    async fn open_sqlite(dir: &std::path::Path) -> Database {
        let none = Migrations {
            sqlite: Migrator::DEFAULT,
            postgres: Migrator::DEFAULT,
        };
        StorageConfig::in_dir(dir).open("t", &none).await.unwrap()
    }

    /// [`open_sqlite`] with one table, `keys (key TEXT PRIMARY KEY)`.
    async fn open_sqlite_with_keys(dir: &std::path::Path) -> Database {
        let db = open_sqlite(dir).await;
        sqlx::raw_sql("CREATE TABLE keys (key TEXT PRIMARY KEY)")
            .execute(db.writer())
            .await
            .unwrap();
        db
    }

    /// Every pooled SQLite connection gets the session settings, the small page cache
    /// included (each connection caches apart, 2 MB by default).
    #[tokio::test]
    async fn pooled_sqlite_connections_get_the_session_settings() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_sqlite(dir.path()).await;
        for pool in [db.pool(), &db.writer] {
            let mut conn = pool.acquire().await.unwrap();
            for (pragma, expected) in [
                ("cache_size", "-512"),
                ("journal_mode", "wal"),
                ("synchronous", "1"),
                ("foreign_keys", "1"),
                ("temp_store", "2"),
            ] {
                let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT CAST({pragma} AS TEXT) FROM pragma_{pragma}"
                )))
                .fetch_one(&mut *conn)
                .await
                .unwrap();
                assert_eq!(value, expected, "PRAGMA {pragma}");
            }
        }
    }

    /// Replicas sharing a new SQLite file all start: the first switches it to WAL, a
    /// change SQLite refuses at once (no busy_timeout) to a second connection upgrading
    /// its lock at the same moment, as CI once saw.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_opening_one_new_sqlite_file_at_once_all_start() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            // Each SQLite connection runs on a thread of its own, so joined futures race.
            let opening = (0..8).map(|_| open_sqlite(dir.path()));
            for db in futures_util::future::join_all(opening).await {
                db.close().await;
            }
        }
    }

    #[tokio::test]
    async fn a_unique_violation_names_its_table() {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::raw_sql("CREATE TABLE keys (key TEXT PRIMARY KEY); CREATE TABLE other (x TEXT)")
            .execute(&pool)
            .await
            .unwrap();
        let insert = || sqlx::query("INSERT INTO keys (key) VALUES ('k')").execute(&pool);
        insert().await.unwrap();
        let err = insert().await.unwrap_err();
        assert_eq!(unique_violation(&err).as_deref(), Some("keys"));
        let other = sqlx::query("INSERT INTO missing VALUES (1)")
            .execute(&pool)
            .await
            .unwrap_err();
        assert_eq!(unique_violation(&other), None);
    }

    /// The batch thread's own connection has the pool's session settings: its statement
    /// journals stay in memory.
    #[tokio::test]
    async fn the_batch_connection_gets_the_session_settings() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_sqlite(dir.path()).await;
        let rows = db
            .committed_batch(sqlx::query(
                "SELECT CAST(temp_store AS TEXT) AS v FROM pragma_temp_store;
                 SELECT CAST(cache_size AS TEXT) AS v FROM pragma_cache_size;
                 SELECT CAST(synchronous AS TEXT) AS v FROM pragma_synchronous;
                 SELECT CAST(foreign_keys AS TEXT) AS v FROM pragma_foreign_keys;",
            ))
            .await
            .unwrap();
        let values: Vec<String> = rows.iter().map(|r| r.get("v").unwrap()).collect();
        assert_eq!(values, ["2", "-512", "1", "1"]);
    }

    /// A batch that fails part-way leaves nothing behind: neither its earlier statements'
    /// writes nor an open transaction on the one writer connection, which the next batch
    /// and an ordinary transaction then use.
    #[tokio::test]
    async fn a_failed_committed_batch_is_rolled_back_and_the_writer_stays_usable() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_sqlite_with_keys(dir.path()).await;
        let batch = "INSERT INTO keys (key) VALUES ($1) RETURNING key;
            INSERT INTO keys (key) VALUES ($2) RETURNING key;";
        let run = |a: &'static str, b: &'static str| {
            db.committed_batch(sqlx::query(batch).bind(a).bind(b))
        };
        let count =
            || sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM keys").fetch_one(db.pool());

        assert_eq!(
            run("a", "b").await.unwrap().len(),
            2,
            "a row from each statement"
        );
        // The second insert breaks the key after the first one wrote.
        let Err(err) = run("c", "a").await else {
            panic!("a duplicate key was stored");
        };
        assert_eq!(unique_violation(&err).as_deref(), Some("keys"));
        assert_eq!(
            count().await.unwrap(),
            2,
            "the first insert was rolled back"
        );
        // A failure on the first statement, with the transaction begun and nothing written.
        assert!(run("a", "d").await.is_err());
        assert_eq!(run("c", "d").await.unwrap().len(), 2);
        let mut tx = db.writer().begin().await.unwrap();
        sqlx::query("INSERT INTO keys (key) VALUES ('e')")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(count().await.unwrap(), 5);
    }

    /// A caller that goes away mid-batch (a request cancelled because its client hung up)
    /// does not leave the batch half-run with its transaction open on the one writer
    /// connection: the batch commits, and so does the next write.
    #[tokio::test]
    async fn a_committed_batch_whose_caller_went_away_still_commits() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_sqlite_with_keys(dir.path()).await;
        let slow = "
            WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 100000)
            INSERT INTO keys SELECT 'k' || x FROM n;
            INSERT INTO keys (key) VALUES ($1);";
        // Polled once, then dropped.
        let batch = db.committed_batch(sqlx::query(slow).bind("last"));
        assert!(
            tokio::time::timeout(Duration::ZERO, batch).await.is_err(),
            "the batch was still running when its caller went away"
        );
        sqlx::query("INSERT INTO keys (key) VALUES ('after')")
            .execute(db.writer())
            .await
            .unwrap();
        // The write above may have had the writer's turn before the batch thread took
        // it for the abandoned batch; either way that batch commits, seen from another
        // connection.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let committed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM keys")
                .fetch_one(db.pool())
                .await
                .unwrap();
            if committed == 100_002 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{committed} rows committed, not the abandoned batch's 100,001 and 'after'"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Batches waiting together share a transaction, but each is atomic on its own: one
    /// that fails leaves its own writes out and every other batch of its group in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_batch_takes_nothing_from_the_others_committed_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_sqlite_with_keys(dir.path()).await;
        sqlx::query("INSERT INTO keys (key) VALUES ('taken')")
            .execute(db.writer())
            .await
            .unwrap();
        let batch = "INSERT INTO keys (key) VALUES ($1) RETURNING key;
            INSERT INTO keys (key) VALUES ($2) RETURNING key;";
        // Sent at once, so most wait while the first group commits and then go as one.
        let runs = (0..60).map(|i| {
            let second = if i % 7 == 3 {
                "taken".to_owned()
            } else {
                format!("{i}b")
            };
            db.committed_batch(sqlx::query(batch).bind(format!("{i}a")).bind(second))
        });
        let outcomes = futures_util::future::join_all(runs).await;
        for (i, outcome) in outcomes.iter().enumerate() {
            match outcome {
                Ok(rows) => assert!(i % 7 != 3 && rows.len() == 2, "batch {i}"),
                Err(err) => {
                    assert_eq!(i % 7, 3, "batch {i}: {err}");
                    assert_eq!(unique_violation(err).as_deref(), Some("keys"));
                }
            }
        }
        let stored: Vec<String> = sqlx::query_scalar("SELECT key FROM keys ORDER BY key")
            .fetch_all(db.pool())
            .await
            .unwrap();
        let mut expected: Vec<String> = (0..60)
            .filter(|i| i % 7 != 3)
            .flat_map(|i| [format!("{i}a"), format!("{i}b")])
            .chain(["taken".to_owned()])
            .collect();
        expected.sort();
        assert_eq!(stored, expected);
    }

    /// A deferred foreign key is checked when the group commits; a batch that breaks one
    /// fails that commit, and then fails alone while the rest of its group is stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_breaking_a_deferred_foreign_key_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_sqlite(dir.path()).await;
        sqlx::raw_sql(
            "CREATE TABLE parents (id TEXT PRIMARY KEY);
             CREATE TABLE children (
                 parent TEXT NOT NULL REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)",
        )
        .execute(db.writer())
        .await
        .unwrap();
        let batch = "INSERT OR FAIL INTO parents (id) VALUES ($1);
            INSERT OR FAIL INTO children (parent) VALUES ($2);";
        let orphan = |i: usize| i % 5 == 2;
        let runs = (0..40).map(|i| {
            let parent = if orphan(i) {
                format!("nobody {i}")
            } else {
                format!("p{i}")
            };
            db.committed_batch(sqlx::query(batch).bind(format!("p{i}")).bind(parent))
        });
        let outcomes = futures_util::future::join_all(runs).await;
        for (i, outcome) in outcomes.iter().enumerate() {
            match outcome {
                Ok(_) => assert!(!orphan(i), "batch {i} stored an orphan"),
                Err(err) => {
                    assert!(orphan(i), "batch {i}: {err}");
                    let kind = err.as_database_error().map(|e| e.kind());
                    assert!(
                        matches!(kind, Some(sqlx::error::ErrorKind::ForeignKeyViolation)),
                        "batch {i}: {err}"
                    );
                }
            }
        }
        let parents: Vec<String> = sqlx::query_scalar("SELECT id FROM parents ORDER BY id")
            .fetch_all(db.pool())
            .await
            .unwrap();
        let children: Vec<String> =
            sqlx::query_scalar("SELECT parent FROM children ORDER BY parent")
                .fetch_all(db.pool())
                .await
                .unwrap();
        let mut expected: Vec<String> = (0..40)
            .filter(|i| !orphan(*i))
            .map(|i| format!("p{i}"))
            .collect();
        expected.sort();
        assert_eq!(
            parents, expected,
            "an orphan's parent insert was rolled back with it"
        );
        assert_eq!(children, expected);
    }

    #[test]
    fn rejects_unknown_scheme_without_leaking_password() {
        let env = Env::from_pairs([("DATABASE_URL", "mysql://root:hunter2@db/shop")]);
        let err = StorageConfig::from_env(&env).unwrap_err();
        assert_eq!(err.var, "DATABASE_URL");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn the_url_scheme_picks_the_backend() {
        for (url, backend) in [
            ("postgres://shop:pw@db:5432/product", Backend::Postgres),
            ("postgresql://db/order", Backend::Postgres),
            ("sqlite://data/product.db", Backend::Sqlite),
        ] {
            let env = Env::from_pairs([("DATABASE_URL", url)]);
            assert_eq!(
                StorageConfig::from_env(&env).unwrap().backend(),
                backend,
                "{url}"
            );
        }
        let default = StorageConfig::from_env(&Env::from_pairs::<&str, &str>([])).unwrap();
        assert_eq!(default.backend(), Backend::Sqlite);
        let env = Env::from_pairs([("DATABASE_URL", "postgres://u:hunter2@db:notaport/x")]);
        let err = StorageConfig::from_env(&env).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
