//! Upstreams: a named set of endpoints with load balancing (power of two choices on
//! in-flight requests), passive health (an endpoint that refuses connections is ejected
//! with exponential backoff), a circuit breaker and a retry budget. All state is atomics
//! shared by every worker thread.
//!
//! The endpoint list sits behind an `ArcSwap` so a discovery source (the static list, or
//! Kubernetes EndpointSlices: `discovery`) can replace it without stopping traffic.
//!
//! The upstream layer: these, each worker's connection `pool`, and `discovery`. It uses the
//! HTTP codec below it and knows nothing of routes, policy or the proxy.

pub mod discovery;
pub mod pool;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::uri::{Authority, Scheme};

/// Milliseconds since the process-wide epoch, for cheap atomic timestamps.
pub fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

#[derive(Debug)]
pub struct Endpoint {
    /// Unique for the process: worker pools key connections by it. (An address would
    /// outlive the endpoint: a freed `Endpoint` can be reallocated at the same address for
    /// another pod, and the pool must never hand it the old pod's connections.)
    pub id: u64,
    pub authority: Authority,
    /// `Host` for requests sent here, built once.
    pub host_header: http::HeaderValue,
    in_flight: AtomicU32,
    ejected_until: AtomicU64,
    ejections: AtomicU32,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.trim().parse().map_err(|e| format!("{url:?}: {e}"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(format!("{url:?}: endpoints are http://host:port"));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(format!("{url:?}: an endpoint has no path"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("{url:?}: no host"))?;
        let host_header =
            http::HeaderValue::from_str(authority.as_str()).map_err(|e| format!("{url:?}: {e}"))?;
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            host_header,
            authority,
            in_flight: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        })
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Connection refused: stop sending here for `base * 2^n` (capped at 30 s).
    pub fn eject(&self, base: Duration) {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(5);
        let backoff = (base * (1 << n)).min(Duration::from_secs(30));
        self.ejected_until
            .store(now_ms() + backoff.as_millis() as u64, Ordering::Relaxed);
    }

    /// A successful exchange ends any backoff history.
    pub fn mark_healthy(&self) {
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }
}

/// Holds an endpoint's in-flight slot until dropped (when the response body ends).
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(endpoint)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CircuitState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

/// Opens after `threshold` consecutive failures; after `cooldown` lets one trial request
/// through (half-open); the trial's outcome closes or re-opens it.
#[derive(Debug)]
pub struct Breaker {
    state: AtomicU8,
    consecutive_failures: AtomicU32,
    opened_at: AtomicU64,
    threshold: u32,
    cooldown: Duration,
}

/// What the breaker says about one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// The single half-open trial.
    Trial,
    /// Refused; retry after this many seconds.
    Rejected(u64),
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            state: AtomicU8::new(CircuitState::Closed as u8),
            consecutive_failures: AtomicU32::new(0),
            opened_at: AtomicU64::new(0),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    pub fn state(&self) -> CircuitState {
        match self.state.load(Ordering::Acquire) {
            0 => CircuitState::Closed,
            1 => CircuitState::Open,
            _ => CircuitState::HalfOpen,
        }
    }

    pub fn admit(&self) -> Admission {
        match self.state() {
            CircuitState::Closed => Admission::Allowed,
            CircuitState::HalfOpen => Admission::Rejected(1),
            CircuitState::Open => {
                let elapsed = now_ms().saturating_sub(self.opened_at.load(Ordering::Acquire));
                let cooldown = self.cooldown.as_millis() as u64;
                if elapsed < cooldown {
                    return Admission::Rejected((cooldown - elapsed).div_ceil(1000).max(1));
                }
                // Exactly one caller wins the move to half-open and makes the trial.
                match self.state.compare_exchange(
                    CircuitState::Open as u8,
                    CircuitState::HalfOpen as u8,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => Admission::Trial,
                    Err(_) => Admission::Rejected(1),
                }
            }
        }
    }

    pub fn record_success(&self) {
        // Read first: a store on every success would bounce this cache line between cores.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.state() != CircuitState::Closed {
            self.state
                .store(CircuitState::Closed as u8, Ordering::Release);
        }
    }

    pub fn record_failure(&self) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        let state = self.state();
        if state == CircuitState::HalfOpen
            || (state == CircuitState::Closed && failures >= self.threshold)
        {
            self.opened_at.store(now_ms(), Ordering::Release);
            self.state
                .store(CircuitState::Open as u8, Ordering::Release);
        }
    }
}

