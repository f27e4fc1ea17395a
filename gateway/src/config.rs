//! Gateway configuration: the standard server variables, the route table (a YAML file or
//! the built-in default), per-upstream endpoint overrides, and resilience settings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use shop_platform::config::{ConfigError, Env, ServerConfig, Var};
use shop_platform::{AuthConfig, Binary, Runtime};

use crate::policy::access::Cors;

use crate::policy::routes::{DEFAULT_TABLE, RouteSpec, RouteTable, TableFile};
use crate::upstream::Endpoint;
use crate::upstream::discovery::Target;

pub const PORT: Var = Var::new("PORT", "8080", "Port to listen on.");
pub const ROUTES: Var = Var::optional(
    "GATEWAY_ROUTES",
    "YAML route table file (upstreams + routes); the built-in table routes the seed and /api/v1 paths.",
);
pub const UPSTREAM_URLS: Var = Var::optional(
    "<UPSTREAM>_URL",
    "Endpoints of an upstream, comma-separated, e.g. PRODUCT_URL=http://10.0.0.5:8081,http://10.0.0.6:8081 (ORDER_URL, USER_URL likewise).",
);
pub const DISCOVERY: Var = Var::new(
    "DISCOVERY",
    "static",
    "Where upstream endpoints come from: static (the <UPSTREAM>_URL lists) or kubernetes (the EndpointSlices of each upstream's Service, watched through the API server).",
);
pub const DISCOVERY_NAMESPACE: Var = Var::optional(
    "DISCOVERY_NAMESPACE",
    "Namespace of the upstream Services (kubernetes discovery); default: the gateway's own (in a pod) or the kubeconfig context's.",
);
pub const UPSTREAM_SERVICES: Var = Var::optional(
    "<UPSTREAM>_SERVICE",
    "Service an upstream follows (kubernetes discovery), e.g. PRODUCT_SERVICE=shop-product; default: the upstream's name.",
);
pub const DISCOVERY_PORT_NAME: Var = Var::new(
    "DISCOVERY_PORT_NAME",
    "http",
    "Name of the Service port to send to (kubernetes discovery); looked up in every EndpointSlice.",
);
pub const WORKERS: Var = Var::new(
    "GATEWAY_WORKERS",
    "0",
    "Worker threads, each with its own listener and upstream pool; 0 = one per CPU.",
);
pub const CONNECT_TIMEOUT: Var = Var::new(
    "CONNECT_TIMEOUT",
    "1s",
    "Longest wait for a TCP connection to an upstream endpoint.",
);
pub const UPSTREAM_IDLE_TIMEOUT: Var = Var::new(
    "UPSTREAM_IDLE_TIMEOUT",
    "60s",
    "Pooled upstream connections idle this long are closed.",
);
pub const UPSTREAM_MAX_IDLE: Var = Var::new(
    "UPSTREAM_MAX_IDLE",
    "256",
    "Idle connections kept per endpoint and worker.",
);
pub const HEADER_READ_TIMEOUT: Var = Var::new(
    "HEADER_READ_TIMEOUT",
    "10s",
    "A client must send its request headers within this time, so slow clients cannot pin connections.",
);
pub const RETRY_BUDGET: Var = Var::new(
    "RETRY_BUDGET",
    "0.2",
    "Retries may add at most this fraction of requests per upstream (idempotent, bodyless requests; on connect failure or 503 only).",
);
pub const BREAKER_FAILURES: Var = Var::new(
    "BREAKER_FAILURES",
    "5",
    "Consecutive failures (connect errors, timeouts, 502-504) that open an upstream's circuit.",
);
pub const BREAKER_COOLDOWN: Var = Var::new(
    "BREAKER_COOLDOWN",
    "5s",
    "How long an open circuit answers 503 before letting one trial request through.",
);
pub const EJECT_BACKOFF: Var = Var::new(
    "EJECT_BACKOFF",
    "1s",
    "An endpoint that refuses connections gets no traffic for this long, doubling per repeat (max 30s).",
);
pub const RATE_LIMIT: Var = Var::new(
    "RATE_LIMIT",
    "0",
    "Requests per second allowed per client IP; 0 turns rate limiting off.",
);
pub const RATE_LIMIT_BURST: Var = Var::new(
    "RATE_LIMIT_BURST",
    "100",
    "Requests a client IP may send at once before the rate applies.",
);
pub const CACHE_SIZE: Var = Var::new(
    "CACHE_SIZE",
    "0",
    "Memory for caching GET responses upstreams mark cacheable (Cache-Control: max-age), e.g. 16MiB; 0 = off.",
);
pub const ACCESS_LOG: Var = Var::new(
    "ACCESS_LOG",
    "true",
    "Log one JSON line per proxied request.",
);

