//! The gateway's HTTP/1.1 server side: one connection, driven inline in its own task.
//! This module owns the connection loop (read a head, hand the request to the
//! [`Handler`], write the answer, keep alive or close) and the `Wire` (socket and read
//! buffer) its parts share: [`request`] parses heads, [`body`] lends the handler the
//! request body, [`response`] writes the answer.
//!
//! Keeps what hyper's server connection did for the gateway: a header read timeout, a bare
//! 400 (431 for too many or too large headers) and a close for requests no parser should
//! accept, keep-alive with pipelining, `100 Continue` on the first read of a body that
//! asked for it, and `Connection: close` once the worker drains.

mod body;
mod request;
mod response;

pub use body::RequestBody;

use request::{MAX_REQUEST_HEAD, Parsed, Refusal, parse_request};
use response::{linger, write_all, write_response};

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::future::Future;
use std::future::poll_fn;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Body;
use tokio::net::TcpStream;

use crate::http::deadline::{Deadlines, Timer};
use crate::http::h1::ChunkedDecoder;
use shop_platform::probes::Readiness;

/// Free space asked of the read buffer before each read.
const READ_CHUNK: usize = 4 * 1024;
/// Response bytes gathered before a write while the body keeps producing.
const WRITE_BATCH: usize = 64 * 1024;

/// One client connection's socket and unread bytes, shared by the connection loop and
/// the request body it lends to the handler (one thread, never borrowed across an await).
struct Wire {
    stream: TcpStream,
    buf: BytesMut,
    body: BodyState,
    /// Bytes of `100 Continue` still to send before the body is read.
    continue_pending: usize,
}

enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    Done,
    /// Broken (client went away or sent a malformed chunk): the connection cannot go on.
    Failed,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Wire {
    /// After the answer: a body the handler left unread is skipped when it has already
    /// arrived whole (a refused small upload), so the connection can go on; true when no
    /// body remains.
    fn skip_buffered_body(&mut self) -> bool {
        match self.body {
            BodyState::Done => true,
            BodyState::Length(n) if n <= self.buf.len() as u64 && self.continue_pending == 0 => {
                let _ = self.buf.split_to(n as usize);
                self.body = BodyState::Done;
                true
            }
            _ => false,
        }
    }
}

/// Live connections of a worker, so a draining worker can wait for them.
#[derive(Default)]
pub struct Connections {
    live: Cell<usize>,
    idle: tokio::sync::Notify,
    draining: Cell<bool>,
}

impl Connections {
    /// From now on idle connections close and busy ones answer with `Connection: close`;
    /// the caller ends the idle waits (the worker's head-read timers).
    pub fn drain(&self) {
        self.draining.set(true);
    }

    pub async fn drained(&self) {
        while self.live.get() > 0 {
            self.idle.notified().await;
        }
    }
}

