//! SQLite's write batches, committed in groups by a thread of their own.
//!
//! SQLite lets one connection write at a time, so every write of a process queues for
//! the one writer. Measured under the order load, the queue, not the SQL, set the pace:
//! the writer was held about twice as long as its statements ran, because each holder
//! was a task that had to be scheduled again (behind every other ready task on a busy
//! runtime) to see its reply and hand the connection on. Here a thread owns the writer's
//! turn: it takes every batch waiting, runs them back to back in one transaction, commits
//! once, and only then answers their callers. Each batch is still atomic on its own: a
//! group in which one fails is run again one batch a transaction.
//!
//! The thread runs SQLite itself, on a connection of its own (rusqlite), where sqlx
//! would hand each statement to a connection thread and wait for the answer: two
//! thread wake-ups per statement, which profiles of the order load put at a third of
//! the services' CPU. While it writes it holds the sqlx writer pool's one connection,
//! so the writes that still go through sqlx (interactive transactions) take turns with
//! the batches instead of polling for SQLite's lock.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use rusqlite::types::{FromSql, Value, ValueRef};
use rusqlite::{Connection, OpenFlags};
use sqlx::any::AnyArguments;
use sqlx::{Any, AnyPool, Execute};
use tokio::sync::{mpsc, oneshot};

/// At most this many batches share a commit, so a caller waits for a bounded group.
const MAX_GROUP: usize = 64;

/// Distinct statements kept prepared (a batch's text varies with its line count).
const PREPARED_STATEMENTS: usize = 128;

type Reply = oneshot::Sender<Result<Vec<BatchRow>, sqlx::Error>>;

struct Job {
    body: sqlx::SqlStr,
    values: Vec<Value>,
    reply: Reply,
}

/// One row a batch's statements returned, its values by column name.
#[derive(Debug, Clone)]
pub struct BatchRow {
    columns: Arc<[String]>,
    values: Vec<Value>,
}

impl BatchRow {
    /// The value of `column`, converted as rusqlite converts (an `INTEGER` to `i64`,
    /// `TEXT` to `String`, `NULL` to `None`).
    pub fn get<T: FromSql>(&self, column: &str) -> Result<T, sqlx::Error> {
        let index = self
            .columns
            .iter()
            .position(|name| name == column)
            .ok_or_else(|| sqlx::Error::ColumnNotFound(column.to_owned()))?;
        T::column_result(ValueRef::from(&self.values[index])).map_err(|err| {
            sqlx::Error::ColumnDecode {
                index: column.to_owned(),
                source: Box::new(err),
            }
        })
    }
}

/// A row of either path, sqlx's query or a committed batch, for a store that reads the
/// same columns from both.
pub trait RowColumns {
    fn column<T: ColumnValue>(&self, name: &str) -> Result<T, sqlx::Error>;
}

/// A Rust type every path decodes (`i64`, `String`, `Option` of them, ...).
pub trait ColumnValue:
    for<'r> sqlx::Decode<'r, Any>
    + sqlx::Type<Any>
    + for<'r> sqlx::Decode<'r, sqlx::Postgres>
    + sqlx::Type<sqlx::Postgres>
    + FromSql
{
}

impl<T> ColumnValue for T where
    T: for<'r> sqlx::Decode<'r, Any>
        + sqlx::Type<Any>
        + for<'r> sqlx::Decode<'r, sqlx::Postgres>
        + sqlx::Type<sqlx::Postgres>
        + FromSql
{
}

impl RowColumns for sqlx::any::AnyRow {
    fn column<T: ColumnValue>(&self, name: &str) -> Result<T, sqlx::Error> {
        sqlx::Row::try_get(self, name)
    }
}

/// A row of [`crate::Database::typed_postgres`].
impl RowColumns for sqlx::postgres::PgRow {
    fn column<T: ColumnValue>(&self, name: &str) -> Result<T, sqlx::Error> {
        sqlx::Row::try_get(self, name)
    }
}

impl RowColumns for BatchRow {
    fn column<T: ColumnValue>(&self, name: &str) -> Result<T, sqlx::Error> {
        self.get(name)
    }
}

/// Where the batch thread opens its connection: the file the pool uses.
#[derive(Debug, Clone)]
pub(crate) struct SqliteFile {
    pub(crate) path: PathBuf,
    pub(crate) in_memory: bool,
}