pub const CORS_ALLOWED_ORIGINS: Var = Var::optional(
    "CORS_ALLOWED_ORIGINS",
    "Origins browsers may call the API from, comma-separated (https://shop.example.com), or *; unset = no cross-origin access.",
);

pub const BINARY: Binary = Binary {
    name: crate::NAME,
    about: "API gateway: routes /api/... to the product, order and user services.",
    vars: &[
        ("Server", &ServerConfig::vars(PORT)),
        ("Routing", &[ROUTES, UPSTREAM_URLS, WORKERS]),
        (
            "Discovery",
            &[
                DISCOVERY,
                DISCOVERY_NAMESPACE,
                UPSTREAM_SERVICES,
                DISCOVERY_PORT_NAME,
            ],
        ),
        (
            "Upstream connections and resilience",
            &[
                CONNECT_TIMEOUT,
                UPSTREAM_IDLE_TIMEOUT,
                UPSTREAM_MAX_IDLE,
                HEADER_READ_TIMEOUT,
                RETRY_BUDGET,
                BREAKER_FAILURES,
                BREAKER_COOLDOWN,
                EJECT_BACKOFF,
            ],
        ),
        (
            "Clients",
            &[
                RATE_LIMIT,
                RATE_LIMIT_BURST,
                CACHE_SIZE,
                ACCESS_LOG,
                CORS_ALLOWED_ORIGINS,
            ],
        ),
        ("Authentication", &AuthConfig::VERIFIER_VARS),
    ],
    runtime: Runtime::CurrentThread,
};

