//! The route table: which upstream serves a path, and the path it is sent with.

use std::collections::HashMap;

use serde::Deserialize;

use crate::policy::access::{Policy, RouteAccess};

pub const DEFAULT_TABLE: &str = include_str!("../../routes.yaml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableFile {
    pub upstreams: HashMap<String, Vec<String>>,
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub path: Option<String>,
    pub prefix: Option<String>,
    pub upstream: String,
    #[serde(default)]
    pub strip: String,
    /// Who may GET/HEAD/OPTIONS; `user` when unset.
    pub read: Option<Policy>,
    /// Who may send anything else; `user` when unset.
    pub write: Option<Policy>,
    /// Kept for an older API (the seed's): marked so in the published API document.
    #[serde(default)]
    pub compatibility: bool,
}

/// A compiled route. `label` is the route's pattern, used as the metrics `route` label so
/// raw paths never become label values.
#[derive(Debug, Clone)]
pub struct Route {
    pub label: String,
    pub upstream: usize,
    pub access: RouteAccess,
    pub compatibility: bool,
    strip: String,
}

impl Route {
    /// What is removed from the front of a matched path before it goes upstream.
    pub fn strip(&self) -> &str {
        &self.strip
    }

    /// The upstream target for a matched request, as a [`Target`]: usually the request's
    /// own path and query past the stripped prefix, which needs no new string.
    pub fn target(&self, uri: &http::Uri) -> Target {
        let whole = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
        match whole.strip_prefix(self.strip.as_str()) {
            Some(rest) if rest.starts_with('/') => Target::Suffix(whole.len() - rest.len()),
            _ => Target::Owned(self.rewrite(uri.path(), uri.query())),
        }
    }

    /// The upstream path and query for a matched request path.
    pub fn rewrite(&self, path: &str, query: Option<&str>) -> String {
        let rest = path.strip_prefix(self.strip.as_str()).unwrap_or(path);
        let rest = if rest.is_empty() { "/" } else { rest };
        match query {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_owned(),
        }
    }
}

/// Where a request goes upstream: the request's path and query from a byte offset on,
/// or a rewritten one.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    Suffix(usize),
    Owned(String),
}

impl Target {
    pub fn resolve<'a>(&'a self, uri: &'a http::Uri) -> &'a str {
        match self {
            Target::Suffix(offset) => {
                &uri.path_and_query().map_or(uri.path(), |pq| pq.as_str())[*offset..]
            }
            Target::Owned(target) => target,
        }
    }
}

