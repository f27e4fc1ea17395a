//! The database pool against a real PostgreSQL server.

use std::time::Duration;

use shop_platform::Backend;
use shop_platform::testing::{TestDatabase, postgres_admin_url};
use sqlx::Connection;

/// Connections are not pinged on every acquire, only after sitting idle: one the server
/// dropped while it sat idle (a restart, a failover, an idle timeout) is found dead by
/// that ping and replaced, and the query never sees it.
#[tokio::test]
async fn a_connection_the_server_dropped_while_idle_is_replaced_unseen() {
    let Some(admin) = postgres_admin_url("a_connection_the_server_dropped_while_idle") else {
        return;
    };
    let test_db = TestDatabase::new(Backend::Postgres).await;
    let db = test_db.open_bare().await;
    let name = test_db.postgres_name().expect("a PostgreSQL database");
    // One query, so the pool keeps a connection.
    sqlx::query("SELECT 1").execute(db.pool()).await.unwrap();

    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    let dropped: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(name)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(!dropped.is_empty(), "the pool kept no connection to drop");

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(db.pool())
        .await
        .expect("the dropped connection was handed out");
    assert_eq!(one, 1);
}
