//! The catalogue in memory. Each product's JSON is rendered once per change and each
//! page once per catalogue version, both tagged for `If-None-Match`; a read touches no
//! database.
//!
//! How fresh a replica's copy is:
//! - the replica that writes (create, update, a reservation or its release) updates its
//!   copy before it answers, so its client reads its own write;
//! - on PostgreSQL a trigger announces every committed change with the new row
//!   (`NOTIFY catalogue`), and every replica applies it as it arrives: milliseconds.
//!   Grouped reservations are announced by their writer after the commit instead: at
//!   once after a quiet period, else the newest row per product at the end of it (20 ms;
//!   storage.rs);
//! - every `CATALOGUE_RESYNC` each replica re-reads the whole catalogue (PostgreSQL), or
//!   checks whether another connection committed and re-reads if so (SQLite). A lost
//!   notification or a listener reconnecting after a database restart therefore leaves
//!   a replica stale for at most that long.
//!
//! Rows carry `rev`, which every write raises, so an older row never replaces a newer one
//! whatever order the three sources deliver them in. Stock shown here is for display:
//! reservations are decided by the database alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use prometheus::{IntCounter, IntCounterVec, IntGauge};
use shop_platform::conditional::tag_of;
use shop_platform::{Metrics, Representation, Watch, WatchEvent};

use crate::domain::Product;
use crate::storage::{Announcement, ProductRow, ProductStore};

/// Where a row came from; the label of `catalogue_changes_applied_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This replica's own write, as committed.
    Write,
    /// Another writer's commit, announced by PostgreSQL.
    Notification,
    /// A read of one product the copy did not have yet.
    Lookup,
    /// A full re-read.
    Reload,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Write => "write",
            Source::Notification => "notification",
            Source::Lookup => "lookup",
            Source::Reload => "reload",
        }
    }
}

/// One product, rendered when first read: under the order load every reservation
/// replaces its product's entry, and most are replaced again before anyone reads them
/// (rendering and tagging each was 7% of the product service's instructions an order).
#[derive(Clone)]
pub struct Entry {
    row: ProductRow,
    representation: OnceLock<Representation>,
    /// A full re-read found the database behind this entry. A read racing this
    /// replica's own write can do that once; a second re-read in a row that agrees means
    /// the database itself went back (restored), and then it wins.
    doubted: bool,
}

impl Entry {
    fn new(row: ProductRow) -> Self {
        Self {
            representation: OnceLock::new(),
            row,
            doubted: false,
        }
    }

    pub fn product(&self) -> &Product {
        &self.row.product
    }

    pub fn representation(&self) -> &Representation {
        self.representation.get_or_init(|| {
            let body = serde_json::to_vec(&self.row.product).expect("a product serializes");
            Representation::json(body)
        })
    }
}

/// One page of the listing, rendered.
pub struct RenderedPage {
    pub representation: Representation,
    /// The `seq` to continue after, when more products follow.
    pub next_after: Option<i64>,
}

#[derive(Default)]
struct State {
    by_seq: BTreeMap<i64, Arc<Entry>>,
    by_id: HashMap<String, Arc<Entry>>,
    version: u64,
}

/// Pages rendered for the current version. Bounded: cursors are client-chosen.
#[derive(Default)]
struct Pages {
    version: u64,
    rendered: HashMap<(i64, u32), Arc<RenderedPage>>,
}

const MAX_CACHED_PAGES: usize = 64;

struct Meters {
    products: IntGauge,
    applied: IntCounterVec,
    reloads_failed: IntCounter,
}

pub struct Catalogue {
    state: RwLock<State>,
    version: AtomicU64,
    pages: Mutex<Pages>,
    meters: Meters,
}

impl Catalogue {
    /// A copy holding `rows` (the catalogue as read at start-up).
    pub fn new(rows: Vec<ProductRow>, metrics: &Metrics) -> Self {
        let catalogue = Self {
            state: RwLock::default(),
            version: AtomicU64::new(0),
            pages: Mutex::default(),
            meters: Meters {
                products: metrics.gauge(
                    "catalogue_products",
                    "Products in this replica's in-memory catalogue.",
                ),
                applied: metrics.counter_vec(
                    "catalogue_changes_applied_total",
                    "Product rows that changed this replica's catalogue, by source (write, notification, lookup, reload).",
                    "source",
                    &["write", "notification", "lookup", "reload"],
                ),
                reloads_failed: metrics.counter(
                    "catalogue_reloads_failed_total",
                    "Full re-reads of the catalogue that failed (the copy is kept as it was).",
                ),
            },
        };
        catalogue.replace_all(rows);
        catalogue
    }

