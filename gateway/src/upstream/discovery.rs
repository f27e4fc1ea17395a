//! Kubernetes endpoint discovery: a kube-runtime watcher and reflector over the
//! `discovery.k8s.io/v1` EndpointSlices of each upstream's Service (selected by the
//! `kubernetes.io/service-name` label). Every change recomputes the upstream's endpoint set
//! and swaps it in atomically ([`Upstream::set_endpoints`]), so the request path reads one
//! `ArcSwap` exactly as it does with a static list.
//!
//! - Ready endpoints are balanced; not-ready and terminating ones get no new requests
//!   (requests already sent to them finish: they hold their own reference).
//! - Slices are merged and de-duplicated by address; the port is looked up by name in each
//!   slice, because pods of two ReplicaSets may expose the named port on different numbers.
//! - A watch error keeps the last known endpoints, waits (kube's `DefaultBackoff`: 0.8 s
//!   doubling to 30 s, with jitter) and lists again; the upstream reports itself as failing
//!   until that list succeeds, so the state seen in `/ready` and metrics is never stale.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, DefaultBackoff, Event};
use serde_json::json;

use crate::upstream::{Endpoint, Upstream};

/// The label the EndpointSlice controller puts on every slice of a Service.
pub const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// Which Service an upstream follows, and which of its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub service: String,
    pub port_name: String,
}

/// Discovery state of one upstream: read by `/ready` and `/metrics`, never per request.
#[derive(Debug)]
pub struct Status {
    pub target: Target,
    synced: AtomicBool,
    failing: AtomicBool,
    ready: AtomicUsize,
    not_ready: AtomicUsize,
    terminating: AtomicUsize,
    last_error: Mutex<Option<String>>,
    errors: prometheus::IntCounter,
}

impl Status {
    pub fn new(target: Target, errors: prometheus::IntCounter) -> Self {
        Self {
            target,
            synced: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            ready: AtomicUsize::new(0),
            not_ready: AtomicUsize::new(0),
            terminating: AtomicUsize::new(0),
            last_error: Mutex::new(None),
            errors,
        }
    }

    /// A full list has succeeded at least once: the endpoint set is known.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Synced and no error since the last successful list.
    pub fn is_watching(&self) -> bool {
        self.is_synced() && !self.failing.load(Ordering::Acquire)
    }

    /// (ready, not ready, terminating) endpoints at the last update.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.ready.load(Ordering::Relaxed),
            self.not_ready.load(Ordering::Relaxed),
            self.terminating.load(Ordering::Relaxed),
        )
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("status lock").clone()
    }

    fn record_error(&self, error: String) {
        self.errors.inc();
        self.failing.store(true, Ordering::Release);
        *self.last_error.lock().expect("status lock") = Some(error);
    }

    fn record_resolved(&self, resolved: &Resolved) {
        self.ready.store(resolved.ready.len(), Ordering::Relaxed);
        self.not_ready.store(resolved.not_ready, Ordering::Relaxed);
        self.terminating
            .store(resolved.terminating, Ordering::Relaxed);
    }

    fn record_synced(&self) {
        self.synced.store(true, Ordering::Release);
        self.failing.store(false, Ordering::Release);
    }

    /// The discovery part of an upstream's `/ready` entry.
    pub fn report(&self) -> serde_json::Value {
        let (ready, not_ready, terminating) = self.counts();
        let watch = if !self.is_synced() {
            "syncing"
        } else if self.is_watching() {
            "ok"
        } else {
            "retrying"
        };
        json!({
            "source": "kubernetes",
            "service": self.target.service,
            "port": self.target.port_name,
            "watch": watch,
            "ready": ready,
            "not_ready": not_ready,
            "terminating": terminating,
            "last_error": self.last_error(),
        })
    }
}

/// The endpoints of one Service, merged from all its slices.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// `http://address:port` of every ready, non-terminating endpoint, sorted, unique.
    pub ready: Vec<String>,
    pub not_ready: usize,
    pub terminating: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum State {
    Ready,
    NotReady,
    Terminating,
}