struct LiveGuard(Rc<Connections>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let n = self.0.live.get() - 1;
        self.0.live.set(n);
        if n == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What a connection asks of the handler behind it (the proxy's worker): the connection
/// knows nothing of what the handler does with a request.
pub trait Handler {
    /// The peer, as the handler wants it for each request.
    type Client;
    /// The response body the handler answers with.
    type Body: Body<Data = Bytes> + Unpin;

    /// The worker's timers; the connection's header read timeout is one of them.
    fn deadlines(&self) -> &Rc<Deadlines>;

    fn handle(
        &self,
        request: Request<RequestBody>,
        client: &Self::Client,
    ) -> impl Future<Output = Result<Response<Self::Body>, Infallible>>;
}

pub struct Front<H> {
    pub worker: Rc<H>,
    pub header_read_timeout: Duration,
    pub connections: Rc<Connections>,
    /// Shutting down (ready already 503, SHUTDOWN_DELAY running): each keep-alive
    /// connection closes after its next response, so clients reconnect to a pod that
    /// stays instead of racing the close of idle connections when the listener stops.
    pub readiness: Readiness,
}

impl<H: Handler> Front<H> {
    pub async fn serve(self: Rc<Self>, stream: TcpStream, client: H::Client) {
        self.connections.live.set(self.connections.live.get() + 1);
        let _live = LiveGuard(self.connections.clone());
        let wire = Rc::new(RefCell::new(Wire {
            stream,
            buf: BytesMut::new(),
            body: BodyState::Done,
            continue_pending: 0,
        }));
        let mut out = Vec::new();
        // The header read timeout, one slot for the connection's life.
        let timer = self.worker.deadlines().timer();
        loop {
            let parsed = match self.read_head(&wire, &timer).await {
                Ok(Some(parsed)) => parsed,
                Ok(None) | Err(Refusal::Io) => return,
                Err(Refusal::Status(status)) => {
                    let head = format!(
                        "HTTP/1.1 {} {}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        status.as_str(),
                        status.canonical_reason().unwrap_or("")
                    );
                    let _ = write_all(&wire, head.as_bytes()).await;
                    return;
                }
                Err(Refusal::Invalid { code, message }) => {
                    let body = shop_platform::AppError::bad_request(code, message).body_json();
                    let head = format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = write_all(
                        &wire,
                        [head.as_bytes(), body.as_bytes()].concat().as_slice(),
                    )
                    .await;
                    return;
                }
            };
            let Parsed {
                request,
                body,
                keep_alive,
                expect_continue,
            } = parsed;
            let head_request = request.method == Method::HEAD;
            let version = request.version;
            {
                let mut w = wire.borrow_mut();
                w.body = body;
                w.continue_pending = if expect_continue && !matches!(w.body, BodyState::Done) {
                    CONTINUE.len()
                } else {
                    0
                };
            }
            let request = Request::from_parts(request, RequestBody { wire: wire.clone() });
            let Ok(response) = self.worker.handle(request, &client).await;
            let body_unread = !wire.borrow_mut().skip_buffered_body();
            let close = !keep_alive
                || body_unread
                || self.connections.draining.get()
                || self.readiness.is_shutting_down();
            out.clear();
            let http10 = version == Version::HTTP_10;
            let clean =
                write_response(&wire, response, head_request, http10, close, &mut out).await;
            if !clean {
                return;
            }
            if close {
                if body_unread {
                    linger(&wire).await;
                }
                return;
            }
            if out.capacity() > WRITE_BATCH {
                out = Vec::new();
            }
        }
    }

    /// The next request head; `None` when the client closed between requests, took
    /// longer than the header read timeout, or the worker drains while it is idle.
    async fn read_head(
        &self,
        wire: &Rc<RefCell<Wire>>,
        timer: &Timer,
    ) -> Result<Option<Parsed>, Refusal> {
        let due = tokio::time::Instant::now() + self.header_read_timeout;
        timer.arm(due);
        let parsed = self.read_head_until(wire, timer, due).await;
        timer.disarm();
        parsed
    }

    async fn read_head_until(
        &self,
        wire: &Rc<RefCell<Wire>>,
        timer: &Timer,
        due: tokio::time::Instant,
    ) -> Result<Option<Parsed>, Refusal> {
        loop {
            {
                let mut w = wire.borrow_mut();
                if !w.buf.is_empty() {
                    if let Some(parsed) = parse_request(&mut w.buf)? {
                        return Ok(Some(parsed));
                    }
                    if w.buf.len() > MAX_REQUEST_HEAD {
                        return Err(Refusal::Status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
                    }
                } else if self.connections.draining.get() {
                    return Ok(None);
                }
            }
            let read = poll_fn(|cx| {
                let mut w = wire.borrow_mut();
                let w = &mut *w;
                if w.buf.capacity() - w.buf.len() < READ_CHUNK / 2 {
                    w.buf.reserve(READ_CHUNK);
                }
                match tokio_util::io::poll_read_buf(Pin::new(&mut w.stream), cx, &mut w.buf) {
                    Poll::Ready(read) => Poll::Ready(Some(read)),
                    // Expired: the timeout, or the worker draining (see `drain`).
                    Poll::Pending if timer.poll_expired(cx) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            match read {
                None => {
                    let partial = !wire.borrow().buf.is_empty();
                    // A drain does not cut a request half received: it gets its answer.
                    if partial && tokio::time::Instant::now() < due {
                        timer.arm(due);
                        continue;
                    }
                    return Ok(None);
                }
                Some(Ok(0)) => return Ok(None),
                Some(Ok(_)) => {}
                Some(Err(_)) => return Err(Refusal::Io),
            }
        }
    }
}