    pub async fn load(store: &dyn ProductStore, metrics: &Metrics) -> anyhow::Result<Self> {
        Ok(Self::new(store.all().await?, metrics))
    }

    pub fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.state
            .read()
            .expect("not poisoned")
            .by_id
            .get(id)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.state.read().expect("not poisoned").by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `limit` products after `seq`, rendered once per catalogue version.
    pub fn page(&self, after: i64, limit: u32) -> Arc<RenderedPage> {
        let key = (after, limit);
        let version = self.version.load(Ordering::Acquire);
        {
            let pages = self.pages.lock().expect("not poisoned");
            if pages.version == version
                && let Some(page) = pages.rendered.get(&key)
            {
                return page.clone();
            }
        }
        let (page, version) = {
            let state = self.state.read().expect("not poisoned");
            (Arc::new(render(&state, after, limit)), state.version)
        };
        let mut pages = self.pages.lock().expect("not poisoned");
        if pages.version < version {
            pages.rendered.clear();
            pages.version = version;
        }
        if pages.version == version && pages.rendered.len() < MAX_CACHED_PAGES {
            pages.rendered.insert(key, page.clone());
        }
        page
    }

    /// Takes rows from a write, a notification or a lookup: each replaces the entry it
    /// is newer than.
    pub fn apply(&self, rows: impl IntoIterator<Item = ProductRow>, source: Source) {
        let mut state = self.state.write().expect("not poisoned");
        let changed = rows
            .into_iter()
            .map(|row| u64::from(upsert(&mut state, row, false)))
            .sum();
        self.changed(&mut state, changed, source);
    }

    /// [`Catalogue::apply`] for one row; returns the product's entry as it stands
    /// afterwards (this row's, or a newer one already held).
    pub fn apply_one(&self, row: ProductRow, source: Source) -> Arc<Entry> {
        let id = row.product.id.clone();
        let mut state = self.state.write().expect("not poisoned");
        let changed = u64::from(upsert(&mut state, row, false));
        self.changed(&mut state, changed, source);
        state.by_id[&id].clone()
    }

    /// Takes a full re-read of the database as the truth, except where it is older than
    /// the copy for the first time (see [`Entry::doubted`]).
    pub fn replace_all(&self, rows: Vec<ProductRow>) {
        let mut state = self.state.write().expect("not poisoned");
        let mut changed = 0;
        let mut seen = HashSet::with_capacity(rows.len());
        for row in rows {
            seen.insert(row.product.id.clone());
            if upsert(&mut state, row, true) {
                changed += 1;
            }
        }
        let missing: Vec<Arc<Entry>> = state
            .by_id
            .values()
            .filter(|entry| !seen.contains(&entry.row.product.id))
            .cloned()
            .collect();
        for entry in missing {
            if entry.doubted {
                state.by_id.remove(&entry.row.product.id);
                state.by_seq.remove(&entry.row.seq);
                changed += 1;
            } else {
                put(
                    &mut state,
                    Arc::new(Entry {
                        doubted: true,
                        ..(*entry).clone()
                    }),
                );
            }
        }
        self.changed(&mut state, changed, Source::Reload);
    }

    fn changed(&self, state: &mut State, rows: u64, source: Source) {
        if rows == 0 {
            return;
        }
        state.version += 1;
        self.version.store(state.version, Ordering::Release);
        self.meters.products.set(state.by_id.len() as i64);
        self.meters
            .applied
            .with_label_values(&[source.label()])
            .inc_by(rows);
    }

    /// Re-reads the whole catalogue; on failure the copy stays as it is.
    pub async fn reload(&self, store: &dyn ProductStore) {
        match store.all().await {
            Ok(rows) => self.replace_all(rows),
            Err(err) => {
                self.meters.reloads_failed.inc();
                tracing::warn!(error = %err, "cannot re-read the catalogue; serving the copy held");
            }
        }
    }
}