#[derive(Debug)]
pub struct RouteTable {
    /// Looked up on every request: FNV-1a over a short path costs a fraction of SipHash.
    exact: HashMap<String, usize, std::hash::BuildHasherDefault<Fnv1a>>,
    /// Longest prefix first.
    prefixes: Vec<(String, usize)>,
    pub routes: Vec<Route>,
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("route table is not valid YAML of the expected shape: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("route {0}: give exactly one of `path` or `prefix`")]
    Shape(usize),
    #[error("route {index}: {what} {value:?} must start with '/' and must not end with '/'")]
    Pattern {
        index: usize,
        what: &'static str,
        value: String,
    },
    #[error("route {index}: strip {strip:?} is not a prefix of {pattern:?}")]
    Strip {
        index: usize,
        strip: String,
        pattern: String,
    },
    #[error("route {index}: unknown upstream {name:?}")]
    UnknownUpstream { index: usize, name: String },
    #[error("route {index}: {pattern:?} is defined twice")]
    Duplicate { index: usize, pattern: String },
}

impl RouteTable {
    /// Compiles the routes against the upstream names (their index is the upstream id).
    pub fn compile(specs: &[RouteSpec], upstreams: &[String]) -> Result<Self, TableError> {
        let mut table = RouteTable {
            exact: HashMap::default(),
            prefixes: Vec::new(),
            routes: Vec::new(),
        };
        for (index, spec) in specs.iter().enumerate() {
            let (pattern, exact) = match (&spec.path, &spec.prefix) {
                (Some(p), None) => (p.clone(), true),
                (None, Some(p)) => (p.clone(), false),
                _ => return Err(TableError::Shape(index)),
            };
            let well_formed = |p: &str| p.starts_with('/') && (p.len() == 1 || !p.ends_with('/'));
            if !well_formed(&pattern) {
                return Err(TableError::Pattern {
                    index,
                    what: if exact { "path" } else { "prefix" },
                    value: pattern,
                });
            }
            if !spec.strip.is_empty() && !well_formed(&spec.strip) {
                return Err(TableError::Pattern {
                    index,
                    what: "strip",
                    value: spec.strip.clone(),
                });
            }
            if !segment_prefix(&pattern, &spec.strip) {
                return Err(TableError::Strip {
                    index,
                    strip: spec.strip.clone(),
                    pattern,
                });
            }
            let upstream = upstreams
                .iter()
                .position(|u| *u == spec.upstream)
                .ok_or_else(|| TableError::UnknownUpstream {
                    index,
                    name: spec.upstream.clone(),
                })?;
            let id = table.routes.len();
            let label = if exact {
                pattern.clone()
            } else {
                format!("{pattern}/*")
            };
            let duplicate = if exact {
                table.exact.insert(pattern.clone(), id).is_some()
            } else if table.prefixes.iter().any(|(p, _)| *p == pattern) {
                true
            } else {
                table.prefixes.push((pattern.clone(), id));
                false
            };
            if duplicate {
                return Err(TableError::Duplicate { index, pattern });
            }
            table.routes.push(Route {
                label,
                upstream,
                access: RouteAccess::new(spec.read, spec.write),
                compatibility: spec.compatibility,
                strip: spec.strip.clone(),
            });
        }
        table
            .prefixes
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(table)
    }

    /// The matching route and its id (exact paths first, then the longest prefix).
    pub fn find(&self, path: &str) -> Option<(usize, &Route)> {
        let id = match self.exact.get(path) {
            Some(&id) => id,
            None => self
                .prefixes
                .iter()
                .find(|(prefix, _)| segment_prefix(path, prefix))
                .map(|&(_, id)| id)?,
        };
        Some((id, &self.routes[id]))
    }
}

/// FNV-1a: route paths come from the operator's configuration, not from clients, and
/// a lookup miss costs nothing more than a hit, so flooding is not a concern.
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// `prefix` is `path` itself or a leading run of whole segments of it.
fn segment_prefix(path: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Refuses paths that could step outside the route they match: dot segments, empty
/// segments, backslashes, and percent-encoded slashes, backslashes, dots or percent signs
/// (double encoding). Upstreams decode paths; the gateway never does, so nothing it lets
/// through can turn into a different path after decoding.
pub fn path_is_safe(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    // One pass, no allocation: this runs on every request.
    let mut segment_start = 1;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        match b {
            b'\\' => return false,
            b'%' => match (bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(hi), Some(lo)) => {
                    let pair = [hi.to_ascii_lowercase(), lo.to_ascii_lowercase()];
                    if matches!(&pair, b"2f" | b"5c" | b"2e" | b"25") {
                        return false;
                    }
                }
                _ => return false,
            },
            b'/' => {
                if is_empty_or_dot_segment(&bytes[segment_start..i]) {
                    return false;
                }
                segment_start = i + 1;
            }
            _ => {}
        }
    }
    !matches!(&bytes[segment_start..], b"." | b"..")
}

