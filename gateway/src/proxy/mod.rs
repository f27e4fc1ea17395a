//! (Over 500 lines: `Worker::handle` is one request's whole path, kept in one file so it
//! reads top to bottom; its answers and the response body are in `response.rs`.)
//!
//! One request through the gateway: admin endpoints, path safety, rate limit, route,
//! circuit breaker, endpoint choice, forward (retrying only what is safe to retry), and a
//! streamed response. Bodies are never buffered in either direction.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Body;
use prometheus::{Histogram, IntCounter};
use shop_platform::AppError;

use crate::Shared;
use crate::http::body;
use crate::http::deadline::Deadlines;
use crate::http::front::RequestBody;
use crate::http::h1::{RequestFraming, RequestHead};
use crate::policy::access::{self, TokenCache};
use crate::policy::cache::{freshness, request_is_cacheable};
pub use crate::upstream::pool::{HandleMap, PackedKeyHasher};
use crate::upstream::pool::{Pool, SendError};
use crate::upstream::{Admission, InFlight};

mod response;
mod span;

pub use response::{MAX_HEADERS, Streamed, error, local};
use response::{
    first_list, from_cache, is_idempotent, refuse_malformed, strip_hop_by_hop, too_large,
};

pub type ResponseBody = Either<Streamed, Full<Bytes>>;

/// The client's request body on its way upstream, cut off at the body limit.
pub type OutboundBody = body::OutboundBody<RequestBody>;
pub use crate::http::body::BodyLimitExceeded;

const X_CONTENT_TYPE_OPTIONS: HeaderName = HeaderName::from_static("x-content-type-options");
const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");

/// Retries after the first attempt, when retrying is allowed at all.
const MAX_RETRIES: u32 = 2;

/// The client end of one inbound connection, resolved once per connection rather than
/// once per request (formatting an address is one of the costlier things a proxy does).
pub struct Client {
    pub addr: SocketAddr,
    /// The peer address as an `X-Forwarded-For` element.
    forwarded_for: HeaderValue,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        let forwarded_for =
            HeaderValue::from_str(&addr.ip().to_string()).expect("an IP address is a valid header");
        Self {
            addr,
            forwarded_for,
        }
    }
}

/// What the gateway adds to every request it forwards.
struct Hop<'a> {
    request_id: &'a HeaderValue,
    traceparent: [u8; 55],
    new_trace: bool,
}

impl crate::http::front::Handler for Worker {
    type Client = Client;
    type Body = ResponseBody;

    fn deadlines(&self) -> &Rc<Deadlines> {
        Worker::deadlines(self)
    }

    fn handle(
        &self,
        request: Request<RequestBody>,
        client: &Client,
    ) -> impl std::future::Future<Output = Result<Response<ResponseBody>, Infallible>> {
        Worker::handle(self, request, client)
    }
}

/// Per-worker state: the upstream connection pool and metric handles resolved once.
pub struct Worker {
    pub shared: Arc<Shared>,
    pool: Rc<Pool>,
    deadlines: Rc<Deadlines>,
    tokens: TokenCache,
    handles: RefCell<HandleMap<Handles>>,
    upstream_handles: RefCell<HandleMap<(IntCounter, Histogram)>>,
}

fn pack(route: usize, method: &Method, status: StatusCode) -> u64 {
    let method = shop_platform::metrics::method_label(method);
    // The label is one of a fixed set of static strings; its first bytes tell them apart.
    let tag = method.as_bytes()[..2]
        .iter()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    ((route as u64) << 32) | (tag << 16) | u64::from(status.as_u16())
}

#[derive(Clone)]
struct Handles {
    server_requests: IntCounter,
    server_duration: Histogram,
}

impl Worker {
    pub fn deadlines(&self) -> &Rc<Deadlines> {
        &self.deadlines
    }

    pub fn new(shared: Arc<Shared>, pool: Rc<Pool>, deadlines: Rc<Deadlines>) -> Self {
        Self {
            shared,
            pool,
            deadlines,
            tokens: TokenCache::default(),
            handles: RefCell::default(),
            upstream_handles: RefCell::default(),
        }
    }

    /// An upstream answered with `status`: the common case, so its handles are cached.
    fn observe_upstream(&self, upstream: usize, status: StatusCode, elapsed: Duration) {
        let mut handles = self.upstream_handles.borrow_mut();
        let (count, duration) = handles
            .entry(((upstream as u64) << 16) | u64::from(status.as_u16()))
            .or_insert_with(|| {
                self.shared
                    .metrics_gw
                    .handles(&self.shared.upstreams[upstream].name, status.as_str())
            });
        count.inc();
        duration.observe(elapsed.as_secs_f64());
    }

