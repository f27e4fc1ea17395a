//! Calls made at the same time, run as one.
//!
//! PostgreSQL spends most of a small write's CPU on what surrounds it: the round trip,
//! starting the executor, the commit. When many tasks issue the same kind of write at
//! once (a consumer applying a burst of events, checkouts arriving together), one
//! statement that takes all of their rows costs little more than one of them. A
//! [`Coalescer`] gathers the calls that arrive while a group is running and hands them to
//! the next group together, as a group commit does: idle, a call runs alone at once;
//! under load, groups grow by themselves, with no timer to wait on.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use prometheus::{IntCounterVec, Opts};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::Metrics;

/// What the grouped writes of one database handle did, by write (`order_store`, ...):
/// groups run, the calls they answered (their ratio is the mean group size), and groups
/// that failed and ran each of their calls alone; and what their announcements
/// ([`super::Announcer`]) became, by channel.
#[derive(Clone)]
pub struct GroupMetrics {
    groups: IntCounterVec,
    calls: IntCounterVec,
    fallbacks: IntCounterVec,
    pub(super) announcements: IntCounterVec,
}

impl Default for GroupMetrics {
    fn default() -> Self {
        let counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["write"]).expect("valid metric")
        };
        Self {
            groups: counter(
                "db_write_groups_total",
                "Groups of concurrent writes run as one statement, by write.",
            ),
            calls: counter(
                "db_write_grouped_calls_total",
                "Writes answered through a group, by write (divided by the groups: the mean group size).",
            ),
            fallbacks: counter(
                "db_write_group_fallbacks_total",
                "Groups that failed and ran each of their writes alone, by write.",
            ),
            announcements: IntCounterVec::new(
                Opts::new(
                    "db_announcements_total",
                    "Changes announced after commit (NOTIFY), coalesced per key, by channel and result (sent, lost).",
                ),
                &["channel", "result"],
            )
            .expect("valid metric"),
        }
    }
}

impl GroupMetrics {
    /// Adds the series to a service's registry.
    pub fn register(&self, metrics: &Metrics) {
        for counter in [
            &self.groups,
            &self.calls,
            &self.fallbacks,
            &self.announcements,
        ] {
            metrics
                .registry()
                .register(Box::new(counter.clone()))
                .expect("group metrics registered once");
        }
    }

    /// Records that a group of `write` failed and its calls run alone.
    pub fn fell_back(&self, write: &str) {
        self.fallbacks.with_label_values(&[write]).inc();
    }

    pub fn groups(&self, write: &str) -> u64 {
        self.groups.with_label_values(&[write]).get()
    }

    pub fn calls(&self, write: &str) -> u64 {
        self.calls.with_label_values(&[write]).get()
    }

    pub fn fallbacks(&self, write: &str) -> u64 {
        self.fallbacks.with_label_values(&[write]).get()
    }

    /// Announcements on `channel` that were `sent` or `lost`.
    pub fn announcements(&self, channel: &str, result: &str) -> u64 {
        self.announcements
            .with_label_values(&[channel, result])
            .get()
    }
}

type Call<T, R> = (T, oneshot::Sender<R>);

/// Runs concurrent calls in groups of at most `max_group`, at most `in_flight` groups at
/// a time, through `run`, which must answer each item of a group, in order.
pub struct Coalescer<T, R> {
    calls: OnceLock<mpsc::UnboundedSender<Call<T, R>>>,
    start: Arc<dyn Fn() -> mpsc::UnboundedSender<Call<T, R>> + Send + Sync>,
}

/// The coalescer's task is gone: its `run` panicked, or the runtime is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the coalescer's task is gone")]
pub struct Gone;

impl<T: Send + 'static, R: Send + 'static> Coalescer<T, R> {
    /// `write` names the write in `metrics` (its series start at 0).
    pub fn new<F, Fut>(
        write: &'static str,
        metrics: &GroupMetrics,
        max_group: usize,
        in_flight: usize,
        run: F,
    ) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        assert!(max_group > 0 && in_flight > 0);
        let run = Arc::new(run);
        let counted = Counted {
            groups: metrics.groups.with_label_values(&[write]),
            calls: metrics.calls.with_label_values(&[write]),
        };
        metrics.fallbacks.with_label_values(&[write]);
        // The task starts with the first call, inside whatever runtime makes it.
        let start = move || {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(gather(
                rx,
                max_group,
                in_flight,
                run.clone(),
                counted.clone(),
            ));
            tx
        };
        Self {
            calls: OnceLock::new(),
            start: Arc::new(start),
        }
    }

    /// Runs `item` with the calls made meanwhile and returns its own answer.
    pub async fn call(&self, item: T) -> Result<R, Gone> {
        let (reply, answer) = oneshot::channel();
        self.calls
            .get_or_init(|| (self.start)())
            .send((item, reply))
            .map_err(|_| Gone)?;
        answer.await.map_err(|_| Gone)
    }
}

/// One column of a group's rows, to bind as an array (`unnest($1::text[], ...)`, through
/// [`crate::Database::typed_postgres`]).
pub fn column<'a, R, T>(rows: &'a [R], value: impl Fn(&'a R) -> T) -> Vec<T> {
    rows.iter().map(value).collect()
}

