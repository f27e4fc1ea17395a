//! SQLite's write batches, committed in groups by a thread of their own.
//!
//! SQLite lets one connection write at a time, so every write of a process queues for
//! the one writer connection. Measured under the order load, the queue, not the SQL, set
//! the pace: the writer was held about twice as long as its statements ran, because each
//! holder was a task that had to be scheduled again (behind every other ready task on a
//! busy runtime) to see its reply and hand the connection on. Here a thread with a
//! single-task runtime owns the writer's turn: it takes every batch waiting, runs them
//! back to back in one transaction, each inside a savepoint of its own, commits once, and
//! only then answers their callers. Nothing else runs on that thread, so no batch waits
//! behind unrelated work, and one commit (one WAL append of the pages they share) serves
//! the whole group.

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::{Any, AnyPool, Execute};
use tokio::sync::{mpsc, oneshot};

/// At most this many batches share a commit, so a caller waits for a bounded group.
const MAX_GROUP: usize = 64;

type Reply = oneshot::Sender<Result<Vec<AnyRow>, sqlx::Error>>;

struct Job {
    body: sqlx::SqlStr,
    arguments: Option<AnyArguments>,
    reply: Reply,
}

/// A handle on the batch thread of one SQLite database; clones share it. The thread
/// ends when the last handle is dropped.
#[derive(Clone)]
pub struct SqliteBatches {
    jobs: mpsc::UnboundedSender<Job>,
}

impl SqliteBatches {
    /// Starts the batch thread over `writer`, the one-connection pool that every write of
    /// this process uses; writes outside batches still take their turn on it.
    pub(crate) fn start(writer: AnyPool) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        std::thread::Builder::new()
            .name("sqlite-batches".into())
            .spawn(move || runtime.block_on(run(writer, queue)))?;
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
    ) -> Result<Vec<AnyRow>, sqlx::Error> {
        let arguments = body.take_arguments().map_err(sqlx::Error::Encode)?;
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                body: body.sql(),
                arguments,
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

fn gone() -> sqlx::Error {
    sqlx::Error::Protocol("the SQLite batch thread has stopped".into())
}

async fn run(writer: AnyPool, mut queue: mpsc::UnboundedReceiver<Job>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
        commit_group(&writer, std::mem::take(&mut group)).await;
    }
}

/// One transaction for the whole group. A batch that fails is rolled back to its
/// savepoint and answered with its error; the group's outcome is sent only after the
/// commit, so no caller hears "stored" before it is.
async fn commit_group(writer: &AnyPool, group: Vec<Job>) {
    let mut connection = match writer.acquire().await {
        Ok(connection) => connection,
        Err(err) => return fail_all(group, &err),
    };
    if let Err(err) = sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut *connection)
        .await
    {
        return fail_all(group, &err);
    }
    let mut outcomes = Vec::with_capacity(group.len());
    let mut jobs = group.into_iter();
    while let Some(job) = jobs.next() {
        let body = job.body.as_str().trim_end().trim_end_matches(';');
        // The same text for the same body, so sqlx's statement cache still serves it.
        let sql = format!("SAVEPOINT batch; {body}; RELEASE batch;");
        let query = match job.arguments {
            Some(arguments) => sqlx::query_with(sqlx::AssertSqlSafe(sql), arguments),
            None => sqlx::query_with(sqlx::AssertSqlSafe(sql), AnyArguments::default()),
        };
        match query.fetch_all(&mut *connection).await {
            Ok(rows) => outcomes.push((job.reply, Ok(rows))),
            Err(err) => {
                let undone = sqlx::raw_sql("ROLLBACK TO batch; RELEASE batch")
                    .execute(&mut *connection)
                    .await;
                if let Err(undo) = undone {
                    // The transaction itself is gone (SQLite rolls back on some I/O
                    // errors): nothing of the group is stored.
                    tracing::warn!(error = %err, undo = %undo, "a write batch's group was lost");
                    abandon(&mut connection).await;
                    let replies = outcomes.into_iter().map(|(reply, _)| reply);
                    let replies = replies.chain([job.reply]).chain(jobs.map(|job| job.reply));
                    return fail_replies(replies.collect(), &err);
                }
                outcomes.push((job.reply, Err(err)));
            }
        }
    }
    if let Err(err) = sqlx::raw_sql("COMMIT").execute(&mut *connection).await {
        abandon(&mut connection).await;
        let replies = outcomes.into_iter().map(|(reply, _)| reply).collect();
        return fail_replies(replies, &err);
    }
    drop(connection);
    for (reply, outcome) in outcomes {
        // A caller that went away no longer listens; its batch is stored all the same.
        let _ = reply.send(outcome);
    }
}

/// Rolls back what is left of the transaction; a connection that cannot is closed
/// rather than handed to the next writer with a transaction open.
async fn abandon(connection: &mut sqlx::pool::PoolConnection<Any>) {
    if sqlx::raw_sql("ROLLBACK")
        .execute(&mut **connection)
        .await
        .is_err()
    {
        connection.close_on_drop();
    }
}

fn fail_all(group: Vec<Job>, err: &sqlx::Error) {
    fail_replies(group.into_iter().map(|job| job.reply).collect(), err);
}

fn fail_replies(replies: Vec<Reply>, err: &sqlx::Error) {
    for reply in replies {
        let _ = reply.send(Err(shared(err)));
    }
}

/// The group's one error, for each of its callers (`sqlx::Error` is not `Clone`).
fn shared(err: &sqlx::Error) -> sqlx::Error {
    match err {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        other => sqlx::Error::Protocol(format!("the batch's group was not committed: {other}")),
    }
}
