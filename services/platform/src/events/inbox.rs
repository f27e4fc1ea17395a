//! The consumer's record of applied events. Each consuming service's migrations create:
//! `inbox (queue TEXT, event_id TEXT, processed_at_ms BIGINT, PRIMARY KEY (queue, event_id))`.

/// Records that `queue` applied `event_id`, on `conn` inside the transaction that
/// applies it. `false`: it was applied before, and the caller must change nothing.
pub async fn first_delivery(
    conn: &mut sqlx::AnyConnection,
    queue: &str,
    event_id: &str,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO inbox (queue, event_id, processed_at_ms) VALUES ($1, $2, $3)
         ON CONFLICT (queue, event_id) DO NOTHING",
    )
    .bind(queue)
    .bind(event_id)
    .bind(chrono::Utc::now().timestamp_millis())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}