impl SqliteFile {
    fn open(&self) -> rusqlite::Result<Connection> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if self.in_memory {
            // sqlx names its shared in-memory databases as URIs.
            flags |= OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_MEMORY
                | OpenFlags::SQLITE_OPEN_SHARED_CACHE;
        }
        let connection = Connection::open_with_flags(&self.path, flags)?;
        // The pool's session settings (db.rs); WAL is on the file already.
        connection.execute_batch(
            "PRAGMA busy_timeout = 5000; PRAGMA synchronous = NORMAL;
             PRAGMA foreign_keys = ON; PRAGMA cache_size = -512;
             PRAGMA temp_store = MEMORY;",
        )?;
        connection.set_prepared_statement_cache_capacity(PREPARED_STATEMENTS);
        Ok(connection)
    }
}

/// A handle on the batch thread of one SQLite database; clones share it. The thread
/// ends when the last handle is dropped.
///
/// Writing statements for it (each measured with callgrind on the order path, sessions
/// 24 and 25 in docs/BENCHMARKS.md):
/// - a write that a constraint could abort says `OR FAIL` (or settles the conflict
///   itself, `ON CONFLICT`). For `ABORT`, SQLite copies every page a multi-row-capable
///   statement (`INSERT ... SELECT`, anything with `RETURNING`) changes to a statement
///   journal, in case a later row fails after an earlier one was written. Here a batch
///   that fails is undone whole (its group is rolled back and each batch run again
///   alone), so the rows a failed statement wrote never stay, and the error is the same.
/// - a foreign key that batches write under is `DEFERRABLE INITIALLY DEFERRED`: one
///   checked at once needs the statement journal whatever the conflict clause. Deferred,
///   SQLite checks it at the commit; a violation fails the group's commit, and then the
///   batch that made it, alone.
/// - no `changes()` inside an `INSERT ... SELECT`: it keeps the journal on anyway. Guard
///   by a look-up instead.
/// - no `RETURNING`: it costs a temporary table per statement. Read `changes()` with a
///   `SELECT` after the statement (a `SELECT` leaves it as it was).
#[derive(Clone)]
pub struct SqliteBatches {
    jobs: mpsc::UnboundedSender<Job>,
}

