//! A worker's upstream connections and the HTTP/1.1 exchange on them, driven inline in the
//! request's own task (no connection task, no channel): the pool lends a TCP stream per
//! endpoint, the request head goes out in one write, the response head is parsed from the
//! stream's read buffer, and the response body ([`UpstreamBody`]) reads its framing from
//! the stream and gives the connection back only when the body ended cleanly.
//!
//! Connections are owned by one worker thread, so checking one out is a `Vec::pop` with no
//! lock. Idle connections older than the idle timeout, or that the upstream closed, are
//! dropped by a sweeper.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Method, Response};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::http::body::{BodyLimitExceeded, OutboundBody};
use crate::http::h1::{self, LAST_CHUNK, RequestFraming, RequestHead};
use crate::upstream::Endpoint;

/// The client's body as the pool reads it (the front end's request body).
pub trait ClientBody: hyper::body::Body<Data = Bytes, Error = io::Error> + Unpin {}

impl<B: hyper::body::Body<Data = Bytes, Error = io::Error> + Unpin> ClientBody for B {}

/// Per-worker maps keyed by a packed `u64` (metric label sets, endpoint ids): a SipHash
/// per request costs more than the counter increments or pool lookups it guards.
pub type HandleMap<V> = HashMap<u64, V, BuildHasherDefault<PackedKeyHasher>>;

#[derive(Default)]
pub struct PackedKeyHasher(u64);

impl Hasher for PackedKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, key: u64) {
        // Fibonacci hashing spreads the packed fields into the high bits hashbrown uses.
        self.0 = (self.0 ^ key).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

mod body;

pub use body::UpstreamBody;

/// Free space asked of the read buffer before reading a response head: most heads and
/// many whole API responses fit, and a small buffer per connection keeps memory flat.
const HEAD_CHUNK: usize = 2 * 1024;
/// Free space asked before each read of a body the head read did not already hold.
const BODY_CHUNK: usize = 16 * 1024;
/// Idle connections keep at most this much read buffer; request heads are encoded in a
/// scratch buffer kept up to this size.
const IDLE_BUFFER: usize = 4 * 1024;

pub struct Pool {
    /// By endpoint id (a small integer: no SipHash needed).
    idle: RefCell<HandleMap<Vec<Idle>>>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    /// Request heads are encoded here; taken for the write and put back after.
    scratch: RefCell<Vec<u8>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One upstream connection and the bytes read from it but not yet consumed.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection can carry a request: the upstream has neither closed it
    /// nor sent anything unasked. Readiness the runtime already knows is checked first, so
    /// the common case costs no system call.
    fn is_reusable(&self) -> bool {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(
                    self.stream.try_read(&mut probe),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock
                )
            }
        }
    }

    async fn read_more(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < HEAD_CHUNK / 2 {
            self.buf.reserve(HEAD_CHUNK);
        }
        tokio::io::AsyncReadExt::read_buf(&mut self.stream, &mut self.buf).await
    }
}

#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: the endpoint is down (eject it; safe to retry).
    Connect(io::Error),
    /// The exchange failed after the request may have reached the upstream.
    Exchange(io::Error),
    /// The client's body went over the limit (the upstream connection is dropped).
    BodyTooLarge,
    /// The client's body broke off: the client's failure, not the upstream's.
    ClientBody(io::Error),
}