/// Where upstream endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// The `<UPSTREAM>_URL` lists (or the route file's), fixed for the process's life.
    Static,
    /// EndpointSlices of one Service per upstream, followed through the API server.
    Kubernetes {
        /// `None`: the client's default namespace.
        namespace: Option<String>,
        /// Upstream name -> which Service and port it follows.
        targets: BTreeMap<String, Target>,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// Upstream name -> endpoint URLs, in a stable order (empty with kubernetes discovery:
    /// the endpoints arrive from the watch).
    pub upstreams: BTreeMap<String, Vec<String>>,
    pub discovery: Discovery,
    pub routes: Vec<RouteSpec>,
    pub workers: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    pub header_read_timeout: Duration,
    pub retry_budget: f64,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub eject_backoff: Duration,
    pub rate_limit: Option<(f64, u32)>,
    pub cache_bytes: usize,
    pub access_log: bool,
    pub auth: AuthConfig,
    pub cors: Option<Cors>,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let table_text = match env.parse_opt::<PathBuf>(&ROUTES)? {
            Some(path) => std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::new(
                    &ROUTES,
                    path.display().to_string(),
                    format!("cannot read: {e}"),
                )
            })?,
            None => DEFAULT_TABLE.to_owned(),
        };
        let table: TableFile = serde_yaml::from_str(&table_text)
            .map_err(|e| ConfigError::new(&ROUTES, "", format!("route table: {e}")))?;
        let mut upstreams: BTreeMap<String, Vec<String>> = table.upstreams.into_iter().collect();
        let discovery = match env.parse::<String>(&DISCOVERY)?.trim() {
            "static" => Discovery::Static,
            "kubernetes" => {
                let port_name = env.parse::<String>(&DISCOVERY_PORT_NAME)?;
                let targets = upstreams
                    .keys()
                    .map(|name| {
                        let var_name = format!("{}_SERVICE", env_prefix(name));
                        let service = env
                            .raw(&var_name)
                            .map(|v| v.trim().to_owned())
                            .filter(|v| !v.is_empty())
                            .unwrap_or_else(|| name.clone());
                        if !is_dns_label(&service) {
                            return Err(ConfigError::named(
                                var_name,
                                service,
                                "a Service name is a DNS label (lowercase letters, digits, '-')",
                            ));
                        }
                        let target = Target {
                            service,
                            port_name: port_name.clone(),
                        };
                        Ok((name.clone(), target))
                    })
                    .collect::<Result<_, _>>()?;
                let namespace = env
                    .parse_opt::<String>(&DISCOVERY_NAMESPACE)?
                    .map(|n| n.trim().to_owned())
                    .filter(|n| !n.is_empty());
                if let Some(ns) = namespace.as_deref().filter(|ns| !is_dns_label(ns)) {
                    return Err(ConfigError::new(
                        &DISCOVERY_NAMESPACE,
                        ns,
                        "a namespace is a DNS label (lowercase letters, digits, '-')",
                    ));
                }
                Discovery::Kubernetes { namespace, targets }
            }
            other => {
                return Err(ConfigError::new(
                    &DISCOVERY,
                    other,
                    "must be static or kubernetes",
                ));
            }
        };
        for (name, endpoints) in upstreams.iter_mut() {
            if discovery != Discovery::Static {
                // Endpoints come from the watch; a static list here would be stale.
                endpoints.clear();
                continue;
            }
            let var_name = format!("{}_URL", env_prefix(name));
            if let Some(list) = env.raw(&var_name).filter(|v| !v.trim().is_empty()) {
                *endpoints = list.split(',').map(|s| s.trim().to_owned()).collect();
            }
            for url in endpoints.iter() {
                Endpoint::parse(url)
                    .map_err(|reason| ConfigError::named(var_name.clone(), url.as_str(), reason))?;
            }
            if endpoints.is_empty() {
                return Err(ConfigError::named(
                    var_name,
                    "",
                    "an upstream needs at least one endpoint",
                ));
            }
        }
        let names: Vec<String> = upstreams.keys().cloned().collect();
        RouteTable::compile(&table.routes, &names).map_err(|e| ConfigError::new(&ROUTES, "", e))?;

        let workers = match env.parse::<usize>(&WORKERS)? {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let retry_budget = env.parse::<f64>(&RETRY_BUDGET)?;
        if !(0.0..=1.0).contains(&retry_budget) {
            return Err(ConfigError::new(
                &RETRY_BUDGET,
                retry_budget.to_string(),
                "must be between 0 and 1",
            ));
        }
        let rate = env.parse::<f64>(&RATE_LIMIT)?;
        if !rate.is_finite() || rate < 0.0 {
            return Err(ConfigError::new(
                &RATE_LIMIT,
                rate.to_string(),
                "must be 0 or more",
            ));
        }
        Ok(Self {
            server: ServerConfig::from_env(env, &PORT)?,
            upstreams,
            discovery,
            routes: table.routes,
            workers,
            connect_timeout: env.duration(&CONNECT_TIMEOUT)?,
            idle_timeout: env.duration(&UPSTREAM_IDLE_TIMEOUT)?,
            max_idle: env.parse(&UPSTREAM_MAX_IDLE)?,
            header_read_timeout: env.duration(&HEADER_READ_TIMEOUT)?,
            retry_budget,
            breaker_failures: env.parse(&BREAKER_FAILURES)?,
            breaker_cooldown: env.duration(&BREAKER_COOLDOWN)?,
            eject_backoff: env.duration(&EJECT_BACKOFF)?,
            rate_limit: (rate > 0.0)
                .then(|| env.parse::<u32>(&RATE_LIMIT_BURST).map(|b| (rate, b)))
                .transpose()?,
            cache_bytes: env.parse_with(&CACHE_SIZE, |v| match v.trim() {
                "0" => Ok(0),
                size => shop_platform::config::parse_bytes(size),
            })?,
            access_log: env.flag(&ACCESS_LOG)?,
            auth: AuthConfig::from_env(env)?,
            cors: match env.raw(CORS_ALLOWED_ORIGINS.name) {
                Some(value) => Cors::parse(&value)
                    .map_err(|reason| ConfigError::new(&CORS_ALLOWED_ORIGINS, value, reason))?,
                None => None,
            },
        })
    }

    /// Points an upstream at the given endpoints (the launcher, tests).
    pub fn set_upstream(&mut self, name: &str, endpoints: Vec<String>) {
        self.upstreams.insert(name.to_owned(), endpoints);
    }
}