impl SqliteBatches {
    /// Opens the batch thread's connection to `file` and starts the thread. `writer` is
    /// the one-connection pool every other write of this process uses: a group is
    /// written while holding it.
    pub(crate) fn start(file: SqliteFile, writer: AnyPool) -> anyhow::Result<Self> {
        let connection = file.open()?;
        let (jobs, queue) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let thread = BatchThread {
            file,
            connection,
            statements: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("sqlite-batches".into())
            .spawn(move || runtime.block_on(thread.run(writer, queue)))?;
        Ok(Self { jobs })
    }

    /// Runs `body`, statements written without `BEGIN` or `COMMIT`, atomically, and
    /// returns the rows its statements gave, once committed. If one of its statements
    /// fails, none of its writes stays (the others of its group are not affected) and the
    /// error is returned.
    ///
    /// The batch runs to its end whatever happens to the caller: a caller that goes away
    /// (a request cancelled when its client hung up) cannot cut it short and leave a
    /// transaction open. Statements in a batch are parameterised with `$1`.. numbered
    /// across the whole batch.
    pub async fn commit(
        &self,
        mut body: sqlx::query::Query<'static, Any, AnyArguments>,
    ) -> Result<Vec<BatchRow>, sqlx::Error> {
        let values = match body.take_arguments().map_err(sqlx::Error::Encode)? {
            Some(arguments) => values_of(arguments)?,
            None => Vec::new(),
        };
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                body: body.sql(),
                values,
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// The values bound to a query, as SQLite stores them. sqlx keeps them in a field it
/// exempts from semver (its own drivers read it the same way); `Cargo.lock` pins the
/// version, and the test below covers every kind the stores bind.
fn values_of(arguments: AnyArguments) -> Result<Vec<Value>, sqlx::Error> {
    use sqlx_core::any::AnyValueKind as Kind;
    arguments
        .values
        .0
        .into_iter()
        .map(|value| {
            Ok(match value {
                Kind::Null(_) => Value::Null,
                Kind::Bool(b) => Value::Integer(b.into()),
                Kind::SmallInt(n) => Value::Integer(n.into()),
                Kind::Integer(n) => Value::Integer(n.into()),
                Kind::BigInt(n) => Value::Integer(n),
                Kind::Real(x) => Value::Real(x.into()),
                Kind::Double(x) => Value::Real(x),
                Kind::Text(text) => Value::Text(Arc::unwrap_or_clone(text)),
                Kind::TextSlice(text) => Value::Text(text.to_string()),
                Kind::Blob(blob) => Value::Blob(Arc::unwrap_or_clone(blob)),
                other => {
                    return Err(sqlx::Error::Encode(
                        format!("a batch cannot bind {other:?}").into(),
                    ));
                }
            })
        })
        .collect()
}

fn gone() -> sqlx::Error {
    sqlx::Error::Protocol("the SQLite batch thread has stopped".into())
}

struct BatchThread {
    file: SqliteFile,
    connection: Connection,
    /// Each batch body split into its statements, once per distinct text.
    statements: HashMap<Box<str>, Arc<[String]>>,
}

impl BatchThread {
    async fn run(mut self, writer: AnyPool, mut queue: mpsc::UnboundedReceiver<Job>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
            let group = std::mem::take(&mut group);
            // The writer's turn; its connection is not used, only held.
            match writer.acquire().await {
                Ok(_turn) => self.commit_group(group),
                Err(err) => fail_replies(group.into_iter().map(|job| job.reply), &err),
            }
        }
    }

    /// One transaction for the whole group; the group's outcome is sent only after the
    /// commit, so no caller hears "stored" before it is.
    ///
    /// A batch must be atomic on its own, which a savepoint around each batch would give:
    /// but SQLite then copies every page a batch changes to its sub-journal first, whether
    /// or not anything fails (a tenth of the order service's instructions, callgrind). So
    /// a group runs without them. Failures are rare (a key taken in a race), and one, in a
    /// batch or in the commit (a deferred foreign key), rolls the whole group back to run
    /// again one batch a transaction, [`Self::commit_each`].
    fn commit_group(&mut self, group: Vec<Job>) {
        if let Err(err) = self.control("BEGIN IMMEDIATE") {
            return fail_replies(group.into_iter().map(|job| job.reply), &error(err));
        }
        let mut outcomes = Vec::with_capacity(group.len());
        for job in &group {
            match self.run_batch(job) {
                Ok(rows) => outcomes.push(rows),
                Err(_) => break,
            }
        }
        if outcomes.len() < group.len() || self.control("COMMIT").is_err() {
            self.roll_back();
            return self.commit_each(group);
        }
        for (job, rows) in group.into_iter().zip(outcomes) {
            // A caller that went away no longer listens; its batch is stored all the same.
            let _ = job.reply.send(Ok(rows));
        }
    }

    /// [`Self::commit_group`] with each batch in a transaction of its own: a batch that
    /// fails, or whose commit fails, is rolled back and answered with its error, and the
    /// others commit. (With `synchronous = NORMAL` a WAL commit does not wait for the
    /// disk, so the extra commits cost little on this rare path.)
    fn commit_each(&mut self, group: Vec<Job>) {
        for job in group {
            let outcome = self.control("BEGIN IMMEDIATE").and_then(|()| {
                let rows = self.run_batch(&job)?;
                self.control("COMMIT")?;
                Ok(rows)
            });
            if outcome.is_err() {
                self.roll_back();
            }
            let _ = job.reply.send(outcome.map_err(error));
        }
    }

    /// Ends the transaction left open by a failure, if any.
    fn roll_back(&mut self) {
        if self.control("ROLLBACK").is_err() && !self.connection.is_autocommit() {
            self.abandon();
        }
    }

    /// A transaction statement, prepared once rather than parsed per batch.
    fn control(&self, sql: &str) -> rusqlite::Result<()> {
        self.connection.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    /// Runs each statement of `job` with the values its `$n` parameters name.
    fn run_batch(&mut self, job: &Job) -> rusqlite::Result<Vec<BatchRow>> {
        let statements = match self.statements.get(job.body.as_str()) {
            Some(statements) => statements.clone(),
            None => {
                if self.statements.len() >= PREPARED_STATEMENTS {
                    self.statements.clear();
                }
                let split: Arc<[String]> = split_statements(job.body.as_str()).into();
                self.statements
                    .insert(job.body.as_str().into(), split.clone());
                split
            }
        };
        let mut rows = Vec::new();
        for sql in statements.iter() {
            let mut statement = self.connection.prepare_cached(sql)?;
            for index in 1..=statement.parameter_count() {
                let value = statement
                    .parameter_name(index)
                    .and_then(|name| name.strip_prefix('$'))
                    .and_then(|number| number.parse::<usize>().ok())
                    .and_then(|number| job.values.get(number.checked_sub(1)?))
                    .ok_or_else(|| {
                        rusqlite::Error::InvalidParameterName(format!(
                            "parameter {index} of {sql:?} names no bound value"
                        ))
                    })?;
                statement.raw_bind_parameter(index, value)?;
            }
            let width = statement.column_count();
            let columns: Arc<[String]> = if width == 0 {
                Arc::from([])
            } else {
                statement
                    .column_names()
                    .into_iter()
                    .map(str::to_owned)
                    .collect()
            };
            let mut results = statement.raw_query();
            while let Some(row) = results.next()? {
                let values = (0..width)
                    .map(|i| row.get::<_, Value>(i))
                    .collect::<rusqlite::Result<_>>()?;
                rows.push(BatchRow {
                    columns: columns.clone(),
                    values,
                });
            }
        }
        Ok(rows)
    }

    /// Rolls back what is left of the transaction; a connection that cannot is replaced
    /// rather than left with a transaction open for the next group.
    fn abandon(&mut self) {
        let _ = self.connection.execute_batch("ROLLBACK");
        if self.connection.is_autocommit() {
            return;
        }
        match self.file.open() {
            Ok(connection) => {
                self.connection = connection;
                self.statements.clear();
            }
            Err(err) => tracing::error!(error = %err, "cannot reopen the SQLite batch connection"),
        }
    }
}

/// Splits SQL text into its statements at the semicolons outside quotes and comments.
fn split_statements(sql: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut start = 0;
    let mut chars = sql.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            // A doubled quote inside is an escaped one: the scan just re-enters.
            '\'' | '"' | '`' => _ = chars.by_ref().find(|(_, inner)| *inner == c),
            '[' => _ = chars.by_ref().find(|(_, inner)| *inner == ']'),
            '-' if chars.peek().is_some_and(|(_, next)| *next == '-') => {
                _ = chars.by_ref().find(|(_, inner)| *inner == '\n')
            }
            '/' if chars.peek().is_some_and(|(_, next)| *next == '*') => {
                chars.next();
                let mut star = false;
                for (_, inner) in chars.by_ref() {
                    if star && inner == '/' {
                        break;
                    }
                    star = inner == '*';
                }
            }
            ';' => {
                statements.push(sql[start..at].to_owned());
                start = at + 1;
            }
            _ => {}
        }
    }
    statements.push(sql[start..].to_owned());
    statements.retain(|statement| !statement.trim().is_empty());
    statements
}

fn fail_replies(replies: impl IntoIterator<Item = Reply>, err: &(impl std::fmt::Display + ?Sized)) {
    for reply in replies {
        let _ = reply.send(Err(sqlx::Error::Protocol(format!(
            "the batch's group was not committed: {err}"
        ))));
    }
}

/// rusqlite's error as sqlx's, so stores read SQLite's refusals (a unique key taken)
/// the same way whichever path wrote.
fn error(err: rusqlite::Error) -> sqlx::Error {
    match err {
        rusqlite::Error::SqliteFailure(failure, message) => {
            sqlx::Error::Database(Box::new(SqliteFailure {
                message: message.unwrap_or_else(|| failure.to_string()),
                failure,
            }))
        }
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..) => sqlx::Error::Decode(Box::new(err)),
        other => sqlx::Error::Protocol(format!("SQLite batch: {other}")),
    }
}