/// Puts `row` in unless the copy holds something at least as new. Returns whether the
/// copy changed.
fn upsert(state: &mut State, row: ProductRow, reload: bool) -> bool {
    if let Some(current) = state.by_id.get(&row.product.id).cloned() {
        if current.row == row {
            if current.doubted {
                put(state, Arc::new(Entry::new(row)));
            }
            return false;
        }
        // The same rev with other values: a writer that did not count (a hand edit).
        let newer = row.rev >= current.row.rev;
        if !newer {
            if reload && !current.doubted {
                put(
                    state,
                    Arc::new(Entry {
                        doubted: true,
                        ..(*current).clone()
                    }),
                );
                return false;
            }
            if !reload {
                return false;
            }
        }
        if current.row.seq != row.seq {
            state.by_seq.remove(&current.row.seq);
        }
    }
    put(state, Arc::new(Entry::new(row)));
    true
}

fn put(state: &mut State, entry: Arc<Entry>) {
    state.by_seq.insert(entry.row.seq, entry.clone());
    state
        .by_id
        .insert(entry.row.product.id.clone(), entry.clone());
}

fn render(state: &State, after: i64, limit: u32) -> RenderedPage {
    let limit = limit as usize;
    let mut entries: Vec<&Arc<Entry>> = state
        .by_seq
        .range((Bound::Excluded(after), Bound::Unbounded))
        .map(|(_, entry)| entry)
        .take(limit + 1)
        .collect();
    let next_after = (entries.len() > limit).then(|| {
        entries.truncate(limit);
        entries.last().map_or(after, |e| e.row.seq)
    });
    let size = entries
        .iter()
        .map(|e| e.representation().body().len() + 1)
        .sum::<usize>();
    let mut body = Vec::with_capacity(size + 2);
    body.push(b'[');
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(entry.representation().body());
    }
    body.push(b']');
    // The page's tag from its items' tags (each already a digest of its bytes) and from
    // whether a next page exists, which the response's headers announce.
    let next = next_after.map(|seq| seq.to_string()).unwrap_or_default();
    let tag = tag_of(
        entries
            .iter()
            .map(|e| e.representation().etag().as_bytes())
            .chain([b"next:".as_slice(), next.as_bytes()]),
    );
    RenderedPage {
        representation: Representation::json_tagged(body, &tag),
        next_after,
    }
}

