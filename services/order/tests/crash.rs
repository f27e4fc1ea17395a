//! `kill -9` of the order service in the middle of a stream of orders. After a restart on
//! the same database every order that was acknowledged is there, and stock adds up:
//! what is left plus what the stored orders hold is what there was. Checkouts cut off
//! between reserving and storing are rolled back by the recovery loop.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Peers;
use serde_json::{Value, json};
use shop_platform::testing::{Backend, ServiceProcess, TestDatabase};

const STOCK: i64 = 100_000;

fn start_order(db: &TestDatabase, peers: &Peers) -> ServiceProcess {
    let (db_var, db_value) = db.env();
    ServiceProcess::spawn(
        Command::new(env!("CARGO_BIN_EXE_order"))
            .env_clear()
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("AUTH_MODE", "demo")
            .env("RUST_LOG", "warn,shop_platform::server=info")
            .env(db_var, db_value)
            .env("PRODUCT_URL", &peers.product.url)
            .env("USER_URL", &peers.user.url)
            .env("CHECKOUT_TIMEOUT", "1s"),
    )
}

/// Every stored order, following the cursor.
async fn all_orders(http: &reqwest::Client, url: &str) -> Vec<Value> {
    let mut orders = Vec::new();
    let mut next = format!("{url}/orders?limit=100");
    loop {
        let response = http.get(&next).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let cursor = response
            .headers()
            .get("x-next-cursor")
            .map(|c| c.to_str().unwrap().to_owned());
        let page: Vec<Value> = response.json().await.unwrap();
        orders.extend(page);
        match cursor {
            Some(cursor) => next = format!("{url}/orders?limit=100&cursor={cursor}"),
            None => return orders,
        }
    }
}

async fn kill_9_mid_stream_loses_no_order_and_no_stock(backend: Backend) {
    let peers = Peers::start(backend).await;
    let patched = peers
        .http
        .patch(format!("{}/products/2", peers.product.url))
        .json(&json!({"quantity": STOCK}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let db = peers.order_db().await;
    let mut order = start_order(&db, &peers);

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let killed = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..12)
        .map(|worker| {
            let (http, url, killed) = (http.clone(), order.url(), killed.clone());
            tokio::spawn(async move {
                let (mut acknowledged, mut cut_off) = (Vec::new(), 0);
                for n in 0.. {
                    let id = format!("crash-{worker}-{n}");
                    let sent = http
                        .post(format!("{url}/orders"))
                        .json(&json!({"id": id, "user_id": "1",
                                      "items": [{"product_id": "2", "quantity": 1 + n % 3}]}))
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status() == 201 => acknowledged.push(id),
                        Ok(r) => panic!("{id}: unexpected {}", r.status()),
                        Err(_) => cut_off += 1,
                    }
                    if killed.load(Ordering::SeqCst) {
                        break;
                    }
                }
                (acknowledged, cut_off)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    order.child.kill().unwrap(); // SIGKILL
    order.child.wait().unwrap();
    killed.store(true, Ordering::SeqCst);
    let mut acknowledged = Vec::new();
    let mut cut_off = 0;
    for worker in workers {
        let (ids, errors) = worker.await.unwrap();
        acknowledged.extend(ids);
        cut_off += errors;
    }
    assert!(!acknowledged.is_empty(), "orders flowed before the kill");
    assert!(cut_off > 0, "the kill landed mid-stream");

    let order = start_order(&db, &peers);
    for id in &acknowledged {
        let r = http
            .get(format!("{}/orders/{id}", order.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged order {id} lost");
    }
    // Checkouts cut off by the kill hold stock until recovery (CHECKOUT_TIMEOUT=1s)
    // releases it; then stock plus ordered units must be exactly the starting stock.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let orders = all_orders(&http, &order.url()).await;
        let ordered: i64 = orders
            .iter()
            .flat_map(|o| o["items"].as_array().unwrap().clone())
            .map(|item| item["quantity"].as_i64().unwrap())
            .sum();
        let left = peers.stock("2").await;
        assert!(
            ordered + left <= STOCK,
            "stock double-counted: {left} left, {ordered} ordered"
        );
        if ordered + left == STOCK {
            assert!(orders.len() >= acknowledged.len());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stock lost: {left} left + {ordered} ordered != {STOCK}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

shop_platform::backend_tests!(kill_9_mid_stream_loses_no_order_and_no_stock);