/// `order-v2` -> `ORDER_V2`, the prefix of an upstream's variables.
fn env_prefix(upstream: &str) -> String {
    upstream.to_ascii_uppercase().replace('-', "_")
}

/// RFC 1123 label: what Kubernetes accepts as a Service or namespace name.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_route_the_seed_and_rest_paths() {
        let config = Config::from_env(&Env::from_pairs::<&str, &str>([])).unwrap();
        assert_eq!(config.upstreams["product"], vec!["http://127.0.0.1:8081"]);
        assert_eq!(config.server.port, 8080);
        assert!(config.rate_limit.is_none(), "off by default");
        assert!(config.workers >= 1);
    }

    #[test]
    fn endpoint_lists_come_from_upstream_url_variables() {
        let env = Env::from_pairs([
            ("PRODUCT_URL", "http://a:1, http://b:2"),
            ("RATE_LIMIT", "50"),
        ]);
        let config = Config::from_env(&env).unwrap();
        assert_eq!(
            config.upstreams["product"],
            vec!["http://a:1", "http://b:2"]
        );
        assert_eq!(config.rate_limit, Some((50.0, 100)));
    }

    #[test]
    fn invalid_settings_name_the_variable() {
        let err =
            Config::from_env(&Env::from_pairs([("ORDER_URL", "https://secure")])).unwrap_err();
        assert_eq!(err.var, "ORDER_URL");
        let err = Config::from_env(&Env::from_pairs([("RETRY_BUDGET", "3")])).unwrap_err();
        assert_eq!(err.var, "RETRY_BUDGET");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("routes.yaml");
        std::fs::write(
            &file,
            "upstreams: {a: [http://x:1]}\nroutes: [{prefix: /a, upstream: b}]",
        )
        .unwrap();
        let err = Config::from_env(&Env::from_pairs([(
            "GATEWAY_ROUTES",
            file.to_str().unwrap(),
        )]))
        .unwrap_err();
        assert_eq!(err.var, "GATEWAY_ROUTES");
        assert!(err.to_string().contains("unknown upstream"), "{err}");
    }

    #[test]
    fn kubernetes_discovery_follows_one_service_per_upstream() {
        let env = Env::from_pairs([
            ("DISCOVERY", "kubernetes"),
            ("PRODUCT_SERVICE", "shop-product"),
            ("PRODUCT_URL", "http://ignored:1"),
            ("DISCOVERY_NAMESPACE", "shop"),
        ]);
        let config = Config::from_env(&env).unwrap();
        let Discovery::Kubernetes { namespace, targets } = &config.discovery else {
            panic!("{:?}", config.discovery);
        };
        assert_eq!(namespace.as_deref(), Some("shop"));
        assert_eq!(targets["product"].service, "shop-product");
        assert_eq!(
            targets["order"].service, "order",
            "defaults to the upstream name"
        );
        assert_eq!(targets["user"].port_name, "http");
        assert!(
            config.upstreams.values().all(Vec::is_empty),
            "no static endpoints"
        );
    }

    #[test]
    fn invalid_discovery_settings_name_the_variable() {
        let err = Config::from_env(&Env::from_pairs([("DISCOVERY", "dns")])).unwrap_err();
        assert_eq!(err.var, "DISCOVERY");
        let err = Config::from_env(&Env::from_pairs([
            ("DISCOVERY", "kubernetes"),
            ("USER_SERVICE", "Shop_User"),
        ]))
        .unwrap_err();
        assert_eq!(err.var, "USER_SERVICE");
        let err = Config::from_env(&Env::from_pairs([
            ("DISCOVERY", "kubernetes"),
            ("DISCOVERY_NAMESPACE", "-x"),
        ]))
        .unwrap_err();
        assert_eq!(err.var, "DISCOVERY_NAMESPACE");
    }
}
