//! Checkouts begun and orders stored at the same time, as under load. On PostgreSQL the
//! calls made together share one statement; each must still get the answer it would
//! get alone, and store exactly what it would store alone.

use std::sync::Arc;

use futures_util::future::join_all;
use shop_order::SqlOrderStore;
use shop_order::domain::{Order, OrderEvent, OrderItem, units};
use shop_order::storage::{
    Checkout, CheckoutStart, IdempotencyRecord, MIGRATIONS, OrderStore, StoreError,
};
use shop_platform::events::{NewEvent, Outbox};
use shop_platform::testing::{Backend, TestDatabase};
use shop_platform::{Database, Money};

fn checkout(n: usize) -> Checkout {
    Checkout {
        reservation_id: format!("r-{n}"),
        order_id: format!("o-{n}"),
        started_at_ms: chrono::Utc::now().timestamp_millis(),
    }
}

/// Order `n`, with `n % 3 + 1` lines of `line + 1` units at `100 * (line + 1)` cents.
fn order(n: usize, id: &str) -> Order {
    let items: Vec<OrderItem> = (0..n % 3 + 1)
        .map(|line| {
            let quantity = line as i64 + 1;
            let unit_price = Money::from_cents(100 * quantity);
            OrderItem {
                product_id: format!("p-{line}"),
                name: format!("Product \"{line}\""),
                quantity,
                unit_price,
                line_total: Money::from_cents(unit_price.cents() * quantity),
            }
        })
        .collect();
    Order {
        id: id.to_owned(),
        user_id: format!("u-{}", n % 4),
        products: units(&items),
        total: Money::from_cents(items.iter().map(|i| i.line_total.cents()).sum()),
        items,
        status: "pending".into(),
        created_at: "2026-12-06T00:00:00Z".into(),
        version: 1,
        confirmed_at: None,
        cancelled_at: None,
        stock_returned_at: None,
        reservation_id: format!("r-{n}"),
    }
}

fn record(n: usize, order_id: &str) -> IdempotencyRecord {
    IdempotencyRecord {
        key: format!("key-{n}"),
        request_hash: format!("hash-{n}"),
        order_id: order_id.to_owned(),
        status: 201,
        response: format!("{{\"id\":\"{order_id}\"}}"),
    }
}

async fn count(db: &Database, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db.pool()).await.unwrap()
}

async fn a_burst_of_checkouts_gets_the_answers_each_would_get_alone(backend: Backend) {
    let dir = TestDatabase::new(backend).await;
    let db = dir.storage().open("order", &MIGRATIONS).await.unwrap();
    let store = Arc::new(SqlOrderStore::new(&db, Outbox::default()));

    // Before the burst: order 0 stored under key-0.
    assert_eq!(
        store
            .begin_checkout(&checkout(0), Some("key-0"))
            .await
            .unwrap(),
        CheckoutStart::Started
    );
    let first = NewEvent::new("order.placed", &OrderEvent::from(&order(0, "o-0")));
    store
        .create(&order(0, "o-0"), Some(&record(0, "o-0")), &first)
        .await
        .unwrap();

    // 1-30 begin at once; 31 again under order 0's id and 32 under its key are refused.
    let mut begins: Vec<(Checkout, Option<String>)> = (1..=30)
        .map(|n| (checkout(n), (n % 2 == 0).then(|| format!("key-{n}"))))
        .collect();
    begins.push((
        Checkout {
            order_id: "o-0".into(),
            ..checkout(31)
        },
        None,
    ));
    begins.push((checkout(32), Some("key-0".into())));
    let started = join_all(begins.iter().map(|(checkout, key)| {
        let store = store.clone();
        async move {
            store
                .begin_checkout(checkout, key.as_deref())
                .await
                .unwrap()
        }
    }))
    .await;
    for (n, start) in (1..=32).zip(&started) {
        let expected = if n <= 30 {
            CheckoutStart::Started
        } else {
            CheckoutStart::AlreadyPlaced
        };
        assert_eq!(*start, expected, "checkout {n}");
    }

    // Recovery takes checkout 30 over before its order is stored.
    sqlx::query("UPDATE checkouts SET started_at_ms = 0 WHERE reservation_id = 'r-30'")
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(store.claim_abandoned(1).await.unwrap(), vec!["r-30"]);

    // 1-30 stored at once: 29 under its own id (even ones keyed), 30 too late, and 29's
    // order reuses 28's id, so one of the two is a duplicate.
    let stores: Vec<(Order, Option<IdempotencyRecord>, NewEvent)> = (1..=30)
        .map(|n| {
            let id = if n == 29 {
                "o-28".into()
            } else {
                format!("o-{n}")
            };
            let order = order(n, &id);
            let record = (n % 2 == 0).then(|| record(n, &id));
            let event = NewEvent::new("order.placed", &OrderEvent::from(&order));
            (order, record, event)
        })
        .collect();
    let stored = join_all(stores.iter().map(|(order, record, event)| {
        let store = store.clone();
        async move { store.create(order, record.as_ref(), event).await }
    }))
    .await;
    let mut duplicates = 0;
    for (n, result) in (1..=30).zip(&stored) {
        match (n, result) {
            (28 | 29, Err(StoreError::DuplicateId(id))) if id == "o-28" => duplicates += 1,
            (28 | 29, Ok(())) => {}
            (30, Err(StoreError::CheckoutAbandoned)) => {}
            (n, Ok(())) if n < 28 => {}
            (n, other) => panic!("order {n}: {other:?}"),
        }
    }
    assert_eq!(duplicates, 1, "{stored:?}");

    // Stored: order 0 and 28 orders of the burst, each whole, nothing of the others.
    let o28 = store.get("o-28").await.unwrap().expect("o-28 stored once");
    let winner = if o28.reservation_id == "r-28" { 28 } else { 29 };
    for n in (0..30).filter(|n| *n != 28) {
        let id = if n == 29 {
            "o-28".into()
        } else {
            format!("o-{n}")
        };
        let n = if n == 29 { winner } else { n };
        let got = store
            .get(&id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id}"));
        assert_eq!(got, order(n, &id), "{id}");
    }
    assert_eq!(store.get("o-30").await.unwrap(), None);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM orders").await, 29);
    let lines: i64 = (1..=27)
        .chain([0, winner])
        .map(|n| (n % 3 + 1) as i64)
        .sum();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM order_items").await, lines);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbox").await, 29);
    // Keyed: 0 and the even ones of 2-28 (28 only if its order won).
    let keyed = 1 + (2..=26).step_by(2).count() as i64 + i64::from(winner == 28);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM idempotency_keys").await,
        keyed
    );
    for n in (2..=26).step_by(2) {
        let id = format!("o-{n}");
        assert_eq!(
            store.idempotency_record(&format!("key-{n}")).await.unwrap(),
            Some(record(n, &id))
        );
    }
    // Claimed checkouts are gone. Left: 30's, the recovery loop's now, and the losing
    // duplicate's, which nothing claimed (the request compensates it).
    assert_eq!(count(&db, "SELECT COUNT(*) FROM checkouts").await, 2);

    // On PostgreSQL the bursts went in groups, and the group with the duplicate failed
    // and ran each of its calls alone.
    let groups = db.write_groups();
    let (claims, stores) = ("checkout_claim", "order_store");
    if backend == Backend::Postgres {
        assert!(
            groups.calls(claims) > groups.groups(claims),
            "claims grouped"
        );
        assert!(
            groups.calls(stores) > groups.groups(stores),
            "stores grouped"
        );
        assert_eq!(groups.fallbacks(claims), 0);
        assert!(
            groups.fallbacks(stores) >= 1,
            "the duplicate's group ran alone"
        );
    } else {
        assert_eq!(groups.calls(claims) + groups.calls(stores), 0);
    }
    db.close().await;
}

