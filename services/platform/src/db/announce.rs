//! Notifications a writer sends after its commits, coalesced, instead of from a trigger
//! inside each transaction.
//!
//! A `NOTIFY` costs PostgreSQL far more than its payload: the committing transaction
//! takes the cluster's notification lock, appends to the queue and signals every
//! listening session, whose backend then wakes to forward it. When one row changes
//! hundreds of times a second (a product's stock under checkouts), listeners need only
//! its latest state. An [`Announcer`] sends an announcement at once when it has sent
//! nothing for [`PERIOD`]; otherwise it keeps the newest payload per key until that period
//! is up and sends them in one statement. Idle, a listener hears of a change as soon as
//! from a trigger; busy, a process sends one `NOTIFY` statement a period.
//!
//! A process that dies between a commit and the send loses those announcements, as a
//! listener that reconnects loses what was sent meanwhile: whoever keeps a copy fresh
//! from them must also re-read it periodically ([`crate::Database::watch`] does).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::mpsc;

use super::GroupMetrics;

/// The least time between two sends: the most a listener hears of a change later than it
/// would from a trigger, and at most one `NOTIFY` statement per period a process.
pub const PERIOD: Duration = Duration::from_millis(20);
/// How long the database may take to accept one period's announcements.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

type SendFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type Sender = Arc<dyn Fn(&'static str, Vec<String>) -> SendFuture + Send + Sync>;

struct Pending {
    key: String,
    version: i64,
    payload: String,
}

/// Sends announcements on one channel, coalesced per key. Cheap to share by reference;
/// its task starts with the first announcement and ends when the announcer is dropped.
pub struct Announcer {
    pending: OnceLock<mpsc::UnboundedSender<Pending>>,
    start: Box<dyn Fn() -> mpsc::UnboundedSender<Pending> + Send + Sync>,
}

impl Announcer {
    /// Announces on PostgreSQL's `channel` through `pool` (any session: the payloads
    /// are sent in a transaction of their own).
    pub fn postgres(pool: sqlx::PgPool, channel: &'static str, metrics: &GroupMetrics) -> Self {
        Self::new(channel, PERIOD, metrics, move |channel, payloads| {
            let pool = pool.clone();
            Box::pin(async move {
                sqlx::query("SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload")
                    .bind(channel)
                    .bind(payloads)
                    .execute(&pool)
                    .await
                    .map(|_| ())
                    .map_err(|err| err.to_string())
            })
        })
    }

    /// `send` delivers one period's payloads, at most one per key.
    pub fn new(
        channel: &'static str,
        period: Duration,
        metrics: &GroupMetrics,
        send: impl Fn(&'static str, Vec<String>) -> SendFuture + Send + Sync + 'static,
    ) -> Self {
        let counted = Counted {
            sent: metrics.announcements.with_label_values(&[channel, "sent"]),
            lost: metrics.announcements.with_label_values(&[channel, "lost"]),
        };
        let send: Sender = Arc::new(send);
        // The task starts with the first announcement, inside whatever runtime makes it.
        let start = move || {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(relay(rx, channel, period, send.clone(), counted.clone()));
            tx
        };
        Self {
            pending: OnceLock::new(),
            start: Box::new(start),
        }
    }

    /// Queues `payload` as the state of `key` at `version`; of the announcements of one
    /// key made within a period, only the highest version is sent. Call it once the
    /// change has committed.
    pub fn announce(&self, key: &str, version: i64, payload: String) {
        let pending = Pending {
            key: key.to_owned(),
            version,
            payload,
        };
        // Fails only while the runtime shuts down; listeners' re-reads cover that.
        let _ = self.pending.get_or_init(|| (self.start)()).send(pending);
    }
}

#[derive(Clone)]
struct Counted {
    sent: IntCounter,
    lost: IntCounter,
}

async fn relay(
    mut pending: mpsc::UnboundedReceiver<Pending>,
    channel: &'static str,
    period: Duration,
    send: Sender,
    counted: Counted,
) {
    let mut last_sent: Option<tokio::time::Instant> = None;
    while let Some(first) = pending.recv().await {
        // The first change after a quiet period goes at once; later ones gather until a
        // period has passed since the last send.
        if let Some(at) = last_sent {
            tokio::time::sleep_until(at + period).await;
        }
        let mut newest: HashMap<String, (i64, String)> = HashMap::new();
        let mut keep = |p: Pending| match newest.entry(p.key) {
            Entry::Occupied(mut held) => {
                if p.version >= held.get().0 {
                    held.insert((p.version, p.payload));
                }
            }
            Entry::Vacant(free) => {
                free.insert((p.version, p.payload));
            }
        };
        keep(first);
        while let Ok(p) = pending.try_recv() {
            keep(p);
        }
        let payloads: Vec<String> = newest.into_values().map(|(_, payload)| payload).collect();
        let count = payloads.len() as u64;
        last_sent = Some(tokio::time::Instant::now());
        let outcome = tokio::time::timeout(SEND_TIMEOUT, send(channel, payloads))
            .await
            .unwrap_or_else(|_| Err(format!("not accepted within {SEND_TIMEOUT:?}")));
        match outcome {
            Ok(()) => counted.sent.inc_by(count),
            Err(error) => {
                counted.lost.inc_by(count);
                tracing::warn!(
                    channel,
                    count,
                    %error,
                    "announcements lost; listeners catch up at their next re-read"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    type Sent = Arc<Mutex<Vec<Vec<String>>>>;

    fn recording(metrics: &GroupMetrics, fail: bool) -> (Announcer, Sent) {
        recording_every(Duration::from_millis(30), metrics, fail)
    }

    fn recording_every(period: Duration, metrics: &GroupMetrics, fail: bool) -> (Announcer, Sent) {
        let sent: Sent = Arc::default();
        let announcer = Announcer::new("things", period, metrics, {
            let sent = sent.clone();
            move |channel, mut payloads| {
                assert_eq!(channel, "things");
                payloads.sort();
                sent.lock().unwrap().push(payloads);
                Box::pin(async move { if fail { Err("refused".into()) } else { Ok(()) } })
            }
        });
        (announcer, sent)
    }

    /// Waits (up to a minute) for `done`: the relay runs on its own timer.
    async fn until(done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "never happened");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_period_sends_the_newest_state_of_each_key_once() {
        let metrics = GroupMetrics::default();
        let (announcer, sent) = recording(&metrics, false);
        announcer.announce("a", 1, "a1".into());
        announcer.announce("a", 3, "a3".into());
        // Out of order: an older version never replaces a newer one.
        announcer.announce("a", 2, "a2".into());
        announcer.announce("b", 7, "b7".into());
        until(|| metrics.announcements("things", "sent") == 2).await;
        assert_eq!(*sent.lock().unwrap(), vec![vec!["a3", "b7"]]);

        // The next change is a period of its own.
        announcer.announce("a", 4, "a4".into());
        until(|| metrics.announcements("things", "sent") == 3).await;
        assert_eq!(sent.lock().unwrap().len(), 2);
        assert_eq!(sent.lock().unwrap()[1], vec!["a4"]);
    }

    /// A change after a quiet period goes at once; those that follow within the period
    /// wait for its end. The period is long enough that "at once" means well inside it.
    #[tokio::test]
    async fn the_first_change_after_a_quiet_period_goes_at_once_the_rest_at_the_period() {
        let period = Duration::from_secs(2);
        let metrics = GroupMetrics::default();
        let (announcer, sent) = recording_every(period, &metrics, false);
        let sent_count = || metrics.announcements("things", "sent");
        let started = tokio::time::Instant::now();
        announcer.announce("a", 1, "a1".into());
        until(|| sent_count() == 1).await;
        assert!(started.elapsed() < period / 2, "sent at once");

        announcer.announce("a", 2, "a2".into());
        announcer.announce("b", 1, "b1".into());
        until(|| sent_count() == 3).await;
        let held = started.elapsed();
        assert!(held >= period, "held until the period was up, not {held:?}");
        assert_eq!(sent.lock().unwrap()[1], vec!["a2", "b1"]);

        tokio::time::sleep(period + period / 2).await;
        let quiet = tokio::time::Instant::now();
        announcer.announce("a", 3, "a3".into());
        until(|| sent_count() == 4).await;
        assert!(
            quiet.elapsed() < period / 2,
            "sent at once after a quiet period"
        );
    }

    #[tokio::test]
    async fn a_failed_send_is_counted_lost_and_the_next_period_still_goes() {
        let metrics = GroupMetrics::default();
        let (announcer, sent) = recording(&metrics, true);
        announcer.announce("a", 1, "a1".into());
        announcer.announce("b", 1, "b1".into());
        until(|| metrics.announcements("things", "lost") == 2).await;
        announcer.announce("a", 2, "a2".into());
        until(|| metrics.announcements("things", "lost") == 3).await;
        assert_eq!(sent.lock().unwrap().len(), 2);
        assert_eq!(metrics.announcements("things", "sent"), 0);
    }
}