/// An empty segment (`//`) or a dot segment, anywhere but at the end of the path.
fn is_empty_or_dot_segment(segment: &[u8]) -> bool {
    matches!(segment, b"" | b"." | b"..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_table() -> RouteTable {
        let file: TableFile = serde_yaml::from_str(DEFAULT_TABLE).unwrap();
        let names = vec!["product".to_owned(), "order".to_owned(), "user".to_owned()];
        RouteTable::compile(&file.routes, &names).unwrap()
    }

    #[test]
    fn seed_routes_are_exact_and_strip_api() {
        let t = default_table();
        let (_, r) = t.find("/api/products").unwrap();
        assert_eq!(
            (r.upstream, r.rewrite("/api/products", None)),
            (0, "/products".into())
        );
        let (_, r) = t.find("/api/product").unwrap();
        assert_eq!(r.rewrite("/api/product", Some("id=1")), "/product?id=1");
        for uri in ["/api/product?id=1", "/api/product", "/api", "/api?x=1"] {
            let uri: http::Uri = uri.parse().unwrap();
            assert_eq!(
                r.target(&uri).resolve(&uri),
                r.rewrite(uri.path(), uri.query()),
                "{uri}"
            );
        }
        assert_eq!(t.find("/api/orders").unwrap().1.upstream, 1);
        assert_eq!(t.find("/api/user").unwrap().1.upstream, 2);
        assert!(t.find("/api/products/1").is_none(), "seed routes are exact");
    }

    #[test]
    fn rest_routes_match_whole_segments() {
        let t = default_table();
        let (_, r) = t.find("/api/v1/products/7").unwrap();
        assert_eq!(r.rewrite("/api/v1/products/7", None), "/products/7");
        assert_eq!(r.label, "/api/v1/products/*");
        assert_eq!(t.find("/api/v1/orders").unwrap().1.upstream, 1);
        assert!(t.find("/api/v1/productsX").is_none());
        assert!(
            t.find("/api/v1/reservations").is_none(),
            "internal routes stay internal"
        );
        assert!(t.find("/").is_none());
    }

    #[test]
    fn bad_tables_are_refused_with_the_reason() {
        let names = vec!["product".to_owned()];
        let spec = |yaml: &str| serde_yaml::from_str::<Vec<RouteSpec>>(yaml).unwrap();
        let err = RouteTable::compile(&spec("[{prefix: /a, upstream: nope}]"), &names).unwrap_err();
        assert!(err.to_string().contains("unknown upstream"), "{err}");
        let err = RouteTable::compile(&spec("[{path: /a, prefix: /b, upstream: product}]"), &names)
            .unwrap_err();
        assert!(matches!(err, TableError::Shape(0)));
        let err =
            RouteTable::compile(&spec("[{prefix: /a/, upstream: product}]"), &names).unwrap_err();
        assert!(matches!(err, TableError::Pattern { .. }));
        let err = RouteTable::compile(
            &spec("[{prefix: /a, upstream: product, strip: /b}]"),
            &names,
        )
        .unwrap_err();
        assert!(matches!(err, TableError::Strip { .. }));
        let err = RouteTable::compile(
            &spec("[{path: /a, upstream: product}, {path: /a, upstream: product}]"),
            &names,
        )
        .unwrap_err();
        assert!(matches!(err, TableError::Duplicate { .. }));
    }

    #[test]
    fn escaping_paths_are_refused() {
        for bad in [
            "/api/v1/products/../orders",
            "/api/v1/products/..",
            "/api/v1/products/./x",
            "/api/v1/products/%2e%2e/orders",
            "/api/v1/products/%2E%2E%2Forders",
            "/api/v1/products%2F..%2Forders",
            "/api/v1/products/%252e%252e/orders",
            "/api/v1/products\\..\\orders",
            "/api/v1/products//x",
            "/api/v1/products/%5c",
            "/api/v1/products/%",
            "/api/v1/products/%2",
            "/api/v1/products/.",
            "//api/v1/products",
            "/./api",
            "relative",
        ] {
            assert!(!path_is_safe(bad), "{bad} accepted");
        }
        for good in [
            "/",
            "/api/v1/products/1",
            "/api/v1/users/a%20b",
            "/api/v1/products/x.y",
            "/api/v1/products/",
            "/api/v1/products/...",
            "/api/v1/users/a%41",
        ] {
            assert!(path_is_safe(good), "{good} refused");
        }
    }
}
