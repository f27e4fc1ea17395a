//! A gateway in-process on port 0 in front of stub upstreams.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use shop_gateway::Config;
use shop_platform::Shutdown;
use shop_platform::config::Env;

pub struct RunningGateway {
    pub url: String,
    pub addr: SocketAddr,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningGateway {
    /// `env` on top of test defaults (loopback, port 0, no delays, one worker).
    pub fn start(env: &[(&str, &str)]) -> Self {
        let mut pairs: Vec<(String, String)> = [
            ("HOST", "127.0.0.1"),
            ("PORT", "0"),
            ("SHUTDOWN_DELAY", "0s"),
            ("GATEWAY_WORKERS", "2"),
            ("ACCESS_LOG", "false"),
            // Proxying is tested here; access control in tests/auth.rs at the root.
            ("AUTH_MODE", "demo"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        pairs.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let config = Config::from_env(&Env::from_pairs(pairs)).expect("valid gateway config");
        let gateway = shop_gateway::build(config).expect("gateway binds");
        let addr = gateway.local_addr();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(gateway.run(shutdown.clone()));
        Self {
            url: format!("http://{addr}"),
            addr,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.unwrap().unwrap();
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let exposition = shop_platform::testing::parse_exposition(&text).unwrap();
        exposition
            .samples_of(name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }
}

/// Serves `router` on a loopback port; returns its base URL.
pub async fn stub(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    url
}

/// A counter shared with a stub's handlers.
#[derive(Clone, Default)]
pub struct Hits(Arc<AtomicUsize>);

impl Hits {
    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

pub fn closed_port_url() -> String {
    shop_platform::testing::closed_port_url()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}
