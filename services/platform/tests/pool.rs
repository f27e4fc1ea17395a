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

/// A keyed statement keeps its index plan however small its table was when the plan was
/// made. A table that churns (checkouts come and go) is nearly empty after each
/// autovacuum; a generic plan made then used to scan the whole table, and kept doing so
/// while dead rows piled up until the next one.
#[tokio::test]
async fn a_keyed_statement_planned_on_a_tiny_table_still_uses_its_index() {
    if postgres_admin_url("a_keyed_statement_planned_on_a_tiny_table").is_none() {
        return;
    }
    let test_db = TestDatabase::new(Backend::Postgres).await;
    let db = test_db.open_bare().await;
    let mut conn = db.pool().acquire().await.unwrap();
    // One at a time: VACUUM refuses the implicit transaction of a multi-statement query.
    for sql in [
        "CREATE TABLE churn (id TEXT PRIMARY KEY, state TEXT NOT NULL)",
        "INSERT INTO churn VALUES ('a', 'held'), ('b', 'held'), ('c', 'held')",
        "VACUUM ANALYZE churn",
        "SET plan_cache_mode = force_generic_plan",
        "PREPARE claim(text[]) AS
            DELETE FROM churn WHERE id = ANY ($1) AND state = 'held' RETURNING id",
    ] {
        sqlx::raw_sql(sql).execute(&mut *conn).await.unwrap();
    }
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE claim('{a}')")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("churn_pkey") && !plan.contains("Seq Scan"),
        "the generic plan does not use the key:\n{plan}"
    );
}