/// Merges slices into one endpoint set. An address listed by several slices (slices are
/// eventually consistent while the controller moves endpoints between them) counts once,
/// in its least available state: a terminating pod never comes back.
pub fn resolve<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port_name: &str,
) -> Resolved {
    let mut seen: BTreeMap<String, State> = BTreeMap::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        // An unnamed port is "" in the API; absent and empty are the same name.
        let Some(port) = slice.ports.iter().flatten().find_map(|p| {
            (p.name.as_deref().unwrap_or("") == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .then_some(p.port)
                .flatten()
        }) else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            // Every address of an endpoint is the same pod; the API says to use the first.
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let conditions = endpoint.conditions.as_ref();
            let state = if conditions.and_then(|c| c.terminating) == Some(true) {
                State::Terminating
            } else if conditions.and_then(|c| c.ready) == Some(false) {
                // An unknown readiness (absent) counts as ready, as the API specifies.
                State::NotReady
            } else {
                State::Ready
            };
            let url = match ip {
                IpAddr::V4(ip) => format!("http://{ip}:{port}"),
                IpAddr::V6(ip) => format!("http://[{ip}]:{port}"),
            };
            let entry = seen.entry(url).or_insert(state);
            *entry = (*entry).max(state);
        }
    }
    let mut resolved = Resolved::default();
    for (url, state) in seen {
        match state {
            State::Ready => resolved.ready.push(url),
            State::NotReady => resolved.not_ready += 1,
            State::Terminating => resolved.terminating += 1,
        }
    }
    resolved
}

fn apply(upstream: &Upstream, status: &Status, store: &Store<EndpointSlice>) {
    let slices = store.state();
    let resolved = resolve(slices.iter().map(|s| &**s), &status.target.port_name);
    let endpoints = resolved
        .ready
        .iter()
        .filter_map(|url| Endpoint::parse(url).ok())
        .collect();
    let unchanged = {
        let before = upstream.endpoints();
        before.len() == resolved.ready.len()
            && before
                .iter()
                .zip(&resolved.ready)
                .all(|(e, url)| url.strip_prefix("http://") == Some(e.authority.as_str()))
    };
    upstream.set_endpoints(endpoints);
    status.record_resolved(&resolved);
    if !unchanged {
        tracing::info!(
            upstream = %upstream.name,
            service = %status.target.service,
            ready = resolved.ready.len(),
            not_ready = resolved.not_ready,
            terminating = resolved.terminating,
            "endpoints changed"
        );
    }
}

/// Follows one upstream's Service until the task is dropped. `backoff` yields the waits
/// between failed attempts; a fresh one starts after every successful list.
pub async fn follow<B>(
    api: Api<EndpointSlice>,
    upstream: &Upstream,
    status: &Status,
    new_backoff: impl Fn() -> B,
) where
    B: Iterator<Item = Duration>,
{
    let selector = format!("{SERVICE_LABEL}={}", status.target.service);
    let mut backoff = new_backoff();
    loop {
        // Each attempt starts from a full list into a fresh store; the endpoint set in use
        // is only replaced once that list is complete (InitDone).
        let (store, writer) = reflector::store::<EndpointSlice>();
        let config = watcher::Config::default().labels(&selector);
        let mut stream = watcher::watcher(api.clone(), config)
            .reflect(writer)
            .boxed();
        let error = loop {
            match stream.next().await {
                Some(Ok(Event::InitDone)) => {
                    apply(upstream, status, &store);
                    status.record_synced();
                    backoff = new_backoff();
                }
                Some(Ok(Event::Apply(_) | Event::Delete(_))) => apply(upstream, status, &store),
                Some(Ok(Event::Init | Event::InitApply(_))) => {}
                Some(Err(err)) => break err.to_string(),
                // The watcher restarts itself; it never ends on its own.
                None => break "watch stream ended".to_owned(),
            }
        };
        drop(stream);
        let wait = backoff.next().unwrap_or(Duration::from_secs(30));
        tracing::warn!(
            upstream = %upstream.name,
            service = %status.target.service,
            error = %error,
            retry_ms = wait.as_millis() as u64,
            "endpoint watch failed; keeping the last known endpoints"
        );
        status.record_error(error);
        tokio::time::sleep(wait).await;
    }
}

/// What [`spawn`] needs of the gateway's shared state: its upstreams.
pub trait Upstreams: Send + Sync + 'static {
    fn upstreams(&self) -> &[Upstream];
}

/// Starts one watcher task per upstream that has a discovery status. The tasks run on the
/// current runtime until `shared` is dropped with the runtime.
pub fn spawn<S: Upstreams>(
    client: kube::Client,
    namespace: &str,
    shared: &Arc<S>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..shared.upstreams().len())
        .filter(|&i| shared.upstreams()[i].discovery.is_some())
        .map(|i| {
            let api = Api::<EndpointSlice>::namespaced(client.clone(), namespace);
            let shared = shared.clone();
            tokio::spawn(async move {
                let upstream = &shared.upstreams()[i];
                let status = upstream.discovery.as_ref().expect("filtered above");
                follow(api, upstream, status, DefaultBackoff::default).await;
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