/// Applies what `watch` reports, for as long as the service runs.
pub async fn keep_fresh(catalogue: Arc<Catalogue>, store: Arc<dyn ProductStore>, mut watch: Watch) {
    loop {
        match watch.next().await {
            WatchEvent::Notified(payloads) => {
                let mut rows = Vec::with_capacity(payloads.len());
                let mut partial = false;
                for payload in &payloads {
                    match serde_json::from_str::<Announcement>(payload) {
                        Ok(announced) => rows.push(ProductRow::from(announced)),
                        // A row too large for a notification is announced by id alone.
                        Err(_) => partial = true,
                    }
                }
                catalogue.apply(rows, Source::Notification);
                if partial {
                    catalogue.reload(store.as_ref()).await;
                }
            }
            WatchEvent::Resync => catalogue.reload(store.as_ref()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use shop_platform::Money;

    use super::*;

    fn row(seq: i64, id: &str, rev: i64, quantity: i64) -> ProductRow {
        ProductRow {
            seq,
            rev,
            product: Product {
                id: id.into(),
                name: format!("product {id}"),
                price: Money::from_cents(100),
                quantity,
            },
        }
    }

    fn quantity(catalogue: &Catalogue, id: &str) -> Option<i64> {
        catalogue.get(id).map(|e| e.product().quantity)
    }

    fn body(page: &RenderedPage) -> serde_json::Value {
        serde_json::from_slice(page.representation.body()).unwrap()
    }

    #[test]
    fn an_older_row_never_replaces_a_newer_one() {
        let c = Catalogue::new(vec![row(1, "a", 1, 10)], &Metrics::new("t"));
        c.apply([row(1, "a", 3, 7)], Source::Write);
        // The entry handed back is the newer one held, not the stale row.
        let held = c.apply_one(row(1, "a", 2, 8), Source::Notification);
        assert_eq!(held.product().quantity, 7);
        assert_eq!(quantity(&c, "a"), Some(7));
        // A hand edit keeps the rev: same rev, other values, taken.
        c.apply([row(1, "a", 3, 5)], Source::Notification);
        assert_eq!(quantity(&c, "a"), Some(5));
    }

    #[test]
    fn a_reload_behind_the_copy_wins_only_the_second_time() {
        let c = Catalogue::new(vec![row(1, "a", 1, 10)], &Metrics::new("t"));
        c.apply([row(1, "a", 2, 9), row(2, "b", 1, 1)], Source::Write);
        // The re-read started before this replica's write committed: ignored once.
        c.replace_all(vec![row(1, "a", 1, 10)]);
        assert_eq!(quantity(&c, "a"), Some(9));
        assert_eq!(quantity(&c, "b"), Some(1));
        // The database agrees with the copy again: the doubt is gone.
        c.replace_all(vec![row(1, "a", 2, 9), row(2, "b", 1, 1)]);
        c.replace_all(vec![row(1, "a", 1, 10)]);
        assert_eq!(quantity(&c, "a"), Some(9));
        // Two re-reads in a row say the database went back (a restore): it wins.
        c.replace_all(vec![row(1, "a", 1, 10)]);
        assert_eq!(quantity(&c, "a"), Some(10));
        assert_eq!(quantity(&c, "b"), None);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn pages_follow_seq_order_and_change_tag_with_content() {
        let c = Catalogue::new(
            vec![row(1, "a", 1, 1), row(2, "b", 1, 2), row(5, "c", 1, 3)],
            &Metrics::new("t"),
        );
        let first = c.page(0, 2);
        assert_eq!(body(&first)[0]["id"], "a");
        assert_eq!(body(&first)[1]["id"], "b");
        assert_eq!(first.next_after, Some(2));
        let rest = c.page(2, 2);
        assert_eq!(body(&rest).as_array().unwrap().len(), 1);
        assert_eq!(rest.next_after, None);
        let whole = c.page(0, 50);
        assert_eq!(
            whole.representation.body().as_ref(),
            serde_json::to_vec(&[
                c.get("a").unwrap().product(),
                c.get("b").unwrap().product(),
                c.get("c").unwrap().product()
            ])
            .unwrap()
        );
        // Cached until something changes, then rendered anew with a new tag.
        assert!(Arc::ptr_eq(&whole, &c.page(0, 50)));
        c.apply([row(2, "b", 2, 0)], Source::Notification);
        let after = c.page(0, 50);
        assert_ne!(after.representation.etag(), whole.representation.etag());
        assert_eq!(body(&after)[1]["quantity"], 0);
        // A page whose items did not change keeps its tag.
        assert_eq!(
            c.page(2, 2).representation.etag(),
            rest.representation.etag()
        );
    }

    #[test]
    fn the_same_rows_give_the_same_tags_on_every_replica() {
        let rows = vec![row(1, "a", 4, 1), row(2, "b", 1, 2)];
        let one = Catalogue::new(rows.clone(), &Metrics::new("t"));
        let two = Catalogue::new(Vec::new(), &Metrics::new("t"));
        two.apply(rows.into_iter().rev(), Source::Notification);
        assert_eq!(
            one.page(0, 50).representation.etag(),
            two.page(0, 50).representation.etag()
        );
        assert_eq!(
            one.get("a").unwrap().representation().etag(),
            two.get("a").unwrap().representation().etag()
        );
    }

    #[test]
    fn an_announcement_parses_into_a_row() {
        let payload = r#"{"seq" : 7, "id" : "k", "name" : "Key", "price_cents" : 4990, "quantity" : 3, "rev" : 9}"#;
        let row = ProductRow::from(serde_json::from_str::<Announcement>(payload).unwrap());
        assert_eq!((row.seq, row.rev, row.product.quantity), (7, 9, 3));
        assert_eq!(row.product.price, Money::from_cents(4990));
        assert!(serde_json::from_str::<Announcement>(r#"{"id" : "k"}"#).is_err());
    }
}