/// Answers a group: in one go when it has more than one call, and each call alone when it
/// has one or when the group failed (a duplicate id, a deadlock with another replica's
/// group), so that each call meets its own error. A fallback is counted for `write`.
pub async fn together_or_alone<'a, T, R, E, Alone>(
    write: &str,
    metrics: &GroupMetrics,
    calls: &'a [T],
    together: impl Future<Output = Result<Vec<R>, E>>,
    alone: impl Fn(&'a T) -> Alone,
) -> Vec<R>
where
    E: std::fmt::Display,
    Alone: Future<Output = R>,
{
    if calls.len() > 1 {
        match together.await {
            Ok(answers) => return answers,
            Err(err) => {
                metrics.fell_back(write);
                tracing::debug!(write, error = %err, "a group of writes failed; running each alone");
            }
        }
    }
    futures_util::future::join_all(calls.iter().map(alone)).await
}

/// One write's series, looked up once.
#[derive(Clone)]
struct Counted {
    groups: prometheus::IntCounter,
    calls: prometheus::IntCounter,
}

async fn gather<T, R, F, Fut>(
    mut calls: mpsc::UnboundedReceiver<Call<T, R>>,
    max_group: usize,
    in_flight: usize,
    run: Arc<F>,
    counted: Counted,
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<R>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        // A slot first: calls arriving while every slot is busy join the next group.
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let Some(first) = calls.recv().await else {
            return;
        };
        let mut group = vec![first];
        while group.len() < max_group {
            match calls.try_recv() {
                Ok(call) => group.push(call),
                Err(_) => break,
            }
        }
        counted.groups.inc();
        counted.calls.inc_by(group.len() as u64);
        let (items, replies): (Vec<T>, Vec<_>) = group.into_iter().unzip();
        let answers = run(items);
        tokio::spawn(async move {
            let answers = answers.await;
            debug_assert_eq!(answers.len(), replies.len(), "one answer per call");
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// Records each group's items and answers each item with its double.
    fn doubling(
        groups: Arc<Mutex<Vec<Vec<u32>>>>,
        pause: Duration,
        metrics: &GroupMetrics,
    ) -> Coalescer<u32, u32> {
        Coalescer::new("double", metrics, 4, 1, move |items: Vec<u32>| {
            groups.lock().unwrap().push(items.clone());
            async move {
                tokio::time::sleep(pause).await;
                items.iter().map(|n| n * 2).collect()
            }
        })
    }

    #[tokio::test]
    async fn a_lone_call_runs_alone_at_once() {
        let groups = Arc::new(Mutex::new(Vec::new()));
        let coalescer = doubling(groups.clone(), Duration::ZERO, &GroupMetrics::default());
        assert_eq!(coalescer.call(21).await, Ok(42));
        assert_eq!(coalescer.call(5).await, Ok(10));
        assert_eq!(*groups.lock().unwrap(), vec![vec![21], vec![5]]);
    }

    #[tokio::test]
    async fn calls_made_while_a_group_runs_go_together_next_each_with_its_own_answer() {
        let groups = Arc::new(Mutex::new(Vec::new()));
        let metrics = GroupMetrics::default();
        let coalescer = Arc::new(doubling(
            groups.clone(),
            Duration::from_millis(50),
            &metrics,
        ));
        let first = tokio::spawn({
            let coalescer = coalescer.clone();
            async move { coalescer.call(0).await }
        });
        // Let the first group start before the burst arrives.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let burst: Vec<_> = (1..=6)
            .map(|n| {
                let coalescer = coalescer.clone();
                tokio::spawn(async move { coalescer.call(n).await })
            })
            .collect();
        assert_eq!(first.await.unwrap(), Ok(0));
        for (n, call) in (1..=6).zip(burst) {
            assert_eq!(call.await.unwrap(), Ok(n * 2));
        }
        // The burst waited for the running group, then went in groups of at most four.
        let groups = groups.lock().unwrap().clone();
        assert_eq!(groups, vec![vec![0], vec![1, 2, 3, 4], vec![5, 6]]);
        assert_eq!((metrics.groups("double"), metrics.calls("double")), (3, 7));
    }

    #[tokio::test]
    async fn groups_run_side_by_side_up_to_the_in_flight_bound() {
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let coalescer = Arc::new(Coalescer::new("echo", &GroupMetrics::default(), 1, 2, {
            let (running, most) = (running.clone(), most.clone());
            move |items: Vec<u32>| {
                let (running, most) = (running.clone(), most.clone());
                async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    most.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    running.fetch_sub(1, SeqCst);
                    items
                }
            }
        }));
        let calls: Vec<_> = (0..6)
            .map(|n| {
                let coalescer = coalescer.clone();
                tokio::spawn(async move { coalescer.call(n).await })
            })
            .collect();
        for (n, call) in (0..6).zip(calls) {
            assert_eq!(call.await.unwrap(), Ok(n));
        }
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_group_that_panics_fails_its_callers_not_the_next_group() {
        let coalescer = Coalescer::new(
            "echo",
            &GroupMetrics::default(),
            8,
            1,
            |items: Vec<u32>| async move {
                assert!(!items.contains(&13), "unlucky");
                items
            },
        );
        assert_eq!(coalescer.call(13).await, Err(Gone));
        assert_eq!(coalescer.call(7).await, Ok(7));
    }
}
