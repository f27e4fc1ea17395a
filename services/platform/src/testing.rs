//! Test harness shared by the service crates (feature `testing`): run a real
//! [`Application`] on port 0, or drive a router in-process with `oneshot`.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::server::Application;
use crate::shutdown::Shutdown;

/// A service serving on loopback until [`RunningApp::stop`].
pub struct RunningApp {
    pub addr: SocketAddr,
    pub url: String,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningApp {
    pub fn start(app: Application) -> Self {
        let addr = app.local_addr();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(app.run(shutdown.clone()));
        Self {
            addr,
            url: format!("http://{addr}"),
            shutdown,
            task,
        }
    }

    /// Triggers the graceful shutdown and waits for it to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        self.task.await?
    }
}

/// A decoded answer from [`call`].
#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl TestResponse {
    /// The `error.code` of a JSON error body.
    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn error_field(&self) -> &str {
        self.body["error"]["field"].as_str().unwrap_or("")
    }
}

/// Sends one request through `router` with `oneshot`. A `&str` body is sent raw (for
/// malformed input), a `Value` as JSON.
pub async fn call(
    router: &Router,
    method: Method,
    uri: &str,
    body: impl Into<TestBody>,
) -> TestResponse {
    let mut request = Request::builder().method(method).uri(uri);
    let body = match body.into() {
        TestBody::Empty => Body::empty(),
        TestBody::Json(value) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(value.to_string())
        }
        TestBody::Raw(content_type, bytes) => {
            if let Some(ct) = content_type {
                request = request.header(header::CONTENT_TYPE, ct);
            }
            Body::from(bytes)
        }
    };
    let response = router
        .clone()
        .oneshot(request.body(body).expect("valid request"))
        .await
        .expect("router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body readable")
        .to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    TestResponse {
        status,
        headers,
        body,
    }
}

pub enum TestBody {
    Empty,
    Json(Value),
    Raw(Option<&'static str>, Vec<u8>),
}

impl From<()> for TestBody {
    fn from(_: ()) -> Self {
        TestBody::Empty
    }
}

impl From<Value> for TestBody {
    fn from(value: Value) -> Self {
        TestBody::Json(value)
    }
}

/// Raw bytes labelled as JSON: for malformed-input tests.
impl From<&str> for TestBody {
    fn from(text: &str) -> Self {
        TestBody::Raw(Some("application/json"), text.as_bytes().to_vec())
    }
}

/// A fresh directory for a test's database, removed on drop.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

/// A loopback address where nothing listens: for "dependency down" tests.
pub fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}
