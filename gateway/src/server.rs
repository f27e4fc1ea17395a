//! Thread-per-core serving. Each worker is an OS thread running a single-threaded Tokio
//! runtime with its own `SO_REUSEPORT` listener (the kernel spreads connections) and its
//! own upstream connection pool, so a request is accepted, proxied and answered on one
//! thread without synchronisation beyond atomics.
//!
//! Shutdown follows the platform's sequence: `/ready` -> 503 at once, keep serving for
//! `SHUTDOWN_DELAY`, stop accepting, drain connections for at most `SHUTDOWN_TIMEOUT`.

use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use shop_platform::probes::Readiness;
use shop_platform::{Metrics, Shutdown};
use socket2::{Domain, Protocol, Socket, Type};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Discovery};
use crate::http::deadline::Deadlines;
use crate::http::front::{Connections, Front};
use crate::metrics::GatewayMetrics;
use crate::policy::cache::ResponseCache;
use crate::policy::ratelimit::RateLimiter;
use crate::policy::routes::RouteTable;
use crate::proxy::{Client, Worker};
use crate::upstream::discovery;
use crate::upstream::pool::Pool;
use crate::upstream::{Breaker, Endpoint, RetryBudget, Upstream};
use crate::{NAME, Options, Shared};

pub struct Gateway {
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    local_addr: SocketAddr,
    config: Config,
    kube_client: Option<kube::Client>,
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

impl Gateway {
    /// Compiles routes, creates upstream state and binds one listener per worker (the
    /// first picks the port when it is 0; the rest share it).
    pub fn bind(config: Config) -> anyhow::Result<Self> {
        let metrics = Metrics::new(NAME);
        let metrics_gw = GatewayMetrics::new(&metrics);
        let names: Vec<String> = config.upstreams.keys().cloned().collect();
        let table = RouteTable::compile(&config.routes, &names)?;
        let upstreams = config
            .upstreams
            .iter()
            .map(|(name, urls)| {
                let endpoints = urls
                    .iter()
                    .map(|u| Endpoint::parse(u).map_err(anyhow::Error::msg))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                metrics_gw.known_upstream(name, config.cache_bytes > 0);
                let upstream = Upstream::new(
                    name.clone(),
                    endpoints,
                    Breaker::new(config.breaker_failures, config.breaker_cooldown),
                    RetryBudget::new(config.retry_budget),
                    config.eject_backoff,
                    metrics_gw.stream_errors(name),
                );
                Ok(match &config.discovery {
                    Discovery::Static => upstream,
                    Discovery::Kubernetes { targets, .. } => {
                        upstream.with_discovery(Arc::new(discovery::Status::new(
                            targets[name].clone(),
                            metrics_gw.discovery_errors(name),
                        )))
                    }
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let readiness = Readiness::default();
        let statuses: Vec<_> = upstreams
            .iter()
            .filter_map(|u| Some((u.name.clone(), u.discovery.clone()?)))
            .collect();
        if !statuses.is_empty() {
            // Until every Service has been listed once the gateway knows no endpoints and
            // would answer 503 to everything: keep it out of its Service until then. Later
            // watch errors keep the last known endpoints and do not flip readiness.
            readiness.add_check("discovery", move || {
                let unsynced: Vec<String> = statuses
                    .iter()
                    .filter(|(_, s)| !s.is_synced())
                    .map(|(name, s)| format!("{name} ({})", s.target.service))
                    .collect();
                async move {
                    if unsynced.is_empty() {
                        Ok(())
                    } else {
                        Err(format!(
                            "endpoints not listed yet for {}",
                            unsynced.join(", ")
                        ))
                    }
                }
            });
        }
        let shared = Arc::new(Shared {
            table,
            upstreams,
            options: Options {
                body_limit: config.server.body_limit as u64,
                upstream_timeout: config.server.request_timeout,
                connect_timeout: config.connect_timeout,
                access_log: config.access_log,
            },
            authenticator: shop_platform::Authenticator::new(&config.auth)?,
            cors: config.cors.clone(),
            limiter: config
                .rate_limit
                .map(|(rate, burst)| RateLimiter::new(rate, burst)),
            cache: (config.cache_bytes > 0).then(|| ResponseCache::new(config.cache_bytes)),
            metrics_gw,
            metrics,
            readiness,
            sampler: shop_platform::telemetry::Sampler::from_env(),
            spans: shop_platform::telemetry::SpanSink::get(),
            docs: Default::default(),
        });
        let authenticator = shared.authenticator.clone();
        shared.readiness.add_check("auth_keys", move || {
            let outcome = authenticator.check_keys();
            async move { outcome }
        });

        let requested = SocketAddr::new(config.server.host, config.server.port);
        let first = reuseport_listener(requested)
            .map_err(|e| anyhow::anyhow!("{NAME}: cannot listen on {requested}: {e}"))?;
        let local_addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..config.workers {
            listeners.push(reuseport_listener(local_addr)?);
        }
        Ok(Self {
            shared,
            listeners,
            local_addr,
            config,
            kube_client: None,
        })
    }

    /// The API client for kubernetes discovery (tests pass a mock); without one, `run`
    /// infers it like kubectl: in-cluster service account, else `KUBECONFIG`.
    pub fn with_kube_client(mut self, client: kube::Client) -> Self {
        self.kube_client = Some(client);
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let Gateway {
            shared,
            listeners,
            local_addr,
            config,
            kube_client,
        } = self;
        let _discovery = match &config.discovery {
            Discovery::Static => None,
            Discovery::Kubernetes { namespace, .. } => {
                let client = match kube_client {
                    Some(client) => client,
                    None => kube::Client::try_default().await.map_err(|e| {
                        anyhow::anyhow!("{NAME}: DISCOVERY=kubernetes needs API server access (in-cluster service account or KUBECONFIG): {e}")
                    })?,
                };
                let namespace = namespace
                    .clone()
                    .unwrap_or_else(|| client.default_namespace().to_owned());
                tracing::info!(service = NAME, namespace = %namespace, "discovering upstream endpoints from EndpointSlices");
                Some(AbortOnDrop(discovery::spawn(client, &namespace, &shared)))
            }
        };
        let stop_accepting = CancellationToken::new();
        let cut_off = CancellationToken::new();
        let mut workers = Vec::with_capacity(listeners.len());
        for (index, listener) in listeners.into_iter().enumerate() {
            let worker = WorkerSpec {
                shared: shared.clone(),
                listener,
                stop_accepting: stop_accepting.clone(),
                cut_off: cut_off.clone(),
                config: config.clone(),
            };
            workers.push(
                std::thread::Builder::new()
                    .name(format!("gateway-{index}"))
                    .spawn(move || worker.run())?,
            );
        }
        // Keeps the token signing keys fresh (a JWK set); the workers read them lock-free.
        let key_refresh = shared.authenticator.spawn_refresh();
        shared.readiness.set_started();
        tracing::info!(service = NAME, address = %local_addr, workers = workers.len(), "listening");

        shutdown.wait().await;
        shared.readiness.set_shutting_down();
        tracing::info!(
            service = NAME,
            delay_ms = config.server.shutdown_delay.as_millis() as u64,
            "not ready; serving on while load balancers catch up"
        );
        tokio::time::sleep(config.server.shutdown_delay).await;
        tracing::info!(
            service = NAME,
            timeout_ms = config.server.shutdown_timeout.as_millis() as u64,
            "no longer accepting connections; draining in-flight requests"
        );
        stop_accepting.cancel();
        let joined = tokio::task::spawn_blocking(move || {
            for worker in workers {
                let _ = worker.join();
            }
        });
        tokio::pin!(joined);
        tokio::select! {
            _ = &mut joined => {}
            () = tokio::time::sleep(config.server.shutdown_timeout) => {
                tracing::warn!(service = NAME, "drain timed out; cutting remaining connections");
                cut_off.cancel();
                let _ = joined.await;
            }
        }
        if let Some(refresh) = key_refresh {
            refresh.abort();
        }
        tracing::info!(service = NAME, "stopped");
        Ok(())
    }
}

/// Stops the watch tasks when the gateway stops.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

struct WorkerSpec {
    shared: Arc<Shared>,
    listener: TcpListener,
    stop_accepting: CancellationToken,
    cut_off: CancellationToken,
    config: Config,
}

impl WorkerSpec {
    fn run(self) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("worker runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, self.serve());
    }

    async fn serve(self) {
        let listener = match tokio::net::TcpListener::from_std(self.listener) {
            Ok(listener) => listener,
            Err(err) => {
                tracing::error!(error = %err, "worker cannot use its listener");
                return;
            }
        };
        let pool = Pool::new(
            self.config.max_idle,
            self.config.idle_timeout,
            self.config.connect_timeout,
        );
        pool.spawn_sweeper();
        let deadlines = Deadlines::new(Deadlines::resolution_for(
            self.config.server.request_timeout,
        ));
        deadlines.spawn_ticker();
        let readiness = self.shared.readiness.clone();
        let worker = Rc::new(Worker::new(self.shared, pool, deadlines));
        let connections = Rc::new(Connections::default());
        let front = Rc::new(Front {
            worker,
            header_read_timeout: self.config.header_read_timeout,
            connections: connections.clone(),
            readiness,
        });

        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = self.stop_accepting.cancelled() => break,
            };
            let _ = stream.set_nodelay(true);
            tokio::task::spawn_local(front.clone().serve(stream, Client::new(peer)));
        }
        drop(listener);
        connections.drain();
        front.worker.deadlines().expire_timers();
        tokio::select! {
            () = connections.drained() => {}
            () = self.cut_off.cancelled() => {}
        }
    }
}
