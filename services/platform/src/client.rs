//! HTTP client for service-to-service calls: one pooled client per peer, created at
//! start-up; every call carries the caller's `traceparent` and `x-request-id`, has a
//! timeout, gets a client span, and is counted in `http_client_*` metrics. Calls made on a
//! caller's behalf relay the caller's credentials.
//! Transport failures become 503 [`AppError`]s naming the peer.
//!
//! The transport is hyper's pooled client, which reqwest wraps: reqwest's own layers
//! (its URL type, parsed three times a call, and its redirect policy) cost 18,000 of the
//! 57,000 instructions a reservation call took in the order service (callgrind), and
//! service-to-service calls need none of them. A peer's address is parsed once, here.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::uri::{Authority, PathAndQuery, Scheme};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;
use tracing::field::Empty;

use crate::error::AppError;
use crate::identity::Caller;
use crate::metrics::Metrics;
use crate::middleware::{REQUEST_ID, current_request_id};
use crate::telemetry;

/// A peer's answer larger than this is refused rather than buffered.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone)]
pub struct ServiceClient {
    peer: &'static str,
    base_url: String,
    authority: Authority,
    /// The base URL's path, if any, without its trailing `/`: prefixed to every call's.
    base_path: String,
    http: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    metrics: Metrics,
}

/// Why a call got no complete answer.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("no answer in time")]
    Timeout,
    #[error(transparent)]
    Send(#[from] hyper_util::client::legacy::Error),
    #[error("reading the answer: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
}

impl CallError {
    fn is_connect(&self) -> bool {
        matches!(self, Self::Send(err) if err.is_connect())
    }
}

/// A complete answer from a peer (any status).
#[derive(Debug)]
pub struct PeerResponse {
    peer: &'static str,
    pub status: StatusCode,
    pub body: Bytes,
}

impl PeerResponse {
    /// Decodes a JSON body; an undecodable one means the peer is misbehaving (503).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, AppError> {
        serde_json::from_slice(&self.body).map_err(|err| AppError {
            cause: Some(err.into()),
            ..AppError::unavailable(self.peer, "answered with an unexpected body")
        })
    }

    pub fn error_message(&self) -> Option<String> {
        self.error_field("message")
    }

    /// The peer's `error.code`, to tell refusals apart.
    pub fn error_code(&self) -> Option<String> {
        self.error_field("code")
    }

    /// The peer's `error.field`: the request field a 422 named.
    pub fn invalid_field(&self) -> Option<String> {
        self.error_field("field")
    }

    fn error_field(&self, field: &str) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v.get("error")?.get(field)?.as_str().map(str::to_owned)
    }

    /// A 5xx from the peer is its failure, reported to our caller as unavailability.
    pub fn fail_on_server_error(self) -> Result<Self, AppError> {
        if self.status.is_server_error() {
            return Err(AppError::unavailable(
                self.peer,
                format!("answered {}", self.status.as_u16()),
            ));
        }
        Ok(self)
    }
}