    /// Label lookups cost a hash and a lock in the prometheus crate; a worker pays them
    /// once per (route, method, status) and then only increments atomics.
    fn observe(&self, route: usize, method: &Method, status: StatusCode, elapsed: Duration) {
        let mut handles = self.handles.borrow_mut();
        let h = handles
            .entry(pack(route, method, status))
            .or_insert_with(|| {
                let label = self.shared.route_label(route);
                let method = shop_platform::metrics::method_label(method);
                let (requests, duration) =
                    self.shared
                        .metrics
                        .server_handles(method, label, status.as_u16());
                Handles {
                    server_requests: requests,
                    server_duration: duration,
                }
            });
        h.server_requests.inc();
        h.server_duration.observe(elapsed.as_secs_f64());
    }

    pub async fn handle(
        &self,
        request: Request<RequestBody>,
        client: &Client,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let started = Instant::now();
        let shared = &self.shared;
        shared.metrics.in_flight().inc();
        let method = request.method().clone();
        // Both go upstream as lines of the request head, not through the header map.
        let request_id = crate::request_id(request.headers());
        let trace = crate::http::trace::continue_trace(request.headers(), &shared.sampler);
        let credentialed = request.headers().contains_key(header::AUTHORIZATION);
        let origin = match &shared.cors {
            Some(_) => request.headers().get(header::ORIGIN).cloned(),
            None => None,
        };
        // Probes and scrapes are never traced (as in the services).
        let span = match shared.spans {
            Some(sink)
                if trace.sampled
                    && !matches!(request.uri().path(), "/health" | "/ready" | "/metrics") =>
            {
                Some((sink, span::SpanStart::capture(&request, started)))
            }
            _ => None,
        };
        let hop = Hop {
            request_id: &request_id,
            traceparent: trace.traceparent_bytes(),
            new_trace: trace.is_new(),
        };
        let (route, mut response) = self.route_and_forward(request, client, &hop, started).await;
        shared.metrics.in_flight().dec();
        let status = response.status();
        self.observe(route, &method, status, started.elapsed());
        if let Some((sink, start)) = span {
            let upstream = (route < shared.table.routes.len()).then(|| {
                shared.upstreams[shared.table.routes[route].upstream]
                    .name
                    .as_str()
            });
            span::export(
                sink,
                &trace,
                start,
                &method,
                shared.route_label(route),
                status,
                client.addr.ip(),
                upstream,
            );
        }
        if shared.options.access_log && route != crate::ADMIN_ROUTE {
            tracing::info!(
                target: "shop_gateway::access",
                status = status.as_u16(),
                // The same keys as the services' request lines (OpenTelemetry names).
                http.request.method = %method,
                http.route = shared.route_label(route),
                latency_ms = started.elapsed().as_micros() as f64 / 1000.0,
                request_id = request_id.to_str().unwrap_or_default(),
                trace_id = %format_args!("{:032x}", trace.trace_id),
                span_id = %format_args!("{:016x}", trace.span_id),
                client = %client.addr.ip(),
                "request completed"
            );
        }
        strip_hop_by_hop(response.headers_mut());
        let headers = response.headers_mut();
        if route != crate::ADMIN_ROUTE {
            headers.insert(crate::REQUEST_ID, request_id);
        }
        headers.insert(X_CONTENT_TYPE_OPTIONS, NOSNIFF);
        // An answer to a credentialed request is that caller's alone: no shared cache
        // (proxy, CDN, browser history) may keep it.
        if credentialed {
            access::no_store(headers);
        }
        if let Some(cors) = &shared.cors {
            cors.decorate(origin.as_ref(), headers);
        }
        Ok(response)
    }

