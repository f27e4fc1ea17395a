//! The published API contract: `GET /api/openapi.json` is every service's own OpenAPI
//! document (generated from its handlers) merged under the paths this gateway exposes,
//! with the gateway's access policies and its own answers added; `GET /api/docs` is a
//! page that renders it, with its script and style served from the binary (no CDN).
//!
//! Reached only for requests that matched no route, so proxied requests never pay for it.
//! The merged document is rebuilt at most every [`TTL`], so it follows the deployed
//! services and the route table actually loaded.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use shop_platform::AppError;

use crate::Shared;
use crate::http::body::{error, local};
use crate::policy::routes::Route;

mod merge;

pub use merge::merge;
#[cfg(test)]
use merge::merge_schemas;

pub const DOCUMENT: &str = "/api/openapi.json";
pub const PAGE: &str = "/api/docs";
const SCRIPT: &str = "/api/docs/docs.js";
const STYLE: &str = "/api/docs/docs.css";
const TTL: Duration = Duration::from_secs(30);
/// A service document larger than this is refused rather than buffered.
const MAX_DOCUMENT: usize = 4 << 20;

const PAGE_HTML: &str = include_str!("index.html");
const PAGE_JS: &str = include_str!("docs.js");
const PAGE_CSS: &str = include_str!("docs.css");

/// The merged document, rebuilt when older than [`TTL`].
#[derive(Default)]
pub struct ApiDocs {
    cached: Mutex<Option<(Instant, Bytes)>>,
}

/// Whether a path is one of ours (for the route-table test).
pub fn is_local(path: &str) -> bool {
    matches!(path, DOCUMENT | PAGE | SCRIPT | STYLE)
}

/// Answers the documentation paths; `None` for any other path.
pub async fn serve(shared: &Shared, path: &str, method: &Method) -> Option<Response<Full<Bytes>>> {
    if !is_local(path) {
        return None;
    }
    if !matches!(*method, Method::GET | Method::HEAD) {
        let mut response = error(AppError::from_status(StatusCode::METHOD_NOT_ALLOWED));
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Some(response);
    }
    let mut response = match path {
        PAGE => local(StatusCode::OK, "text/html; charset=utf-8", PAGE_HTML),
        SCRIPT => local(StatusCode::OK, "text/javascript; charset=utf-8", PAGE_JS),
        STYLE => local(StatusCode::OK, "text/css; charset=utf-8", PAGE_CSS),
        _ => match document(shared).await {
            Ok(body) => local(StatusCode::OK, "application/json", body),
            Err(reason) => {
                let mut err = AppError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "docs_unavailable",
                    format!("the API document cannot be assembled right now: {reason}"),
                );
                err.retry_after_secs = Some(5);
                return Some(error(err));
            }
        },
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=30"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    Some(response)
}

async fn document(shared: &Shared) -> Result<Bytes, String> {
    let docs = &shared.docs;
    if let Some((at, body)) = docs.cached.lock().expect("not poisoned").as_ref()
        && at.elapsed() < TTL
    {
        return Ok(body.clone());
    }
    let timeout = shared.options.upstream_timeout;
    let mut fetched = Vec::with_capacity(shared.upstreams.len());
    for upstream in &shared.upstreams {
        let endpoint = upstream
            .pick(None)
            .ok_or_else(|| format!("{} has no healthy endpoint", upstream.name))?;
        let doc = tokio::time::timeout(timeout, fetch(endpoint.authority.as_str()))
            .await
            .map_err(|_| format!("{} did not send its document in time", upstream.name))?
            .map_err(|e| format!("{}: {e}", upstream.name))?;
        fetched.push(doc);
    }
    let names: Vec<&str> = shared.upstreams.iter().map(|u| u.name.as_str()).collect();
    let merged = merge(&shared.table, &names, &fetched);
    let body = Bytes::from(merged.to_string());
    *docs.cached.lock().expect("not poisoned") = Some((Instant::now(), body.clone()));
    Ok(body)
}

/// `GET /openapi.json` from one endpoint, on a connection of its own (this is rare).
async fn fetch(authority: &str) -> Result<Value, String> {
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::task::spawn_local(async move {
        let _ = connection.await;
    });
    let request = Request::get("/openapi.json")
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let outcome = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if response.status() != StatusCode::OK {
            return Err(format!("answered {}", response.status().as_u16()));
        }
        let body = Limited::new(response.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
    }
    .await;
    driver.abort();
    outcome
}

/// How a route exposes an upstream path, if it does: the public path.
fn expose(route: &Route, upstream_path: &str) -> Option<String> {
    match route.label.strip_suffix("/*") {
        None => (route.rewrite(&route.label, None) == upstream_path).then(|| route.label.clone()),
        Some(prefix) => {
            let base = route.rewrite(prefix, None);
            let inside = upstream_path == base
                || base == "/"
                || upstream_path
                    .strip_prefix(base.as_str())
                    .is_some_and(|rest| rest.starts_with('/'));
            inside.then(|| format!("{}{upstream_path}", route.strip()))
        }
    }
}

#[cfg(test)]
mod tests;