/// A burst with nothing wrong in it is stored in groups, none of which falls back to
/// running its calls alone: the grouped statements themselves work, and every order
/// reads back whole (lines, idempotency record, event).
async fn a_clean_burst_of_orders_is_stored_in_groups(backend: Backend) {
    let dir = TestDatabase::new(backend).await;
    let db = dir.storage().open("order", &MIGRATIONS).await.unwrap();
    let store = Arc::new(SqlOrderStore::new(&db, Outbox::default()));
    let checkouts: Vec<Checkout> = (1..=24).map(checkout).collect();
    let started = join_all(checkouts.iter().map(|checkout| {
        let store = store.clone();
        let key = format!("key-{}", checkout.order_id);
        async move { store.begin_checkout(checkout, Some(&key)).await.unwrap() }
    }))
    .await;
    assert!(started.iter().all(|start| *start == CheckoutStart::Started));

    let stores: Vec<(Order, IdempotencyRecord, NewEvent)> = (1..=24)
        .map(|n| {
            let order = order(n, &format!("o-{n}"));
            let record = record(n, &order.id);
            let event = NewEvent::new("order.placed", &OrderEvent::from(&order));
            (order, record, event)
        })
        .collect();
    let stored = join_all(stores.iter().map(|(order, record, event)| {
        let store = store.clone();
        async move { store.create(order, Some(record), event).await }
    }))
    .await;
    assert!(stored.iter().all(Result::is_ok), "{stored:?}");

    for (order, record, _) in &stores {
        let got = store.get(&order.id).await.unwrap().expect("stored");
        assert_eq!(got.items, order.items, "{}", order.id);
        assert_eq!(got.total, order.total);
        let kept = store
            .idempotency_record(&record.key)
            .await
            .unwrap()
            .expect("its idempotency record");
        assert_eq!(kept.response, record.response);
    }
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbox").await, 24);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM checkouts").await, 0);

    let groups = db.write_groups();
    let (claims, stores) = ("checkout_claim", "order_store");
    if backend == Backend::Postgres {
        for write in [claims, stores] {
            assert!(
                groups.calls(write) > groups.groups(write),
                "{write} grouped"
            );
            assert_eq!(groups.fallbacks(write), 0, "{write} fell back");
        }
    } else {
        assert_eq!(groups.calls(claims) + groups.calls(stores), 0);
    }
    db.close().await;
}

shop_platform::backend_tests!(
    a_burst_of_checkouts_gets_the_answers_each_would_get_alone,
    a_clean_burst_of_orders_is_stored_in_groups
);
