//! (Over 500 lines: the connection loop, the request body it lends and the response
//! writer share the private `Wire`; a split by concern is issue 17's next step.)
//!
//! The gateway's HTTP/1.1 server side: one connection, driven inline in its own task.
//! The request head is parsed with `httparse` over the connection's read buffer (header
//! values are slices of it), the request body ([`RequestBody`]) reads its framing from the
//! same buffer and socket as the handler asks for it, and the response head and (when it
//! is already there) the first body bytes go out in one write.
//!
//! Keeps what hyper's server connection did for the gateway: a header read timeout, a bare
//! 400 (431 for too many or too large headers) and a close for requests no parser should
//! accept, keep-alive with pipelining, `100 Continue` on the first read of a body that
//! asked for it, and `Connection: close` once the worker drains.

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::future::Future;
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::http::deadline::{Deadlines, Timer};
use crate::http::h1::{self, ChunkedDecoder, Decoded, ProtocolError};
use shop_platform::probes::Readiness;

/// Request header lines accepted; more is a 431 (the handler refuses more than
/// the proxy's `MAX_HEADERS` with a JSON 431 of its own).
const MAX_REQUEST_HEADERS: usize = 100;
/// Largest request head accepted.
const MAX_REQUEST_HEAD: usize = 96 * 1024;
/// Free space asked of the read buffer before each read.
const READ_CHUNK: usize = 4 * 1024;
/// Response bytes gathered before a write while the body keeps producing.
const WRITE_BATCH: usize = 64 * 1024;
/// After an answer that left a request body unread, how long and how much of it is read
/// and dropped before closing, so the client sees the answer rather than a reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024 * 1024;

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

/// A request head the connection cannot take.
enum Refusal {
    /// Bytes no parser should accept: a bare status, then close.
    Status(StatusCode),
    /// A well-formed message the standard says to refuse: a JSON 400 naming why, then
    /// close.
    Invalid {
        code: &'static str,
        message: &'static str,
    },
    Io,
}

impl Refusal {
    fn invalid_host(message: &'static str) -> Self {
        Self::Invalid {
            code: "invalid_host",
            message,
        }
    }
}

struct Parsed {
    request: http::request::Parts,
    body: BodyState,
    keep_alive: bool,
    expect_continue: bool,
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

/// Parses a request head from the front of `buf`; `Ok(None)`: incomplete.
fn parse_request(buf: &mut BytesMut) -> Result<Option<Parsed>, Refusal> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_REQUEST_HEADERS];
    let mut indices = [(0u32, 0u32, 0u32, 0u32); MAX_REQUEST_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let base = buf.as_ptr() as usize;
    let bad = Refusal::Status(StatusCode::BAD_REQUEST);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::Status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        }
        Err(_) => return Err(bad),
    };
    let method = Method::from_bytes(request.method.unwrap_or("").as_bytes())
        .map_err(|_| Refusal::Status(StatusCode::BAD_REQUEST))?;
    let version = if request.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let path = request.path.unwrap_or("");
    let path_range = {
        let start = path.as_ptr() as usize - base;
        start..start + path.len()
    };
    let count = request.headers.len();
    h1::record_offsets(&mut indices, request.headers, base);
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path_range))
        .map_err(|_| Refusal::Status(StatusCode::BAD_REQUEST))?;
    // Room for what the gateway adds (identity headers) without the map growing.
    let mut headers = h1::take_map(count + 4);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    let mut hosts = 0;
    for &(ns, ne, vs, ve) in &indices[..count] {
        let name = request_header_name(&head[ns as usize..ne as usize])
            .ok_or(Refusal::Status(StatusCode::BAD_REQUEST))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
            .map_err(|_| Refusal::Status(StatusCode::BAD_REQUEST))?;
        if name == header::CONTENT_LENGTH {
            let n = h1::parse_length(value.as_bytes())
                .ok_or(Refusal::Status(StatusCode::BAD_REQUEST))?;
            if length.is_some_and(|l| l != n) {
                return Err(Refusal::Status(StatusCode::BAD_REQUEST));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            chunked = value
                .as_bytes()
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == header::EXPECT {
            expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        } else if name == header::HOST {
            hosts += 1;
            if !h1::is_valid_host(value.as_bytes()) {
                return Err(Refusal::invalid_host(
                    "the Host header is not a host[:port]",
                ));
            }
        }
        headers.append(name, value);
    }
    // RFC 9112 section 3.2: one Host line, required in HTTP/1.1. The gateway keys its
    // cache and `X-Forwarded-Host` on it, so it must be unambiguous.
    if hosts > 1 {
        return Err(Refusal::invalid_host(
            "a request carries one Host header, not several",
        ));
    }
    if hosts == 0 && version == Version::HTTP_11 {
        return Err(Refusal::invalid_host(
            "an HTTP/1.1 request needs a Host header",
        ));
    }
    // Section 3.2.2: with an absolute-form target, the target's authority is the host
    // and the received `Host` is replaced (a client cannot name two hosts at once).
    if uri.scheme().is_some() {
        let authority = uri
            .authority()
            .map(|a| a.as_str())
            .filter(|a| h1::is_valid_host(a.as_bytes()))
            .ok_or(Refusal::invalid_host(
                "the request target's authority is not a host[:port]",
            ))?;
        let host = HeaderValue::from_str(authority).map_err(|_| {
            Refusal::invalid_host("the request target's authority is not a host[:port]")
        })?;
        headers.insert(header::HOST, host);
    }
    // A request's body is chunked or has a length, never both and never anything else
    // (RFC 9112 section 6.3): the ambiguous cases are how requests get smuggled.
    let body = match (transfer_encoding, length) {
        (true, Some(_)) => return Err(Refusal::Status(StatusCode::BAD_REQUEST)),
        (true, None) if !chunked || version == Version::HTTP_10 => {
            return Err(Refusal::Status(StatusCode::BAD_REQUEST));
        }
        (true, None) => BodyState::Chunked(ChunkedDecoder::default()),
        (false, Some(0) | None) => BodyState::Done,
        (false, Some(n)) => BodyState::Length(n),
    };
    let keep_alive = match version {
        Version::HTTP_10 => keep_alive_token && !close,
        _ => !close,
    };
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Parsed {
        request: parts,
        body,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11,
    }))
}