/// Retries may add at most `ratio` of the request rate (plus a small floor so a quiet
/// upstream can still retry): each request deposits `ratio` of a token, each retry spends
/// one. Stops retry storms from multiplying load on an upstream that is already failing.
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a token.
    balance: AtomicI64,
    deposit: i64,
    cap: i64,
}

impl RetryBudget {
    const TOKEN: i64 = 1000;

    pub fn new(ratio: f64) -> Self {
        let deposit = (ratio.clamp(0.0, 1.0) * Self::TOKEN as f64) as i64;
        Self {
            // A floor of ten retries, refilled only by traffic.
            balance: AtomicI64::new(10 * Self::TOKEN),
            deposit,
            cap: 100 * Self::TOKEN,
        }
    }

    pub fn on_request(&self) {
        if self.deposit > 0 && self.balance.load(Ordering::Relaxed) < self.cap {
            self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    pub fn try_withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b >= Self::TOKEN).then_some(b - Self::TOKEN)
            })
            .is_ok()
    }
}

pub struct Upstream {
    pub name: String,
    /// Responses cut off mid-body, counted where the body is streamed.
    pub stream_errors: prometheus::IntCounter,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    pub breaker: Breaker,
    pub budget: RetryBudget,
    pub eject_backoff: Duration,
    /// Set when the endpoints come from Kubernetes rather than the static list.
    pub discovery: Option<Arc<crate::upstream::discovery::Status>>,
}

impl Upstream {
    pub fn new(
        name: String,
        endpoints: Vec<Endpoint>,
        breaker: Breaker,
        budget: RetryBudget,
        eject_backoff: Duration,
        stream_errors: prometheus::IntCounter,
    ) -> Self {
        Self {
            name,
            stream_errors,
            endpoints: ArcSwap::from_pointee(endpoints.into_iter().map(Arc::new).collect()),
            breaker,
            budget,
            eject_backoff,
            discovery: None,
        }
    }

    pub fn with_discovery(mut self, status: Arc<crate::upstream::discovery::Status>) -> Self {
        self.discovery = Some(status);
        self
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Replaces the endpoint set (discovery). Endpoints that stay keep their state.
    pub fn set_endpoints(&self, fresh: Vec<Endpoint>) {
        let current = self.endpoints.load();
        let merged = fresh
            .into_iter()
            .map(|e| {
                current
                    .iter()
                    .find(|c| c.authority == e.authority)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(e))
            })
            .collect();
        self.endpoints.store(Arc::new(merged));
    }

    /// Power of two choices among endpoints not ejected, skipping `avoid` (the endpoint
    /// that just failed, when retrying).
    /// Whether a retry could go anywhere but the endpoint that just failed.
    pub fn has_alternatives(&self) -> bool {
        self.endpoints.load().len() > 1
    }