    async fn route_and_forward(
        &self,
        request: Request<RequestBody>,
        client: &Client,
        hop: &Hop<'_>,
        started: Instant,
    ) -> (usize, Response<ResponseBody>) {
        let shared = &self.shared;
        let path = request.uri().path();
        if let Some(response) = shared.admin(path, request.method()).await {
            return (crate::ADMIN_ROUTE, response);
        }
        if !crate::policy::routes::path_is_safe(path) {
            return (
                crate::UNMATCHED_ROUTE,
                error(AppError::bad_request(
                    "invalid_path",
                    "the path is not allowed",
                )),
            );
        }
        if let Some(limiter) = &shared.limiter
            && let Err(wait) = limiter.check(client.addr.ip(), started)
        {
            shared.metrics_gw.rate_limited.inc();
            let mut err = AppError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests from this address",
            );
            err.retry_after_secs = Some(wait);
            return (crate::UNMATCHED_ROUTE, error(err));
        }
        if let Some(cors) = &shared.cors
            && let Some(preflight) = cors.preflight(request.method(), request.headers())
        {
            return (crate::UNMATCHED_ROUTE, preflight.map(Either::Right));
        }
        let Some((route_id, route)) = shared.table.find(path) else {
            if let Some(response) = crate::docs::serve(shared, path, request.method()).await {
                return (crate::DOCS_ROUTE, response.map(Either::Right));
            }
            return (
                crate::UNMATCHED_ROUTE,
                error(AppError::not_found("no route for this path")),
            );
        };
        let policy = route.access.for_method(request.method());
        let mut request = request;
        if let Err(refused) =
            self.tokens
                .authorize(&shared.authenticator, policy, request.headers_mut())
        {
            return (route_id, refused.into_response().map(Either::Right));
        }
        if let Some(refused) = refuse_malformed(&request) {
            return (route_id, refused);
        }
        if let Some(length) = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && length > shared.options.body_limit
        {
            return (route_id, error(too_large()));
        }
        let target = route.target(request.uri());
        (
            route_id,
            self.forward(request, route.upstream, target, client, hop)
                .await,
        )
    }

    async fn forward(
        &self,
        request: Request<RequestBody>,
        upstream_id: usize,
        target: crate::policy::routes::Target,
        client: &Client,
        hop: &Hop<'_>,
    ) -> Response<ResponseBody> {
        let shared = &self.shared;
        let upstream = &shared.upstreams[upstream_id];
        let upstream_metrics = &shared.metrics_gw;
        let if_none_match = request.headers().get(header::IF_NONE_MATCH).cloned();
        let mut cache_key = None;
        if let Some(cache) = &shared.cache
            && request_is_cacheable(request.method(), request.headers())
        {
            let key = format!("{}{}", upstream.name, target.resolve(request.uri()));
            if let Some(entry) = cache.get(&key, Instant::now()) {
                let revalidated = entry.matches(if_none_match.as_ref());
                upstream_metrics.cache(
                    &upstream.name,
                    if revalidated { "revalidated" } else { "hit" },
                );
                return from_cache(&entry, revalidated, "hit");
            }
            cache_key = Some(key);
        }
        let admission = upstream.breaker.admit();
        if let Admission::Rejected(retry_after) = admission {
            upstream_metrics.count(&upstream.name, "circuit_open");
            let mut err = AppError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "circuit_open",
                format!(
                    "{} is failing; not sending requests for a moment",
                    upstream.name
                ),
            );
            err.retry_after_secs = Some(retry_after);
            return error(err);
        }
        upstream.budget.on_request();

        let (mut parts, body) = request.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let target = target.resolve(&parts.uri);
        // The rewritten target goes on the request line as it is: nothing that could end
        // the line or the token (the route table only ever produces origin form).
        if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return error(AppError::bad_request(
                "invalid_path",
                "the path is not allowed",
            ));
        }

        let bodyless = body.is_end_stream();
        let framing = if bodyless {
            RequestFraming::Empty
        } else if parts.headers.contains_key(header::CONTENT_LENGTH)
            && body.size_hint().exact().is_some()
        {
            RequestFraming::Length
        } else {
            RequestFraming::Chunked
        };
        // Retries go to another endpoint, and only for requests with nothing to replay.
        let retryable = bodyless && is_idempotent(&parts.method) && upstream.has_alternatives();
        let mut body = Some(if bodyless {
            OutboundBody::Empty
        } else {
            OutboundBody::Limited {
                inner: body,
                remaining: shared.options.body_limit,
            }
        });
        let request_head = RequestHead {
            method: &parts.method,
            target,
            headers: &parts.headers,
            framing,
            forwarded_for: &client.forwarded_for,
            forwarded_host: parts.headers.get(header::HOST),
            request_id: hop.request_id,
            traceparent: &hop.traceparent,
            drop_tracestate: hop.new_trace,
        };
        let mut avoid = None;
        let mut attempt = 0;
        loop {
            let Some(endpoint) = upstream.pick(avoid.as_ref()) else {
                if first_list(upstream, shared.options.connect_timeout).await {
                    continue;
                }
                upstream.breaker.record_failure();
                upstream_metrics.count(&upstream.name, "no_endpoint");
                return error(AppError::unavailable(&upstream.name, "no healthy endpoint"));
            };
            let slot = InFlight::new(endpoint.clone());
            let outbound = body.take().unwrap_or(OutboundBody::Empty);

            let sent = tokio::time::Instant::now();
            let outcome = self
                .deadlines
                .run_until(
                    sent + shared.options.upstream_timeout,
                    self.pool
                        .send(&endpoint, &request_head, outbound, sent.into_std()),
                )
                .await;
            let elapsed = sent.elapsed();
            let can_retry = retryable && attempt < MAX_RETRIES;
            match outcome {
                Err(_) => {
                    upstream.breaker.record_failure();
                    upstream_metrics.observe(&upstream.name, "timeout", elapsed);
                    return error(AppError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        format!(
                            "{} did not answer within {:?}",
                            upstream.name, shared.options.upstream_timeout
                        ),
                    ));
                }
                Ok(Err(SendError::Connect(_))) => {
                    endpoint.eject(upstream.eject_backoff);
                    upstream.breaker.record_failure();
                    upstream_metrics.observe(&upstream.name, "connect_error", elapsed);
                    if can_retry && upstream.budget.try_withdraw() {
                        attempt += 1;
                        avoid = Some(endpoint);
                        continue;
                    }
                    return error(AppError::unavailable(&upstream.name, "connection refused"));
                }
                Ok(Err(SendError::BodyTooLarge)) => {
                    upstream.breaker.record_success();
                    return error(too_large());
                }
                Ok(Err(SendError::ClientBody(err))) => {
                    // The client broke off its upload: nothing the upstream did.
                    tracing::debug!(upstream = %upstream.name, error = %err, "client body broke off");
                    return error(AppError::bad_request(
                        "incomplete_body",
                        "the request body broke off before its end",
                    ));
                }
                Ok(Err(SendError::Exchange(err))) => {
                    upstream.breaker.record_failure();
                    upstream_metrics.observe(&upstream.name, "error", elapsed);
                    tracing::warn!(upstream = %upstream.name, error = %err, "upstream exchange failed");
                    return error(AppError::new(
                        StatusCode::BAD_GATEWAY,
                        "bad_gateway",
                        format!("{} closed the connection without answering", upstream.name),
                    ));
                }
                Ok(Ok(response)) => {
                    let status = response.status();
                    endpoint.mark_healthy();
                    self.observe_upstream(upstream_id, status, elapsed);
                    let failed = matches!(status.as_u16(), 502..=504);
                    if failed {
                        upstream.breaker.record_failure();
                    } else {
                        upstream.breaker.record_success();
                    }
                    if status == StatusCode::SERVICE_UNAVAILABLE
                        && can_retry
                        && upstream.budget.try_withdraw()
                    {
                        attempt += 1;
                        avoid = Some(endpoint);
                        continue;
                    }
                    if let (Some(cache), Some(key)) = (&shared.cache, cache_key.take())
                        && let Some((ttl, _)) =
                            freshness(status, response.headers(), cache.max_entry())
                    {
                        let (mut head, incoming) = response.into_parts();
                        // Small by construction (Content-Length within the entry limit).
                        let Ok(collected) = incoming.collect().await else {
                            upstream_metrics.stream_errors(&upstream.name).inc();
                            return error(AppError::new(
                                StatusCode::BAD_GATEWAY,
                                "bad_gateway",
                                format!("{} broke off its response", upstream.name),
                            ));
                        };
                        strip_hop_by_hop(&mut head.headers);
                        let entry = cache.put(key, head.headers, collected.to_bytes(), ttl);
                        upstream_metrics.cache(&upstream.name, "stored");
                        return from_cache(&entry, entry.matches(if_none_match.as_ref()), "miss");
                    }
                    let (head, incoming) = response.into_parts();
                    let body = Streamed {
                        inner: incoming,
                        _slot: slot,
                        stream_errors: upstream.stream_errors.clone(),
                    };
                    crate::http::h1::recycle_map(std::mem::take(&mut parts.headers));
                    return Response::from_parts(head, Either::Left(body));
                }
            }
        }
    }
}
