//! `Database::watch` against a real PostgreSQL server.

use std::time::{Duration, Instant};

use shop_platform::testing::{TestDatabase, postgres_admin_url};
use shop_platform::{Backend, Database, Watch, WatchEvent};
use sqlx::Connection;

const NEVER: Duration = Duration::from_secs(3600);

/// The payloads of the next notification `watch` reports, skipping resyncs.
async fn next_notified(watch: &mut Watch) -> Vec<String> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let WatchEvent::Notified(payloads) = watch.next().await {
                return payloads;
            }
        }
    })
    .await
    .expect("no notification within 10 s")
}

/// The next event is a resync.
async fn resyncs(watch: &mut Watch) {
    let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("no resync within 10 s");
    assert_eq!(event, WatchEvent::Resync);
}

/// The `LISTEN` sessions open on `database`, each as the statement it last ran.
async fn listening(admin: &mut sqlx::PgConnection, database: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity
         WHERE datname = $1 AND query LIKE 'LISTEN%' ORDER BY pid",
    )
    .bind(database)
    .fetch_all(admin)
    .await
    .unwrap()
}

/// Waits until `database` has `sessions` listening sessions; returns what they ran.
async fn until_listening(
    admin: &mut sqlx::PgConnection,
    database: &str,
    sessions: usize,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = listening(admin, database).await;
        if now.len() == sessions {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{} listening sessions, expected {sessions}: {now:?}",
            now.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn notify(db: &Database, sql: &'static str) {
    sqlx::query(sql).execute(db.pool()).await.unwrap();
}

/// PostgreSQL wakes every listening session of a database on each `NOTIFY`, whatever
/// the channel, so the watches of one handle share one session; each still hears only
/// its own channel, both resync when that session is cut, and the last to go closes it.
#[tokio::test]
async fn watches_of_one_database_share_one_listening_session() {
    let Some(admin) = postgres_admin_url("watches_of_one_database_share_one_listening_session")
    else {
        return;
    };
    let test_db = TestDatabase::new(Backend::Postgres).await;
    let db = test_db.open_bare().await;
    let name = test_db.postgres_name().expect("a PostgreSQL database");
    let mut admin = sqlx::PgConnection::connect(&admin).await.unwrap();

    let mut alpha = db.watch("alpha", NEVER);
    let mut beta = db.clone().watch("beta", NEVER);
    resyncs(&mut beta).await;
    let sessions = until_listening(&mut admin, name, 1).await;
    assert!(
        sessions[0].contains("\"alpha\"") && sessions[0].contains("\"beta\""),
        "one session on both channels: {sessions:?}"
    );

    notify(
        &db,
        "SELECT pg_notify('alpha', 'a1'), pg_notify('beta', 'b1')",
    )
    .await;
    notify(&db, "SELECT pg_notify('beta', 'b2')").await;
    assert_eq!(next_notified(&mut alpha).await, ["a1"]);
    let mut heard = next_notified(&mut beta).await;
    if heard.len() == 1 {
        heard.extend(next_notified(&mut beta).await);
    }
    assert_eq!(heard, ["b1", "b2"]);

    // Cut the session: both resync once it is back, then hear their channels again.
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND query LIKE 'LISTEN%'",
    )
    .bind(name)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(cut, [true]);
    for watch in [&mut alpha, &mut beta] {
        // Whatever was queued before the cut, a resync follows it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::time::timeout_at(deadline.into(), watch.next())
            .await
            .expect("no resync within 10 s of the cut")
            != WatchEvent::Resync
        {}
    }
    until_listening(&mut admin, name, 1).await;
    notify(
        &db,
        "SELECT pg_notify('beta', 'b3'), pg_notify('alpha', 'a2')",
    )
    .await;
    assert_eq!(next_notified(&mut alpha).await, ["a2"]);
    assert_eq!(next_notified(&mut beta).await, ["b3"]);

    // One watch gone: the other keeps the session; both gone: it closes.
    drop(alpha);
    notify(
        &db,
        "SELECT pg_notify('alpha', 'a3'), pg_notify('beta', 'b4')",
    )
    .await;
    assert_eq!(next_notified(&mut beta).await, ["b4"]);
    until_listening(&mut admin, name, 1).await;
    drop(beta);
    until_listening(&mut admin, name, 0).await;
}
