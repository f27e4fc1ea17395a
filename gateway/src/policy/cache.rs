//! Optional shared cache for GET responses that upstreams mark cacheable
//! (`Cache-Control: max-age=N`, not `private`/`no-store`/`no-cache`, no `Vary`, no
//! `Set-Cookie`, a known small size). Bounded in bytes; oldest entries go first. Every
//! cached entry has an `ETag` (the upstream's, or one computed from the body), so clients
//! revalidating with `If-None-Match` get a bodiless 304.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};

pub struct ResponseCache {
    max_bytes: usize,
    max_entry: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Arc<Entry>>,
    order: VecDeque<String>,
    bytes: usize,
}

#[derive(Debug)]
pub struct Entry {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub etag: HeaderValue,
    expires: Instant,
}

impl Entry {
    pub fn age_left(&self, now: Instant) -> Duration {
        self.expires.saturating_duration_since(now)
    }

    /// The request's `If-None-Match` lists this entry's tag (or `*`); weak comparison.
    pub fn matches(&self, if_none_match: Option<&HeaderValue>) -> bool {
        let Some(list) = if_none_match.and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let ours = self
            .etag
            .to_str()
            .unwrap_or_default()
            .trim_start_matches("W/");
        list.split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || tag.trim_start_matches("W/") == ours)
    }
}

/// May this request be answered from, or stored in, a shared cache?
pub fn request_is_cacheable(method: &Method, headers: &HeaderMap) -> bool {
    *method == Method::GET && !headers.contains_key(header::AUTHORIZATION)
}

/// How long a response may be cached, if at all.
pub fn freshness(
    status: StatusCode,
    headers: &HeaderMap,
    max_entry: usize,
) -> Option<(Duration, usize)> {
    if status != StatusCode::OK
        || headers.contains_key(header::SET_COOKIE)
        || headers.contains_key(header::VARY)
    {
        return None;
    }
    let length: usize = headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    if length > max_entry {
        return None;
    }
    let control = headers
        .get(header::CACHE_CONTROL)?
        .to_str()
        .ok()?
        .to_ascii_lowercase();
    let mut max_age = None;
    for directive in control.split(',').map(str::trim) {
        match directive {
            "private" | "no-store" | "no-cache" => return None,
            d => {
                if let Some(secs) = d
                    .strip_prefix("s-maxage=")
                    .or_else(|| d.strip_prefix("max-age="))
                {
                    let secs: u64 = secs.trim_matches('"').parse().ok()?;
                    // s-maxage is for shared caches and wins over max-age.
                    if d.starts_with("s-maxage=") || max_age.is_none() {
                        max_age = Some(secs);
                    }
                }
            }
        }
    }
    max_age
        .filter(|s| *s > 0)
        .map(|s| (Duration::from_secs(s), length))
}

/// A strong tag derived from the body, for upstreams that send none.
pub fn computed_etag(body: &[u8]) -> HeaderValue {
    let mut hasher = DefaultHasher::new();
    body.hash(&mut hasher);
    HeaderValue::from_str(&format!("\"{:016x}-{:x}\"", hasher.finish(), body.len()))
        .expect("hex is a valid header")
}

impl ResponseCache {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            // One entry may take at most 1/16 of the cache.
            max_entry: (max_bytes / 16).max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn max_entry(&self) -> usize {
        self.max_entry
    }

    pub fn get(&self, key: &str, now: Instant) -> Option<Arc<Entry>> {
        let mut inner = self.inner.lock().expect("cache lock");
        let entry = inner.entries.get(key)?.clone();
        if entry.expires > now {
            return Some(entry);
        }
        inner.bytes -= entry.body.len();
        inner.entries.remove(key);
        None
    }

