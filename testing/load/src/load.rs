//! The load generator: a steady mix of product reads and order creations through the
//! gateway, until a stop file appears; then every acknowledged order is looked up.
//!
//! Each order carries its own `Idempotency-Key`. With `--retry-failed true` a failed order
//! is sent again with the same key and body until it is acknowledged, as a careful client
//! would after a crash; the check then shows whether any order was stored twice.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use crate::{Args, log};

#[derive(Default)]
struct Record {
    /// Completion times (since start) of successful responses.
    successes: Vec<Duration>,
    errors: Vec<(Duration, String)>,
    reads: usize,
    writes: usize,
    /// Idempotency key -> order id, for every acknowledged order.
    acknowledged: BTreeMap<String, String>,
    /// Keys whose order was never acknowledged (no retry, or retries exhausted).
    unacknowledged: Vec<String>,
}

struct Load {
    http: Client,
    url: String,
    token: String,
    product: String,
    started: Instant,
    record: Mutex<Record>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

async fn send(request: reqwest::RequestBuilder) -> Result<(StatusCode, Value), String> {
    let response = request.send().await.map_err(|e| error_chain(&e))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| error_chain(&e))?;
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok((status, value))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A call that must succeed during set-up (retried for up to a minute).
async fn setup(
    http: &Client,
    what: &str,
    build: impl Fn(&Client) -> reqwest::RequestBuilder,
) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match send(build(http)).await {
            Ok((status, body)) if status.is_success() => return Ok(body),
            outcome if Instant::now() > deadline => bail!("{what}: {outcome:?}"),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

impl Load {
    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    async fn timed(&self, request: reqwest::RequestBuilder) -> Result<(StatusCode, Value), String> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let outcome = match send(request).await {
            Ok((status, body)) if status.is_success() => Ok((status, body)),
            Ok((status, body)) => Err(format!("HTTP {status}: {body}")),
            Err(e) => Err(e),
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let at = self.elapsed();
        let mut record = self.record.lock().expect("record");
        match &outcome {
            Ok(_) => record.successes.push(at),
            Err(e) => record.errors.push((at, e.clone())),
        }
        outcome
    }

    async fn read(&self) {
        self.record.lock().expect("record").reads += 1;
        let _ = self
            .timed(
                self.http
                    .get(format!("{}/api/v1/products?limit=20", self.url)),
            )
            .await;
    }

    async fn order(&self, retry: bool) {
        let key = uuid::Uuid::new_v4().to_string();
        let body = json!({"products": [self.product]});
        for attempt in 0..30 {
            self.record.lock().expect("record").writes += 1;
            let request = self
                .http
                .post(format!("{}/api/v1/orders", self.url))
                .bearer_auth(&self.token)
                .header("Idempotency-Key", &key)
                .json(&body);
            match self.timed(request).await {
                Ok((_, order)) => {
                    let id = order["id"].as_str().unwrap_or_default().to_owned();
                    self.record
                        .lock()
                        .expect("record")
                        .acknowledged
                        .insert(key, id);
                    return;
                }
                Err(_) if retry && attempt < 29 => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(_) => break,
            }
        }
        self.record.lock().expect("record").unacknowledged.push(key);
    }
}

pub async fn run(args: Args) -> Result<()> {
    let url = args.get("url")?.trim_end_matches('/').to_owned();
    let stop_file = PathBuf::from(args.get("stop-file")?);
    let report_file = PathBuf::from(args.get("report")?);
    let concurrency: usize = args.get_or("concurrency", "4").parse()?;
    let rate: f64 = args.get_or("rate", "40").parse()?;
    let retry = args.get_or("retry-failed", "false") == "true";
    let admin_email = args.get("admin-email")?.to_owned();
    let admin_password = std::fs::read_to_string(args.get("admin-password-file")?)?
        .trim()
        .to_owned();
    let http = Client::builder()
        .timeout(Duration::from_secs(15))
        .connect_timeout(Duration::from_secs(3))
        .build()?;

    // An admin puts a product with plenty of stock; a customer orders it.
    let admin = setup(&http, "admin login", |h| {
        h.post(format!("{url}/api/v1/auth/login"))
            .json(&json!({"email": admin_email, "password": admin_password}))
    })
    .await?;
    let admin_token = admin["access_token"]
        .as_str()
        .context("no admin token")?
        .to_owned();
    let product = setup(&http, "create product", |h| {
        h.post(format!("{url}/api/v1/products"))
            .bearer_auth(&admin_token)
            .json(&json!({"name": "Rollout load", "price": 1.25, "quantity": 1_000_000_000}))
    })
    .await?;
    let product = product["id"].as_str().context("no product id")?.to_owned();
    let email = format!("load-{}@shop.local", uuid::Uuid::new_v4().simple());
    let password = uuid::Uuid::new_v4().to_string();
    setup(&http, "register customer", |h| {
        h.post(format!("{url}/api/v1/users"))
            .json(&json!({"name": "Load Generator", "email": email, "password": password}))
    })
    .await?;
    let login = setup(&http, "customer login", |h| {
        h.post(format!("{url}/api/v1/auth/login"))
            .json(&json!({"email": email, "password": password}))
    })
    .await?;
    let token = login["access_token"]
        .as_str()
        .context("no token")?
        .to_owned();

    let load = Arc::new(Load {
        http,
        url: url.clone(),
        token,
        product,
        started: Instant::now(),
        record: Mutex::default(),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
    });
    // Ready marker for the harness: set-up is done, the steady load starts now.
    std::fs::write(report_file.with_extension("started"), b"")?;
    log!("load: {concurrency} workers, {rate} requests/s, every 4th an order");

    let interval = Duration::from_secs_f64(concurrency as f64 / rate);
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let load = load.clone();
        let stop_file = stop_file.clone();
        workers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = w;
            while !stop_file.exists() {
                tick.tick().await;
                if n % 4 == 3 {
                    load.order(retry).await;
                } else {
                    load.read().await;
                }
                n += 1;
            }
        }));
    }
    for worker in workers {
        worker.await?;
    }
    let duration = load.elapsed();

    // Every order of the customer, page by page.
    let mut stored: HashMap<String, usize> = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        // Cursors are opaque URL-safe tokens issued by the API.
        let page_url = match &cursor {
            Some(c) => format!("{url}/api/v1/orders?limit=100&cursor={c}"),
            None => format!("{url}/api/v1/orders?limit=100"),
        };
        // The check runs right after a disruption (a database back a moment ago, a breaker
        // still open): a page that fails is asked for again, for up to a minute.
        let deadline = Instant::now() + Duration::from_secs(60);
        let response = loop {
            let outcome = load
                .http
                .get(&page_url)
                .bearer_auth(&load.token)
                .send()
                .await;
            match outcome {
                Ok(response) if response.status().is_success() => break response,
                Ok(response) if Instant::now() > deadline => {
                    bail!("listing orders: {}", response.status())
                }
                Err(e) if Instant::now() > deadline => bail!("listing orders: {}", error_chain(&e)),
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        cursor = response
            .headers()
            .get("x-next-cursor")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let page: Vec<Value> = response.json().await?;
        for order in page {
            *stored
                .entry(order["id"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        if cursor.is_none() {
            break;
        }
    }

    let record = load.record.lock().expect("record");
    let mut successes = record.successes.clone();
    successes.sort();
    let longest_gap = successes
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let acknowledged: Vec<&String> = record.acknowledged.values().collect();
    let missing = acknowledged
        .iter()
        .filter(|id| !stored.contains_key(id.as_str()))
        .count();
    let repeated = stored.values().filter(|n| **n > 1).count();
    let acked: std::collections::HashSet<&str> = acknowledged.iter().map(|s| s.as_str()).collect();
    let extra = stored
        .keys()
        .filter(|id| !acked.contains(id.as_str()))
        .count();
    let report = json!({
        "duration_s": duration.as_secs_f64(),
        "requests": record.reads + record.writes,
        "reads": record.reads,
        "writes": record.writes,
        "errors": record.errors.len(),
        "error_samples": record.errors.iter().take(20)
            .map(|(at, e)| format!("{:.3}s {e}", at.as_secs_f64())).collect::<Vec<_>>(),
        "error_times_s": record.errors.iter().map(|(at, _)| at.as_secs_f64()).collect::<Vec<_>>(),
        "error_kinds": error_kinds(&record.errors),
        "longest_gap_ms": longest_gap.as_millis() as u64,
        "max_in_flight": load.max_in_flight.load(Ordering::SeqCst),
        "concurrency": concurrency,
        "orders_acknowledged": acknowledged.len(),
        "orders_unacknowledged": record.unacknowledged.len(),
        "orders_stored": stored.values().sum::<usize>(),
        "orders_missing": missing,
        "orders_stored_twice": repeated,
        "orders_stored_unacknowledged": extra,
    });
    std::fs::write(&report_file, serde_json::to_vec_pretty(&report)?)?;
    log!(
        "load: {} requests, {} errors, longest gap {} ms",
        report["requests"],
        report["errors"],
        report["longest_gap_ms"]
    );
    Ok(())
}

/// Failures grouped by what happened: the gateway's error code and message, or the last
/// cause of a transport error.
fn error_kinds(errors: &[(Duration, String)]) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for (_, error) in errors {
        let kind = match error.split_once(": ") {
            Some((status, body)) if status.starts_with("HTTP ") => {
                let body: Value = serde_json::from_str(body).unwrap_or(Value::Null);
                format!(
                    "{status} {}: {}",
                    body["error"]["code"].as_str().unwrap_or("?"),
                    body["error"]["message"]
                        .as_str()
                        .unwrap_or(body.to_string().as_str())
                )
            }
            _ => error.rsplit(": ").next().unwrap_or(error).to_owned(),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_grouped_by_cause() {
        let errors = [
            (Duration::ZERO, "error sending request for url (http://x/): client error (SendRequest): connection closed before message completed".to_owned()),
            (Duration::ZERO, r#"HTTP 502 Bad Gateway: {"error":{"code":"bad_gateway","message":"order closed the connection without answering"}}"#.to_owned()),
            (Duration::ZERO, r#"HTTP 502 Bad Gateway: {"error":{"code":"bad_gateway","message":"order closed the connection without answering"}}"#.to_owned()),
        ];
        let kinds = error_kinds(&errors);
        assert_eq!(kinds["connection closed before message completed"], 1);
        assert_eq!(
            kinds["HTTP 502 Bad Gateway bad_gateway: order closed the connection without answering"],
            2
        );
    }
}
