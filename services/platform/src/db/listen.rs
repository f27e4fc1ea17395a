//! The `LISTEN` session behind [`super::Database::watch`] on PostgreSQL.
//!
//! One session per database handle, whatever the number of channels watched: on each
//! committed `NOTIFY`, PostgreSQL (15, the version tested here) signals every session of the
//! database that listens on any channel, and each wakes to read the shared queue. The
//! product service watches two channels (`catalogue`, `outbox`); with a session each,
//! every reservation's commit woke two backends and held two connections.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgNotification};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::{WatchEvent, redact_url};

/// The shared session's subscribers, and the task that runs it.
#[derive(Default)]
pub(crate) struct Listeners {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    subscribers: Vec<Subscriber>,
    session: Option<AbortHandle>,
}

#[derive(Clone)]
struct Subscriber {
    id: u64,
    channel: &'static str,
    events: mpsc::Sender<WatchEvent>,
}

/// A watch's place in the shared session; dropping it leaves the session, and the last
/// one to leave closes it.
pub(crate) struct Subscription {
    listeners: Arc<Listeners>,
    id: u64,
}

impl Listeners {
    /// Adds a subscriber and restarts the session on every channel subscribed. The new
    /// session resyncs all subscribers, as any reconnection does: cheaper than keeping a
    /// session that can add channels while it waits (sqlx's listener cannot be
    /// cancelled mid-receive safely), and it happens once per watch, at start-up.
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        url: &str,
        channel: &'static str,
        events: mpsc::Sender<WatchEvent>,
    ) -> Subscription {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.next_id += 1;
        let id = state.next_id;
        state.subscribers.push(Subscriber {
            id,
            channel,
            events,
        });
        if let Some(session) = state.session.take() {
            session.abort();
        }
        let session = tokio::spawn(listen(url.to_owned(), state.subscribers.clone()));
        state.session = Some(session.abort_handle());
        Subscription {
            listeners: Arc::clone(self),
            id,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = self
            .listeners
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.subscribers.retain(|s| s.id != self.id);
        // The others keep the session; it still listens on this channel, and what it
        // hears for nobody is dropped.
        if state.subscribers.is_empty()
            && let Some(session) = state.session.take()
        {
            session.abort();
        }
    }
}

/// Keeps the `LISTEN` session open, reconnecting with backoff, and hands each
/// subscriber its channel's payloads; says `Resync` to all whenever it (re)connects,
/// since what was sent while it was away is lost.
async fn listen(url: String, subscribers: Vec<Subscriber>) {
    let mut channels: Vec<&str> = subscribers.iter().map(|s| s.channel).collect();
    channels.sort_unstable();
    channels.dedup();
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut listener = PgListener::connect(&url).await?;
            listener.listen_all(channels.iter().copied()).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        let mut listener = match connected {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(?channels, error = %redact_url(&err.to_string()), "cannot listen for changes; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if !deliver(&subscribers, |_| Some(WatchEvent::Resync)).await {
            return;
        }
        loop {
            let delivered = match listener.try_recv().await {
                Ok(Some(first)) => {
                    let mut batch = vec![first];
                    while let Some(more) = listener.next_buffered() {
                        batch.push(more);
                    }
                    deliver(&subscribers, |channel| payloads(&batch, channel)).await
                }
                // The connection dropped and was re-established at once.
                Ok(None) => deliver(&subscribers, |_| Some(WatchEvent::Resync)).await,
                Err(err) => {
                    tracing::warn!(?channels, error = %err, "lost the change listener; reconnecting");
                    break;
                }
            };
            if !delivered {
                return;
            }
        }
    }
}

/// `channel`'s payloads in `batch`, in commit order, if it has any.
fn payloads(batch: &[PgNotification], channel: &str) -> Option<WatchEvent> {
    let mine: Vec<String> = batch
        .iter()
        .filter(|n| n.channel() == channel)
        .map(|n| n.payload().to_owned())
        .collect();
    (!mine.is_empty()).then_some(WatchEvent::Notified(mine))
}

/// Sends each subscriber what `event_for` gives for its channel; false once every
/// subscriber has gone. One that lets its queue (1,024 events) fill holds up the others,
/// as it would have held up its own session: every watcher here applies events in memory.
async fn deliver(
    subscribers: &[Subscriber],
    event_for: impl Fn(&str) -> Option<WatchEvent>,
) -> bool {
    let mut anyone = false;
    for subscriber in subscribers {
        match event_for(subscriber.channel) {
            Some(event) => anyone |= subscriber.events.send(event).await.is_ok(),
            None => anyone |= !subscriber.events.is_closed(),
        }
    }
    anyone
}