#[derive(Debug)]
struct SqliteFailure {
    failure: rusqlite::ffi::Error,
    message: String,
}

impl std::fmt::Display for SqliteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.failure.extended_code, self.message)
    }
}

impl std::error::Error for SqliteFailure {}

impl sqlx::error::DatabaseError for SqliteFailure {
    fn message(&self) -> &str {
        &self.message
    }

    /// SQLite's extended result code, as sqlx's SQLite driver gives it.
    fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(self.failure.extended_code.to_string().into())
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        use rusqlite::ffi;
        use sqlx::error::ErrorKind;
        match self.failure.extended_code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_at_semicolons_outside_quotes_and_comments() {
        let sql = "INSERT INTO t VALUES ('a;b', \"c;\"\"d\"); -- one; two\n\
                   SELECT [x;y] FROM t /* ; */ WHERE a = 'it''s;';\n  ;  ";
        assert_eq!(
            split_statements(sql),
            [
                "INSERT INTO t VALUES ('a;b', \"c;\"\"d\")",
                " -- one; two\nSELECT [x;y] FROM t /* ; */ WHERE a = 'it''s;'",
            ]
        );
    }

    /// Every kind the stores bind reaches SQLite as the value it is.
    #[test]
    fn bound_values_reach_sqlite_as_they_are() {
        let query = sqlx::query::<Any>("")
            .bind(7_i64)
            .bind(3_i32)
            .bind(true)
            .bind("text")
            .bind(String::from("owned"))
            .bind(None::<String>)
            .bind(1.5_f64)
            .bind(vec![1_u8, 2]);
        let mut query = query;
        let values = values_of(query.take_arguments().unwrap().unwrap()).unwrap();
        assert_eq!(
            values,
            [
                Value::Integer(7),
                Value::Integer(3),
                Value::Integer(1),
                Value::Text("text".into()),
                Value::Text("owned".into()),
                Value::Null,
                Value::Real(1.5),
                Value::Blob(vec![1, 2]),
            ]
        );
    }
}
