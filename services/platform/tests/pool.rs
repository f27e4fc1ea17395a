//! The database pool against a real PostgreSQL server.

use std::time::Duration;

use shop_platform::testing::{TestDatabase, postgres_admin_url};
use shop_platform::{Backend, Migrations};
use sqlx::Connection;
use sqlx::migrate::Migrator;

/// Connections are not pinged on every acquire, only after sitting idle: one the server
/// dropped while it sat idle (a restart, a failover, an idle timeout) is found dead by
/// that ping and replaced, and the query never sees it.
#[tokio::test]
async fn a_connection_the_server_dropped_while_idle_is_replaced_unseen() {
    let Some(admin) = postgres_admin_url("a_connection_the_server_dropped_while_idle") else {
        return;
    };
    let test_db = TestDatabase::new(Backend::Postgres).await;
    let none = Migrations {
        sqlite: Migrator::DEFAULT,
        postgres: Migrator::DEFAULT,
    };
    let db = test_db.storage().open("test", &none).await.unwrap();
    let name: String = sqlx::query_scalar("SELECT CAST(current_database() AS TEXT)")
        .fetch_one(db.pool())
        .await
        .unwrap();

    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    let dropped: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&name)
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