/// Common request header names matched without the general parser.
fn request_header_name(bytes: &[u8]) -> Option<HeaderName> {
    let common = match bytes.len() {
        4 if bytes.eq_ignore_ascii_case(b"host") => Some(header::HOST),
        6 if bytes.eq_ignore_ascii_case(b"accept") => Some(header::ACCEPT),
        10 if bytes.eq_ignore_ascii_case(b"user-agent") => Some(header::USER_AGENT),
        10 if bytes.eq_ignore_ascii_case(b"connection") => Some(header::CONNECTION),
        12 if bytes.eq_ignore_ascii_case(b"content-type") => Some(header::CONTENT_TYPE),
        13 if bytes.eq_ignore_ascii_case(b"authorization") => Some(header::AUTHORIZATION),
        14 if bytes.eq_ignore_ascii_case(b"content-length") => Some(header::CONTENT_LENGTH),
        _ => None,
    };
    common.or_else(|| HeaderName::from_bytes(bytes).ok())
}

/// The request body as the handler reads it, straight from the connection.
pub struct RequestBody {
    wire: Rc<RefCell<Wire>>,
}

impl RequestBody {
    fn fail(
        w: &mut Wire,
        error: ProtocolErrorOrIo,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        w.body = BodyState::Failed;
        Poll::Ready(Some(Err(match error {
            ProtocolErrorOrIo::Protocol(e) => e.into(),
            ProtocolErrorOrIo::Io(e) => e,
        })))
    }
}

