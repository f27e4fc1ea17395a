//! HTTP client for service-to-service calls: one pooled client per peer, created at
//! start-up; every call carries the caller's `traceparent` and `x-request-id`, has a
//! timeout, gets a client span, and is counted in `http_client_*` metrics. Calls made on a
//! caller's behalf relay the caller's credentials.
//! Transport failures become 503 [`AppError`]s naming the peer.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;
use tracing::field::Empty;

use crate::error::AppError;
use crate::identity::Caller;
use crate::metrics::Metrics;
use crate::middleware::{REQUEST_ID, current_request_id};
use crate::telemetry;

#[derive(Clone)]
pub struct ServiceClient {
    peer: &'static str,
    base_url: String,
    http: reqwest::Client,
    timeout: Duration,
    metrics: Metrics,
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
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            peer,
            base_url: base_url.trim_end_matches('/').to_owned(),
            http,
            timeout,
            metrics,
        })
    }

    /// Readiness check: the peer's `/health` answers 200. Deliberately neither traced nor
    /// counted, since it runs on every `/ready` poll.
    pub async fn check_health(&self) -> crate::probes::CheckResult {
        let url = format!("{}/health", self.base_url);
        match self.http.get(&url).timeout(self.timeout).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!(
                "{} answered {}",
                self.peer,
                response.status().as_u16()
            )),
            Err(err) if err.is_timeout() => Err(format!("{} did not answer in time", self.peer)),
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
        let url = format!("{}{}", self.base_url, path);
        let span = tracing::info_span!(
            "http.client",
            otel.name = %format_args!("{method} {}", self.peer),
            otel.kind = "client",
            otel.status_code = Empty,
            http.request.method = %method,
            server.address = self.peer,
            url.full = %url,
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
        let mut request = self
            .http
            .request(method.clone(), &url)
            .headers(headers)
            .timeout(self.timeout);
        if let Some(body) = body {
            request = request
                .header(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )
                .body(body);
        }

        let started = Instant::now();
        let outcome = async {
            let response = request.send().await?;
            let status = response.status();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, body))
        }
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
                let (label, message) = if err.is_timeout() {
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