/// A failed exchange, and whether sending it again cannot repeat it upstream.
struct Failed {
    error: SendError,
    /// A reused connection the upstream had closed, and the request either provably
    /// unsent or idempotent with no body consumed.
    stale: bool,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration, connect_timeout: Duration) -> Rc<Self> {
        Rc::new(Self {
            idle: RefCell::default(),
            max_idle,
            idle_timeout,
            connect_timeout,
            scratch: RefCell::new(Vec::new()),
        })
    }

    /// Closes idle connections past the idle timeout or closed by the upstream, every half
    /// timeout, until the worker's runtime ends. Runs on the worker's `LocalSet`.
    pub fn spawn_sweeper(self: &Rc<Self>) {
        let pool = Rc::downgrade(self);
        let period = (self.idle_timeout / 2).max(Duration::from_millis(10));
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                let now = Instant::now();
                pool.idle.borrow_mut().retain(|_, conns| {
                    conns.retain(|c| {
                        now.duration_since(c.since) < pool.idle_timeout && c.conn.is_reusable()
                    });
                    !conns.is_empty()
                });
            }
        });
    }

    fn put(&self, key: u64, mut conn: Conn) {
        if conn.buf.capacity() > IDLE_BUFFER {
            conn.buf = BytesMut::new();
        }
        let mut idle = self.idle.borrow_mut();
        let conns = idle.entry(key).or_default();
        if conns.len() < self.max_idle {
            conns.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    fn take(&self, key: u64, now: Instant) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        let conns = idle.get_mut(&key)?;
        while let Some(idle) = conns.pop() {
            if now.duration_since(idle.since) < self.idle_timeout && idle.conn.is_reusable() {
                return Some(idle.conn);
            }
        }
        None
    }

    async fn connect(&self, endpoint: &Endpoint) -> Result<Conn, SendError> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(endpoint.authority.as_str()),
        )
        .await
        .map_err(|_| SendError::Connect(io::ErrorKind::TimedOut.into()))?
        .map_err(SendError::Connect)?;
        let _ = stream.set_nodelay(true);
        Ok(Conn::new(stream))
    }

    /// Sends the request on a pooled connection (or a new one) and reads the response
    /// head. A pooled connection the upstream had closed in the meantime is replaced once,
    /// when that cannot repeat the request upstream.
    /// `now` is the caller's clock reading for this attempt (one fewer per request).
    pub async fn send<B: ClientBody>(
        self: &Rc<Self>,
        endpoint: &Arc<Endpoint>,
        head: &RequestHead<'_>,
        body: OutboundBody<B>,
        now: Instant,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let key = endpoint.id;
        let mut body = body;
        if let Some(conn) = self.take(key, now) {
            match self
                .exchange(key, conn, true, endpoint, head, &mut body)
                .await
            {
                Ok(response) => return Ok(response),
                Err(Failed { stale: true, .. }) => {}
                Err(Failed { error, .. }) => return Err(error),
            }
        }
        let conn = self.connect(endpoint).await?;
        self.exchange(key, conn, false, endpoint, head, &mut body)
            .await
            .map_err(|f| f.error)
    }

    async fn exchange<B: ClientBody>(
        self: &Rc<Self>,
        key: u64,
        mut conn: Conn,
        reused: bool,
        endpoint: &Endpoint,
        head: &RequestHead<'_>,
        body: &mut OutboundBody<B>,
    ) -> Result<Response<UpstreamBody>, Failed> {
        let mut out = std::mem::take(&mut *self.scratch.borrow_mut());
        out.clear();
        head.encode(&endpoint.host_header, &mut out);
        let written = write_counting(&mut conn.stream, &out).await;
        if out.capacity() <= IDLE_BUFFER {
            *self.scratch.borrow_mut() = out;
        }
        let idempotent = is_idempotent(head.method);
        let mut body_started = false;
        // A write refused outright sent nothing: safe to send again, whatever the method.
        let stale_after_write = |written: usize, body_started: bool| {
            reused && (written == 0 || (idempotent && !body_started))
        };
        if let Err((n, e)) = written {
            return Err(Failed {
                stale: stale_after_write(n, false),
                error: SendError::Exchange(e),
            });
        }
        // `true` when the upload was cut short by the upstream (it answered early or
        // stopped reading): the response may still be there to read, but the connection
        // cannot carry another exchange.
        let mut upload_cut = false;
        if head.framing != RequestFraming::Empty {
            body_started = true;
            match send_body(&mut conn, body, head.framing).await {
                Ok(()) => {}
                Err(BodyFailure::Client(e)) => {
                    return Err(Failed {
                        stale: false,
                        error: e,
                    });
                }
                Err(BodyFailure::UploadCut) => upload_cut = true,
            }
        }
        let response = loop {
            let parsed = if conn.buf.is_empty() {
                Ok(None)
            } else {
                h1::parse_response(&mut conn.buf, head.method)
            };
            match parsed {
                Ok(Some(response)) => break response,
                Ok(None) => {}
                Err(e) => {
                    return Err(Failed {
                        stale: false,
                        error: SendError::Exchange(e.into()),
                    });
                }
            }
            let nothing_yet = conn.buf.is_empty();
            match conn.read_more().await {
                Ok(0) => {
                    return Err(Failed {
                        stale: nothing_yet && !upload_cut && stale_after_write(1, body_started),
                        error: SendError::Exchange(io::ErrorKind::UnexpectedEof.into()),
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    let reset = matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    );
                    return Err(Failed {
                        stale: reset
                            && nothing_yet
                            && !upload_cut
                            && stale_after_write(1, body_started),
                        error: SendError::Exchange(e),
                    });
                }
            }
        };
        let keep_alive = response.keep_alive && !upload_cut;
        let mut builder = Response::builder()
            .status(response.status)
            .version(response.version);
        if let Some(headers) = builder.headers_mut() {
            *headers = response.headers;
        }
        let body = UpstreamBody::new(self.clone(), key, conn, response.framing, keep_alive);
        Ok(builder.body(body).expect("status and version are valid"))
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// `write_all`, reporting how much went out before an error.
async fn write_counting(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut written = 0;
    while written < bytes.len() {
        match stream.write(&bytes[written..]).await {
            Ok(0) => return Err((written, io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) => return Err((written, e)),
        }
    }
    Ok(())
}

enum BodyFailure {
    /// The client's side failed (over the limit, or broke off): the exchange is over.
    Client(SendError),
    /// The upstream stopped taking the body: it may have answered already.
    UploadCut,
}

/// Streams the client's body upstream. An upstream that answers before the body is
/// complete (a 413, say) ends the upload: per RFC 9112 section 9.5 the rest is not sent.
async fn send_body<B: ClientBody>(
    conn: &mut Conn,
    body: &mut OutboundBody<B>,
    framing: RequestFraming,
) -> Result<(), BodyFailure> {
    let mut chunk = Vec::new();
    loop {
        let frame = tokio::select! {
            biased;
            frame = body.frame() => frame,
            ready = conn.stream.readable() => {
                if ready.is_ok() && early_answer(conn) {
                    return Err(BodyFailure::UploadCut);
                }
                continue;
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                return Err(BodyFailure::Client(if e.is::<BodyLimitExceeded>() {
                    SendError::BodyTooLarge
                } else {
                    SendError::ClientBody(io::Error::other(e))
                }));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                // Trailers are not forwarded.
                _ => continue,
            },
        };
        match framing {
            RequestFraming::Chunked => {
                chunk.clear();
                h1::encode_chunk(&data, &mut chunk);
                write_or_answer(conn, &chunk).await?;
            }
            _ => write_or_answer(conn, &data).await?,
        }
    }
    if framing == RequestFraming::Chunked {
        write_or_answer(conn, LAST_CHUNK).await?;
    }
    Ok(())
}

/// Writes `bytes`, unless the upstream answers (or closes) while the write waits for room.
async fn write_or_answer(conn: &mut Conn, bytes: &[u8]) -> Result<(), BodyFailure> {
    let mut written = 0;
    while written < bytes.len() {
        match conn.stream.try_write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::select! {
                    biased;
                    ready = conn.stream.writable() => {
                        ready.map_err(|_| BodyFailure::UploadCut)?;
                    }
                    ready = conn.stream.readable() => {
                        if ready.is_ok() && early_answer(conn) {
                            return Err(BodyFailure::UploadCut);
                        }
                    }
                }
            }
            Err(_) => return Err(BodyFailure::UploadCut),
        }
    }
    Ok(())
}

/// Reads whatever the upstream sent while the body was going out; true when it closed the
/// connection or a final response has begun (an interim 1xx does not stop the upload).
fn early_answer(conn: &mut Conn) -> bool {
    if conn.buf.capacity() - conn.buf.len() < HEAD_CHUNK / 2 {
        conn.buf.reserve(HEAD_CHUNK);
    }
    match conn.stream.try_read_buf(&mut conn.buf) {
        Ok(0) => true,
        // Rare, so a copy is fine: is there a final head (or garbage) past any 1xx?
        Ok(_) => !matches!(
            h1::parse_response(&mut conn.buf.clone(), &Method::POST),
            Ok(None)
        ),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}