    pub fn put(&self, key: String, headers: HeaderMap, body: Bytes, ttl: Duration) -> Arc<Entry> {
        let etag = headers
            .get(header::ETAG)
            .cloned()
            .unwrap_or_else(|| computed_etag(&body));
        let entry = Arc::new(Entry {
            headers,
            body,
            etag,
            expires: Instant::now() + ttl,
        });
        let mut inner = self.inner.lock().expect("cache lock");
        let size = entry.body.len();
        if let Some(old) = inner.entries.insert(key.clone(), entry.clone()) {
            inner.bytes -= old.body.len();
        } else {
            inner.order.push_back(key);
        }
        inner.bytes += size;
        while inner.bytes > self.max_bytes {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(evicted) = inner.entries.remove(&oldest) {
                inner.bytes -= evicted.body.len();
            }
        }
        // Keys of entries that expired and were removed by `get` linger in `order` until
        // their turn; keep the queue from outgrowing the map.
        if inner.order.len() > 2 * inner.entries.len() + 64 {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|k| entries.contains_key(k));
        }
        entry
    }

    pub fn bytes(&self) -> usize {
        self.inner.lock().expect("cache lock").bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), HeaderValue::from_str(v).unwrap()))
            .collect()
    }

    #[test]
    fn only_explicitly_cacheable_responses_are_kept() {
        let ok = |pairs: &[(&str, &str)]| freshness(StatusCode::OK, &headers(pairs), 1000);
        assert_eq!(
            ok(&[
                ("cache-control", "public, max-age=30"),
                ("content-length", "10")
            ]),
            Some((Duration::from_secs(30), 10))
        );
        assert_eq!(
            ok(&[
                ("cache-control", "max-age=30, s-maxage=5"),
                ("content-length", "10")
            ])
            .unwrap()
            .0,
            Duration::from_secs(5)
        );
        for refused in [
            vec![("cache-control", "max-age=30")],
            vec![("content-length", "10")],
            vec![
                ("cache-control", "private, max-age=30"),
                ("content-length", "10"),
            ],
            vec![("cache-control", "no-store"), ("content-length", "10")],
            vec![("cache-control", "max-age=0"), ("content-length", "10")],
            vec![("cache-control", "max-age=30"), ("content-length", "5000")],
            vec![
                ("cache-control", "max-age=30"),
                ("content-length", "10"),
                ("set-cookie", "a=b"),
            ],
            vec![
                ("cache-control", "max-age=30"),
                ("content-length", "10"),
                ("vary", "accept"),
            ],
        ] {
            assert_eq!(ok(&refused), None, "{refused:?}");
        }
        assert_eq!(
            freshness(
                StatusCode::NOT_FOUND,
                &headers(&[("cache-control", "max-age=30"), ("content-length", "1")]),
                1000
            ),
            None
        );
    }

    #[test]
    fn entries_expire_and_memory_stays_bounded() {
        let cache = ResponseCache::new(1600);
        let now = Instant::now();
        cache.put(
            "a".into(),
            HeaderMap::new(),
            Bytes::from(vec![1; 100]),
            Duration::from_millis(30),
        );
        assert!(cache.get("a", now).is_some());
        assert!(cache.get("a", now + Duration::from_millis(40)).is_none());
        for i in 0..100 {
            cache.put(
                format!("k{i}"),
                HeaderMap::new(),
                Bytes::from(vec![0; 100]),
                Duration::from_secs(60),
            );
        }
        assert!(cache.bytes() <= 1600);
        assert!(cache.get("k99", now).is_some(), "newest kept");
        assert!(cache.get("k0", now).is_none(), "oldest evicted");
    }

    #[test]
    fn etags_are_kept_or_computed_and_matched() {
        let cache = ResponseCache::new(10_000);
        let e = cache.put(
            "x".into(),
            headers(&[("etag", "\"v7\"")]),
            Bytes::from_static(b"hi"),
            Duration::from_secs(9),
        );
        assert!(e.matches(Some(&HeaderValue::from_static("\"v1\", W/\"v7\""))));
        assert!(!e.matches(Some(&HeaderValue::from_static("\"v1\""))));
        assert!(!e.matches(None));
        let e = cache.put(
            "y".into(),
            HeaderMap::new(),
            Bytes::from_static(b"hi"),
            Duration::from_secs(9),
        );
        assert_eq!(e.etag, computed_etag(b"hi"));
        assert_ne!(computed_etag(b"hi"), computed_etag(b"ho"));
    }
}