    pub fn pick(&self, avoid: Option<&Arc<Endpoint>>) -> Option<Arc<Endpoint>> {
        let endpoints = self.endpoints.load();
        // The clock is read only when some endpoint has been ejected at all.
        let now = std::cell::OnceCell::new();
        let usable = |e: &&Arc<Endpoint>| {
            (e.ejected_until.load(Ordering::Relaxed) == 0
                || !e.is_ejected(*now.get_or_init(now_ms)))
                && avoid.is_none_or(|a| !Arc::ptr_eq(a, e))
        };
        match endpoints.len() {
            0 => None,
            1 => endpoints.iter().find(usable).cloned(),
            n => {
                let a = &endpoints[fastrand::usize(..n)];
                let mut b = &endpoints[fastrand::usize(..n - 1)];
                if Arc::ptr_eq(a, b) {
                    b = &endpoints[n - 1];
                }
                match (usable(&a), usable(&b)) {
                    (true, true) => Some(if b.in_flight() < a.in_flight() { b } else { a }.clone()),
                    (true, false) => Some(a.clone()),
                    (false, true) => Some(b.clone()),
                    (false, false) => endpoints
                        .iter()
                        .filter(usable)
                        .min_by_key(|e| e.in_flight())
                        .cloned(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(urls: &[&str]) -> Upstream {
        Upstream::new(
            "u".into(),
            urls.iter().map(|u| Endpoint::parse(u).unwrap()).collect(),
            Breaker::new(3, Duration::from_millis(50)),
            RetryBudget::new(0.2),
            Duration::from_millis(50),
            prometheus::IntCounter::new("x", "x").unwrap(),
        )
    }

    #[test]
    fn endpoints_must_be_plain_http_hosts() {
        assert!(Endpoint::parse("http://10.0.0.1:8081").is_ok());
        assert!(Endpoint::parse("https://x").is_err());
        assert!(Endpoint::parse("http://x/api").is_err());
        assert!(Endpoint::parse("x:80").is_err());
    }

    #[test]
    fn picks_the_less_loaded_and_never_an_ejected_endpoint() {
        let u = upstream(&["http://a:1", "http://b:2"]);
        let eps = u.endpoints();
        let _busy: Vec<InFlight> = (0..5).map(|_| InFlight::new(eps[0].clone())).collect();
        for _ in 0..50 {
            assert_eq!(u.pick(None).unwrap().authority.as_str(), "b:2");
        }
        eps[1].eject(Duration::from_secs(10));
        assert_eq!(u.pick(None).unwrap().authority.as_str(), "a:1");
        assert!(u.pick(Some(&eps[0])).is_none(), "the failed one is avoided");
        eps[0].eject(Duration::from_secs(10));
        assert!(u.pick(None).is_none());
        eps[1].mark_healthy();
        assert_eq!(u.pick(None).unwrap().authority.as_str(), "b:2");
    }

    #[test]
    fn replacing_endpoints_keeps_the_state_of_those_that_stay() {
        let u = upstream(&["http://a:1", "http://b:2"]);
        u.endpoints()[1].eject(Duration::from_secs(10));
        u.set_endpoints(vec![
            Endpoint::parse("http://b:2").unwrap(),
            Endpoint::parse("http://c:3").unwrap(),
        ]);
        let now = now_ms();
        let eps = u.endpoints();
        let names: Vec<&str> = eps.iter().map(|e| e.authority.as_str()).collect();
        assert_eq!(names, ["b:2", "c:3"]);
        assert!(eps[0].is_ejected(now), "b keeps its ejection");
        assert!(!eps[1].is_ejected(now));
        for _ in 0..20 {
            assert_eq!(
                u.pick(None).unwrap().authority.as_str(),
                "c:3",
                "a is gone, b is ejected"
            );
        }
    }

    #[test]
    fn spreads_load_across_equal_endpoints() {
        let u = upstream(&["http://a:1", "http://b:2", "http://c:3"]);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..3000 {
            *counts
                .entry(u.pick(None).unwrap().authority.to_string())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&c| c > 700), "{counts:?}");
    }

    #[test]
    fn ejection_backs_off_exponentially() {
        let e = Endpoint::parse("http://a:1").unwrap();
        e.eject(Duration::from_millis(100));
        let first = e.ejected_until.load(Ordering::Relaxed) - now_ms();
        e.eject(Duration::from_millis(100));
        let second = e.ejected_until.load(Ordering::Relaxed) - now_ms();
        assert!(first <= 100 && second > 150, "{first} {second}");
    }

    #[test]
    fn breaker_opens_half_opens_and_closes() {
        let b = Breaker::new(3, Duration::from_millis(50));
        for _ in 0..2 {
            b.record_failure();
        }
        assert_eq!(b.admit(), Admission::Allowed);
        b.record_failure();
        assert_eq!(b.state(), CircuitState::Open);
        assert!(matches!(b.admit(), Admission::Rejected(1)));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit(), Admission::Trial);
        assert!(
            matches!(b.admit(), Admission::Rejected(_)),
            "one trial at a time"
        );
        b.record_failure();
        assert_eq!(b.state(), CircuitState::Open, "a failed trial re-opens");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit(), Admission::Trial);
        b.record_success();
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(b.admit(), Admission::Allowed);
    }

    #[test]
    fn retry_budget_is_a_fraction_of_traffic() {
        let budget = RetryBudget::new(0.2);
        let floor = (0..100).take_while(|_| budget.try_withdraw()).count();
        assert_eq!(floor, 10);
        for _ in 0..100 {
            budget.on_request();
        }
        let earned = (0..100).take_while(|_| budget.try_withdraw()).count();
        assert_eq!(earned, 20);
    }
}
