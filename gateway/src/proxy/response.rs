//! What the proxy answers with: the streamed upstream body and the answers it makes itself
//! (cache hits, refusals, errors), and the hop-by-hop headers it strips on the way.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, SizeHint};
use prometheus::IntCounter;
use shop_platform::AppError;

use super::ResponseBody;
use crate::http::body;
use crate::http::front::RequestBody;
use crate::policy::cache::Entry;
use crate::upstream::pool::UpstreamBody;
use crate::upstream::{InFlight, Upstream};

/// A cached entry as a response: the stored one, or a bodiless 304 when the client
/// already has this version.
pub(super) fn from_cache(
    entry: &Entry,
    not_modified: bool,
    result: &'static str,
) -> Response<ResponseBody> {
    let body = if not_modified {
        Bytes::new()
    } else {
        entry.body.clone()
    };
    let mut response = Response::new(Either::Right(Full::new(body)));
    if not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
    }
    let headers = response.headers_mut();
    if not_modified {
        for name in [
            header::CACHE_CONTROL,
            header::CONTENT_LOCATION,
            header::EXPIRES,
        ] {
            if let Some(value) = entry.headers.get(&name) {
                headers.insert(name, value.clone());
            }
        }
    } else {
        *headers = entry.headers.clone();
        headers.remove(header::CONTENT_LENGTH);
    }
    headers.insert(header::ETAG, entry.etag.clone());
    headers.insert(X_CACHE, HeaderValue::from_static(result));
    response
}

/// Upstreams parse at most 100 header lines and the gateway adds a few of its own: more
/// than this is refused here, as JSON, rather than by an upstream's parser without a body.
pub const MAX_HEADERS: usize = 90;

/// Requests no upstream could answer well, refused before anything is forwarded. Both
/// checks are a length and a flag already known.
pub(super) fn refuse_malformed(request: &Request<RequestBody>) -> Option<Response<ResponseBody>> {
    if request.headers().len() > MAX_HEADERS {
        return Some(error(AppError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_many_headers",
            format!("at most {MAX_HEADERS} header lines"),
        )));
    }
    // An upstream would answer without reading it and close the connection mid-upload.
    if matches!(*request.method(), Method::GET | Method::HEAD) && !request.body().is_end_stream() {
        return Some(error(AppError::bad_request(
            "body_not_allowed",
            "a GET or HEAD request carries no body",
        )));
    }
    None
}

pub(super) fn too_large() -> AppError {
    AppError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "request body is larger than the configured limit",
    )
}

/// A JSON error response (see [`body::error`]).
pub fn error(err: AppError) -> Response<ResponseBody> {
    body::error(err).map(Either::Right)
}

/// A response the gateway answers itself (see [`body::local`]).
pub fn local(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    body::local(status, content_type, body).map(Either::Right)
}

/// A gateway that has just started can be sent a connection before its first
/// EndpointSlice list (the Service still routes to its pod while a restarted container
/// comes up): such a request waits for that list, as long as a connect may take, rather
/// than failing. True when the list arrived; false when there is nothing to wait for.
pub(super) async fn first_list(upstream: &Upstream, limit: std::time::Duration) -> bool {
    let Some(status) = upstream.discovery.as_ref().filter(|s| !s.is_synced()) else {
        return false;
    };
    let until = tokio::time::Instant::now() + limit;
    while !status.is_synced() {
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    true
}

pub(super) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

pub(super) const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub(super) const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub(super) const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

pub(super) fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHORIZATION
        || *name == KEEP_ALIVE
        || *name == PROXY_CONNECTION
}

/// Connection-level headers are for one hop only (RFC 9110 7.6.1), including any the
/// `Connection` header names. Most messages carry none, so look once before removing.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    const HOP: [HeaderName; 6] = [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ];
    if let Some(named) = headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    {
        for name in named.split(',') {
            if let Ok(name) = HeaderName::from_bytes(name.trim().as_bytes()) {
                headers.remove(name);
            }
        }
    }
    for name in HOP {
        headers.remove(name);
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
}

/// The upstream's response body on its way to the client. Holds the endpoint's in-flight
/// slot until the last byte (or the client going away); counts streams cut mid-way. The
/// connection itself goes back to the pool from [`UpstreamBody`] when the body ends.
pub struct Streamed {
    pub(super) inner: UpstreamBody,
    pub(super) _slot: InFlight,
    pub(super) stream_errors: IntCounter,
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.stream_errors.inc();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