impl ServiceClient {
    pub fn new(
        peer: &'static str,
        base_url: &str,
        timeout: Duration,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let base_url = base_url.trim_end_matches('/').to_owned();
        let uri: Uri = base_url
            .parse()
            .map_err(|err| anyhow::anyhow!("{peer}'s URL {base_url:?}: {err}"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            anyhow::bail!("{peer}'s URL {base_url:?} must start with http://");
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{peer}'s URL {base_url:?} names no host"))?;
        if uri.query().is_some() {
            anyhow::bail!("{peer}'s URL {base_url:?} may not have a query");
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();

        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout.min(Duration::from_secs(2))));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        Ok(Self {
            peer,
            base_url,
            authority,
            base_path,
            http,
            timeout,
            metrics,
        })
    }

    /// One exchange with the peer, bounded by the timeout from sending to the last byte.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let path_and_query = if self.base_path.is_empty() {
            PathAndQuery::try_from(path)
        } else {
            PathAndQuery::try_from(format!("{}{path}", self.base_path))
        };
        // The paths are ours (constants and ids the handlers validated).
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path_and_query.expect("a call's path is a valid URI path"))
            .build()
            .expect("scheme, authority and path are each valid");
        let mut request = Request::new(Full::new(body.map(Bytes::from).unwrap_or_default()));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let exchange = async {
            let response = self.http.request(request).await?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(CallError::Body)?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(CallError::Timeout))
    }

    /// Readiness check: the peer's `/health` answers 200. Deliberately neither traced nor
    /// counted, since it runs on every `/ready` poll.
    pub async fn check_health(&self) -> crate::probes::CheckResult {
        match self
            .exchange(Method::GET, "/health", HeaderMap::new(), None)
            .await
        {
            Ok((status, _)) if status.is_success() => Ok(()),
            Ok((status, _)) => Err(format!("{} answered {}", self.peer, status.as_u16())),
            Err(CallError::Timeout) => Err(format!("{} did not answer in time", self.peer)),
            Err(_) => Err(format!(
                "{} is not reachable at {}",
                self.peer, self.base_url
            )),
        }
    }

    pub async fn get(&self, path: &str) -> Result<PeerResponse, AppError> {
        self.send(Method::GET, path, None, None).await
    }

    /// A read on the caller's behalf: the peer checks the caller's rights itself.
    pub async fn get_as(&self, path: &str, caller: &Caller) -> Result<PeerResponse, AppError> {
        self.send(Method::GET, path, None, Some(caller)).await
    }

    pub async fn post_json<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<PeerResponse, AppError> {
        let bytes = serde_json::to_vec(body).map_err(AppError::internal)?;
        self.send(Method::POST, path, Some(bytes), None).await
    }

    pub async fn delete(&self, path: &str) -> Result<PeerResponse, AppError> {
        self.send(Method::DELETE, path, None, None).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        caller: Option<&Caller>,
    ) -> Result<PeerResponse, AppError> {
        let span = tracing::info_span!(
            "http.client",
            otel.name = %format_args!("{method} {}", self.peer),
            otel.kind = "client",
            otel.status_code = Empty,
            http.request.method = %method,
            server.address = self.peer,
            url.full = %format_args!("{}{path}", self.base_url),
            http.response.status_code = Empty,
            trace_id = Empty,
            span_id = Empty,
        );
        telemetry::record_ids(&span);

        let mut headers = HeaderMap::new();
        telemetry::inject_context(&span, &mut headers);
        if let Some(id) = current_request_id() {
            headers.insert(REQUEST_ID, id);
        }
        if let Some(caller) = caller {
            caller.relay(&mut headers);
        }
        if body.is_some() {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }

        let started = Instant::now();
        let outcome = self
            .exchange(method.clone(), path, headers, body)
            .instrument(span.clone())
            .await;
        self.metrics
            .client_duration
            .with_label_values(&[self.peer, method.as_str()])
            .observe(started.elapsed().as_secs_f64());

        match outcome {
            Ok((status, body)) => {
                self.count(&method, status.as_str());
                // As i64: the OpenTelemetry layer would turn a u16 into a string attribute.
                span.record("http.response.status_code", i64::from(status.as_u16()));
                if status.is_server_error() {
                    span.record("otel.status_code", "ERROR");
                }
                Ok(PeerResponse {
                    peer: self.peer,
                    status,
                    body,
                })
            }
            Err(err) => {
                span.record("otel.status_code", "ERROR");
                let (label, message) = if matches!(err, CallError::Timeout) {
                    ("timeout", format!("no answer within {:?}", self.timeout))
                } else if err.is_connect() {
                    ("connect_error", "cannot connect".to_owned())
                } else {
                    ("error", "request failed".to_owned())
                };
                self.count(&method, label);
                span.in_scope(
                    || tracing::warn!(peer = self.peer, error = %err, "call to peer failed"),
                );
                Err(AppError {
                    cause: Some(err.into()),
                    ..AppError::unavailable(self.peer, message)
                })
            }
        }
    }

    fn count(&self, method: &Method, status: &str) {
        self.metrics
            .client_requests
            .with_label_values(&[self.peer, method.as_str(), status])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::any;

    /// A peer that answers every request with its method and path, or with a body of
    /// `/big`'s size.
    async fn peer() -> String {
        let app = Router::new().fallback(any(|request: axum::extract::Request| async move {
            let path = request.uri().path().to_owned();
            if path.ends_with("/big") {
                return vec![b'x'; MAX_RESPONSE_BYTES + 1];
            }
            format!("{} {path}", request.method()).into_bytes()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    }

    fn client(base_url: &str, timeout: Duration) -> anyhow::Result<ServiceClient> {
        ServiceClient::new("peer", base_url, timeout, Metrics::new("test"))
    }

    fn counted(client: &ServiceClient, outcome: &str) -> u64 {
        client
            .metrics
            .client_requests
            .with_label_values(&["peer", "GET", outcome])
            .get()
    }

    #[tokio::test]
    async fn a_call_goes_to_the_path_under_the_base_url() {
        let base = peer().await;
        let plain = client(&base, Duration::from_secs(2)).unwrap();
        let answer = plain.get("/products/1?fields=name").await.unwrap();
        assert_eq!(
            (answer.status, &answer.body[..]),
            (StatusCode::OK, &b"GET /products/1"[..])
        );
        assert_eq!(counted(&plain, "200"), 1);

        let prefixed = client(&format!("{base}/shop/"), Duration::from_secs(2)).unwrap();
        let answer = prefixed.delete("/reservations/r-1").await.unwrap();
        assert_eq!(&answer.body[..], b"DELETE /shop/reservations/r-1");
        assert!(prefixed.check_health().await.is_ok());
    }

    #[test]
    fn a_url_it_cannot_call_is_refused_at_start() {
        for url in [
            "https://peer:8443",
            "peer:8080",
            "/relative",
            "http://peer:8080/?q=1",
        ] {
            let err = client(url, Duration::from_secs(1)).err();
            assert!(err.is_some_and(|e| e.to_string().contains(url)), "{url}");
        }
    }

    #[tokio::test]
    async fn a_peer_that_is_not_listening_is_unavailable() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let client = client(&url, Duration::from_secs(2)).unwrap();
        let err = client.get("/users/1").await.unwrap_err();
        assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.message, "peer: cannot connect");
        assert_eq!(counted(&client, "connect_error"), 1);
        let health = client.check_health().await.unwrap_err();
        assert_eq!(health, format!("peer is not reachable at {url}"));
    }

    #[tokio::test]
    async fn a_peer_that_does_not_answer_in_time_is_cut_off() {
        // Accepts, then never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let _held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let client = client(&url, Duration::from_millis(200)).unwrap();
        let started = Instant::now();
        let err = client.get("/users/1").await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(err.message, "peer: no answer within 200ms");
        assert_eq!(counted(&client, "timeout"), 1);
        assert_eq!(
            client.check_health().await.unwrap_err(),
            "peer did not answer in time"
        );
    }

    #[tokio::test]
    async fn an_answer_over_the_size_limit_is_refused_not_buffered() {
        let client = client(&peer().await, Duration::from_secs(5)).unwrap();
        let err = client.get("/big").await.unwrap_err();
        assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(counted(&client, "error"), 1);
    }
}
