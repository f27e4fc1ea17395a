//! Two replicas' outbox relays on one PostgreSQL database: one publishes at a time (the
//! advisory lock), so every event goes out once and in the order it was written, whichever
//! replica happens to publish it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shop_platform::Metrics;
use shop_platform::events::outbox::{Message, Unconfirmed, spawn_relay};
use shop_platform::events::{EventMetrics, NewEvent, Outbox, Publisher};
use shop_platform::testing::{Backend, TestDatabase, postgres_admin_url};

const EVENTS: usize = 400;

/// Two order-service replicas' handles on one database.
async fn two_replicas(test_db: &TestDatabase) -> [shop_platform::Database; 2] {
    let storage = test_db.storage();
    let open = || storage.open(shop_order::NAME, &shop_order::storage::MIGRATIONS);
    [open().await.unwrap(), open().await.unwrap()]
}

const PER_COMMIT: usize = 8;

/// A broker that takes a little while to confirm, and notes who published what, and
/// whether two publications ever overlapped.
struct Recording {
    replica: usize,
    log: Arc<Mutex<Vec<(usize, String)>>>,
    in_flight: Arc<AtomicUsize>,
    overlaps: Arc<AtomicUsize>,
}

#[async_trait]
impl Publisher for Recording {
    async fn publish(&self, messages: &[Message]) -> Result<(), Unconfirmed> {
        if self.in_flight.fetch_add(1, Ordering::SeqCst) > 0 {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
        self.log
            .lock()
            .unwrap()
            .extend(messages.iter().map(|m| (self.replica, m.event_id.clone())));
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_publish_each_event_once_in_order() {
    if postgres_admin_url("two_relays_publish_each_event_once_in_order").is_none() {
        return;
    }
    let test_db = TestDatabase::new(Backend::Postgres).await;
    let replicas = two_replicas(&test_db).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let outboxes = [Outbox::default(), Outbox::default()];
    let mut relays = Vec::new();
    for (replica, db) in replicas.iter().enumerate() {
        let metrics = Metrics::new(shop_order::NAME);
        let publisher = Recording {
            replica,
            log: log.clone(),
            in_flight: in_flight.clone(),
            overlaps: overlaps.clone(),
        };
        relays.push(spawn_relay(
            db,
            &outboxes[replica],
            Arc::new(publisher),
            EventMetrics::new(&metrics, &["order.placed"], &[]),
            Duration::from_millis(200),
        ));
    }

    // Commits from both replicas, each waking both relays, in alternating order so that
    // neither is always first to try the lock.
    for commit in 0..EVENTS / PER_COMMIT {
        let writer = &replicas[commit % 2];
        let mut tx = writer.writer().begin().await.unwrap();
        for n in 0..PER_COMMIT {
            NewEvent::new(
                "order.placed",
                &serde_json::json!({"commit": commit, "n": n}),
            )
            .append(&mut tx)
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        let (first, second) = if commit % 2 == 0 { (0, 1) } else { (1, 0) };
        outboxes[first].wake();
        outboxes[second].wake();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    while log.lock().unwrap().len() < EVENTS {
        assert!(
            Instant::now() < deadline,
            "{} of {EVENTS} events published",
            log.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Both relays keep polling: long enough for a second publication to show.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for relay in &relays {
        relay.abort();
    }

    let written: Vec<String> = sqlx::query_scalar("SELECT event_id FROM outbox ORDER BY seq")
        .fetch_all(replicas[0].pool())
        .await
        .unwrap();
    let unsent: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE sent_at_ms IS NULL")
        .fetch_one(replicas[0].pool())
        .await
        .unwrap();
    let log = log.lock().unwrap().clone();
    let published: Vec<String> = log.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(written.len(), EVENTS);
    assert_eq!(
        published, written,
        "every event published once, in the order written"
    );
    assert_eq!(unsent, 0);
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two relays published at once"
    );
    let by = |replica| log.iter().filter(|(r, _)| *r == replica).count();
    assert!(
        by(0) > 0 && by(1) > 0,
        "both replicas should have published some: {} and {}",
        by(0),
        by(1)
    );
}

/// A broker that takes `delay` to confirm, says when a publication has begun, and notes
/// when each body was published.
struct Slow {
    delay: Duration,
    started: Arc<tokio::sync::Notify>,
    published: Arc<Mutex<Vec<(Instant, String)>>>,
}

#[async_trait]
impl Publisher for Slow {
    async fn publish(&self, messages: &[Message]) -> Result<(), Unconfirmed> {
        self.started.notify_one();
        tokio::time::sleep(self.delay).await;
        let now = Instant::now();
        self.published
            .lock()
            .unwrap()
            .extend(messages.iter().map(|m| (now, m.body.clone())));
        Ok(())
    }
}

/// An event committed while the other replica's relay is publishing a batch it read
/// before that commit goes out once the batch ends, not at the next poll: no `NOTIFY`
/// announces it, but the writer's own relay, woken in-process, tries the lock again
/// until it gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_written_while_the_other_replica_relays_goes_out_without_waiting_for_a_poll() {
    if postgres_admin_url("an_event_written_while_the_other_replica_relays").is_none() {
        return;
    }
    let test_db = TestDatabase::new(Backend::Postgres).await;
    let replicas = two_replicas(&test_db).await;
    let published = Arc::new(Mutex::new(Vec::new()));
    let started = Arc::new(tokio::sync::Notify::new());
    let outboxes = [Outbox::default(), Outbox::default()];
    let mut relays = Vec::new();
    for (replica, db) in replicas.iter().enumerate() {
        let publisher = Slow {
            // The first replica's batch is slow, so the second's event commits during it.
            delay: Duration::from_millis(if replica == 0 { 500 } else { 1 }),
            started: started.clone(),
            published: published.clone(),
        };
        relays.push(spawn_relay(
            db,
            &outboxes[replica],
            Arc::new(publisher),
            EventMetrics::new(&Metrics::new(shop_order::NAME), &["order.placed"], &[]),
            // Far longer than the test: only wake-ups and retries can deliver.
            Duration::from_secs(600),
        ));
    }
    let write = |replica: usize, id: &'static str| {
        let db = replicas[replica].clone();
        async move {
            let mut tx = db.writer().begin().await.unwrap();
            NewEvent::new("order.placed", &serde_json::json!({ "id": id }))
                .append(&mut tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    };

    write(0, "first").await;
    outboxes[0].wake();
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the first replica's relay never published");
    write(1, "second").await;
    let written = Instant::now();
    outboxes[1].wake();

    let deadline = Instant::now() + Duration::from_secs(10);
    while published.lock().unwrap().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "only {:?} published within 10 s",
            published.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for relay in &relays {
        relay.abort();
    }
    let published = published.lock().unwrap().clone();
    assert_eq!(published.len(), 2, "{published:?}");
    let (at, _) = published
        .iter()
        .find(|(_, body)| body.contains("second"))
        .expect("the second event was published");
    eprintln!(
        "the second event went out {:?} after its commit",
        *at - written
    );
}