enum ProtocolErrorOrIo {
    Protocol(ProtocolError),
    Io(io::Error),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let mut w = self.wire.borrow_mut();
        let w = &mut *w;
        // The client waits for this before sending a body it announced with `Expect`.
        while w.continue_pending > 0 {
            let sent = CONTINUE.len() - w.continue_pending;
            match Pin::new(&mut w.stream).poll_write(cx, &CONTINUE[sent..]) {
                Poll::Ready(Ok(n)) if n > 0 => w.continue_pending -= n,
                Poll::Ready(Ok(_)) => {
                    return Self::fail(w, ProtocolErrorOrIo::Io(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Err(e)) => return Self::fail(w, ProtocolErrorOrIo::Io(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        loop {
            match &mut w.body {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Failed => {
                    return Poll::Ready(Some(Err(io::Error::other("request body already failed"))));
                }
                BodyState::Length(remaining) => {
                    if !w.buf.is_empty() {
                        let n = (*remaining).min(w.buf.len() as u64);
                        let data = w.buf.split_to(n as usize).freeze();
                        *remaining -= n;
                        if *remaining == 0 {
                            w.body = BodyState::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                BodyState::Chunked(decoder) => match decoder.decode(&mut w.buf) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::Done) => {
                        w.body = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(e) => return Self::fail(w, ProtocolErrorOrIo::Protocol(e)),
                },
            }
            if w.buf.capacity() - w.buf.len() < READ_CHUNK / 2 {
                w.buf.reserve(16 * 1024);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut w.stream), cx, &mut w.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    return Self::fail(
                        w,
                        ProtocolErrorOrIo::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the client closed the connection mid-body",
                        )),
                    );
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Self::fail(w, ProtocolErrorOrIo::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.wire.borrow().body, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.wire.borrow().body {
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// How the response body is delimited on the wire.
enum Out {
    None,
    Length(u64),
    Chunked,
    /// For an HTTP/1.0 client, which knows no chunks: the body ends with the connection.
    UntilClose,
}

/// Writes the response; false when the connection cannot go on (the body broke off, or
/// the client went away).
async fn write_response<B: Body<Data = Bytes> + Unpin>(
    wire: &Rc<RefCell<Wire>>,
    response: Response<B>,
    head_request: bool,
    http10: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> bool {
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut declared = None;
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH {
            declared = h1::parse_length(value.as_bytes());
        }
        has_date |= *name == header::DATE;
    }
    let framing = if bodiless {
        Out::None
    } else if let Some(n) = declared {
        Out::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        Out::Length(n)
    } else if http10 {
        Out::UntilClose
    } else {
        Out::Chunked
    };
    let close = close || matches!(framing, Out::UntilClose);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if *name == header::TRANSFER_ENCODING || *name == header::CONNECTION {
            continue;
        }
        if *name == header::CONTENT_LENGTH && declared.is_none() {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // A HEAD answer carries the length the GET would have, when it is known.
    let head_length = match (&framing, declared) {
        (Out::None, None) if head_request => body.size_hint().exact().filter(|&n| n > 0),
        _ => None,
    };
    if let Some(n) = head_length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Out::Length(n) if declared.is_none() => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Out::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&date());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if http10 {
        // HTTP/1.0 closes unless the server says otherwise.
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    h1::recycle_map(parts.headers);
    if matches!(framing, Out::None) {
        drop(body);
        return write_all(wire, out).await.is_ok();
    }
    let mut body = std::pin::pin!(body);
    let mut remaining = match framing {
        Out::Length(n) => n,
        _ => u64::MAX,
    };
    loop {
        // Whatever the body has ready goes out with what is gathered; wait only after a
        // write.
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => {
                if !out.is_empty() {
                    if write_all(wire, out).await.is_err() {
                        return false;
                    }
                    out.clear();
                }
                body.frame().await
            }
        };
        match frame {
            None => break,
            Some(Err(_)) => {
                // Broken mid-body: what was sent stays short or unterminated, and the
                // connection closes, so the client sees a broken stream.
                let _ = write_all(wire, out).await;
                return false;
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                match framing {
                    Out::Chunked => h1::encode_chunk(&data, out),
                    _ => {
                        let n = (data.len() as u64).min(remaining) as usize;
                        out.extend_from_slice(&data[..n]);
                        remaining -= n as u64;
                    }
                }
                // A body that knows it has ended is not polled again for its `None`.
                if body.is_end_stream() {
                    break;
                }
                if out.len() >= WRITE_BATCH {
                    if write_all(wire, out).await.is_err() {
                        return false;
                    }
                    out.clear();
                }
            }
        }
    }
    match framing {
        Out::Chunked => out.extend_from_slice(h1::LAST_CHUNK),
        Out::Length(_) if remaining != 0 => {
            // Shorter than declared: the client must not take it for the whole body.
            let _ = write_all(wire, out).await;
            return false;
        }
        Out::UntilClose => {
            let _ = write_all(wire, out).await;
            return false;
        }
        _ => {}
    }
    write_all(wire, out).await.is_ok()
}

async fn write_all(wire: &Rc<RefCell<Wire>>, bytes: &[u8]) -> io::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        let n = poll_fn(|cx| {
            let mut w = wire.borrow_mut();
            Pin::new(&mut w.stream).poll_write(cx, &bytes[written..])
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        written += n;
    }
    Ok(())
}

/// Reads and drops what the client still sends after an answer that did not read its
/// body, for a while, so closing does not reset the connection under the answer.
async fn linger(wire: &Rc<RefCell<Wire>>) {
    {
        let mut w = wire.borrow_mut();
        let _ = poll_fn(|cx| Pin::new(&mut w.stream).poll_shutdown(cx)).now_or_never();
    }
    let drain = async {
        let mut dropped = 0;
        while dropped < LINGER_BYTES {
            let read = poll_fn(|cx| {
                let mut w = wire.borrow_mut();
                let w = &mut *w;
                w.buf.clear();
                if w.buf.capacity() < 16 * 1024 {
                    w.buf.reserve(16 * 1024);
                }
                tokio_util::io::poll_read_buf(Pin::new(&mut w.stream), cx, &mut w.buf)
            })
            .await;
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => dropped += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// `Date` for responses that carry none, formatted once a second per thread.
fn date() -> [u8; 29] {
    thread_local! {
        static CACHED: Cell<(u64, [u8; 29])> = const { Cell::new((0, [0; 29])) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let (at, text) = cached.get();
        if at == secs {
            return text;
        }
        let mut text = [0u8; 29];
        let formatted = httpdate::fmt_http_date(now);
        text.copy_from_slice(&formatted.as_bytes()[..29]);
        cached.set((secs, text));
        text
    })
}
