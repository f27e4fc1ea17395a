//! The gateway's HTTP/1.1 client codec for upstream exchanges: the request head written
//! into one buffer straight from the incoming request's parts, the response head parsed
//! with `httparse` over the connection's read buffer (header values are slices of it, not
//! copies), and the response body's framing (length, chunked, until close).
//!
//! Doing this inline in the request's task, rather than through hyper's client (a request
//! channel to a connection task that parses into a second header map), halves the
//! user-space work of an upstream exchange.

use std::io;
use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

mod chunked;

pub use chunked::{ChunkedDecoder, Decoded};

/// Response head lines accepted from an upstream; more is a malformed answer.
pub const MAX_RESPONSE_HEADERS: usize = 100;
/// Largest response head accepted from an upstream.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest chunk-size line (extensions included) and trailer section accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// How a request body goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body (nothing follows the head).
    Empty,
    /// The client's `Content-Length`, passed on as it is.
    Length,
    /// Unknown length: re-chunked (the client's `Transfer-Encoding` is hop-by-hop).
    Chunked,
}

/// What the gateway sends upstream, borrowed from the incoming request. Hop-by-hop
/// headers are already gone from `headers`; `Host` and the `X-Forwarded-*` set are
/// written here rather than inserted into the map first.
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// Origin form, `/path?query`, after the route's rewrite.
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    pub framing: RequestFraming,
    /// The client's address, appended to any `X-Forwarded-For` it sent.
    pub forwarded_for: &'a HeaderValue,
    /// The client's `Host`, sent as `X-Forwarded-Host` (a client's own value is kept
    /// when it sent no `Host`).
    pub forwarded_host: Option<&'a HeaderValue>,
    /// Replace any the client sent.
    pub request_id: &'a HeaderValue,
    pub traceparent: &'a [u8],
    /// A trace started here: the client's `tracestate` is not passed on.
    pub drop_tracestate: bool,
}

impl RequestHead<'_> {
    /// Appends the request line and headers, ending with the blank line, to `out`.
    pub fn encode(&self, host: &HeaderValue, out: &mut Vec<u8>) {
        out.reserve(256 + self.headers.len() * 32);
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
        line(out, b"x-request-id", self.request_id.as_bytes());
        line(out, b"traceparent", self.traceparent);
        let mut prior_forwarded_for = false;
        for (name, value) in self.headers {
            // `Expect` was met at the gateway's hop (the client got its 100 Continue); the
            // body follows the head at once, so the upstream is not asked again.
            if *name == header::HOST
                || *name == header::EXPECT
                || *name == crate::http::REQUEST_ID
                || *name == crate::http::trace::TRACEPARENT
                || (self.drop_tracestate && *name == crate::http::trace::TRACESTATE)
                || *name == X_FORWARDED_PROTO
                || (*name == X_FORWARDED_HOST && self.forwarded_host.is_some())
                || (*name == header::CONTENT_LENGTH && self.framing != RequestFraming::Length)
            {
                continue;
            }
            if *name == X_FORWARDED_FOR {
                prior_forwarded_for = true;
                continue;
            }
            line(out, name.as_str().as_bytes(), value.as_bytes());
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        if prior_forwarded_for {
            for prior in self.headers.get_all(X_FORWARDED_FOR) {
                out.extend_from_slice(prior.as_bytes());
                out.extend_from_slice(b", ");
            }
        }
        out.extend_from_slice(self.forwarded_for.as_bytes());
        out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
        if let Some(host) = self.forwarded_host {
            line(out, b"x-forwarded-host", host.as_bytes());
        }
        if self.framing == RequestFraming::Chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// One chunk of a chunked request body: size line, data, CRLF.
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len() + 20);
    let mut digits = [0u8; 16];
    let mut n = data.len();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// How the response body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    Empty,
    Length(u64),
    Chunked,
    /// Neither length nor chunked: the body ends when the upstream closes.
    UntilClose,
}

#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: ResponseFraming,
    /// The connection may carry another exchange after this body.
    pub keep_alive: bool,
}

/// A response the gateway cannot pass on.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("malformed response head: {0}")]
    Parse(#[from] httparse::Error),
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("invalid header {0:?}")]
    Header(String),
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    #[error("unsupported status {0} (no upgrade was requested)")]
    Switching(u16),
    #[error("malformed chunked body")]
    Chunk,
}

impl From<ProtocolError> for io::Error {
    fn from(err: ProtocolError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, err)
    }
}

/// Parses a response head from the front of `buf`. `Ok(None)`: incomplete, read more.
/// On success the head's bytes are consumed from `buf` (header values keep slices of
/// them); an interim (1xx) response is consumed and skipped.
pub fn parse_response(
    buf: &mut BytesMut,
    request_method: &Method,
) -> Result<Option<ResponseHead>, ProtocolError> {
    loop {
        // Left uninitialised: only the entries the parser fills are read.
        let mut slots =
            [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
        let mut indices = [(0u32, 0u32, 0u32, 0u32); MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let base = buf.as_ptr() as usize;
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut slots,
        )?;
        let len = match parsed {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => {
                return if buf.len() > MAX_HEAD_BYTES {
                    Err(ProtocolError::HeadTooLarge)
                } else {
                    Ok(None)
                };
            }
        };
        let code = response.code.unwrap_or(0);
        let version = if response.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let count = response.headers.len();
        record_offsets(&mut indices, response.headers, base);
        let head = buf.split_to(len).freeze();
        if code == 101 {
            return Err(ProtocolError::Switching(code));
        }
        if (100..200).contains(&code) {
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| ProtocolError::Switching(code))?;
        // Room for what the gateway adds to a response without the map growing.
        let mut headers = take_map(count + 4);
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut transfer_encoding = false;
        let mut close = version == Version::HTTP_10;
        for &(ns, ne, vs, ve) in &indices[..count] {
            let name_bytes = &head[ns as usize..ne as usize];
            let name = header_name(name_bytes)
                .ok_or_else(|| ProtocolError::Header(String::from_utf8_lossy(name_bytes).into()))?;
            let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
                .map_err(|_| ProtocolError::Header(name.as_str().to_owned()))?;
            if name == header::CONTENT_LENGTH {
                let n = parse_length(value.as_bytes()).ok_or(ProtocolError::ContentLength)?;
                if length.is_some_and(|l| l != n) {
                    return Err(ProtocolError::ContentLength);
                }
                length = Some(n);
            } else if name == header::TRANSFER_ENCODING {
                transfer_encoding = true;
                chunked = ends_chunked(value.as_bytes());
            } else if name == header::CONNECTION {
                for token in value.as_bytes().split(|&b| b == b',') {
                    if token.trim_ascii().eq_ignore_ascii_case(b"close") {
                        close = true;
                    }
                }
            }
            headers.append(name, value);
        }
        let framing = if *request_method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            ResponseFraming::Empty
        } else if transfer_encoding {
            // Transfer-Encoding overrides Content-Length, which is then dropped
            // (RFC 9112 section 6.3).
            headers.remove(header::CONTENT_LENGTH);
            if chunked {
                ResponseFraming::Chunked
            } else {
                ResponseFraming::UntilClose
            }
        } else {
            match length {
                Some(0) => ResponseFraming::Empty,
                Some(n) => ResponseFraming::Length(n),
                None => ResponseFraming::UntilClose,
            }
        };
        let keep_alive = !close && framing != ResponseFraming::UntilClose;
        return Ok(Some(ResponseHead {
            status,
            version,
            headers,
            framing,
            keep_alive,
        }));
    }
}

thread_local! {
    /// Emptied header maps kept for reuse by this worker thread: a fresh map costs two
    /// allocations and their frees for every request head parsed.
    static MAPS: std::cell::RefCell<Vec<HeaderMap>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Maps kept per worker thread, and the largest kept (a map grown by an odd request is
/// dropped rather than kept at that size).
const KEPT_MAPS: usize = 256;
const KEPT_MAP_CAPACITY: usize = 64;

/// An empty header map for a head of `count` lines (a kept one when there is one).
pub fn take_map(count: usize) -> HeaderMap {
    match MAPS.with(|maps| maps.borrow_mut().pop()) {
        Some(mut map) => {
            map.reserve(count);
            map
        }
        None => HeaderMap::with_capacity(count),
    }
}

/// Gives a map whose message is done with back for reuse.
pub fn recycle_map(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > KEPT_MAP_CAPACITY {
        return;
    }
    map.clear();
    MAPS.with(|maps| {
        let mut maps = maps.borrow_mut();
        if maps.len() < KEPT_MAPS {
            maps.push(map);
        }
    });
}

/// Whether a `Transfer-Encoding` value's final coding is `chunked`: only then does the
/// coding delimit the body (RFC 9112 section 6.3).
pub fn ends_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// A header name, the ones clients send on nearly every request and upstreams on nearly
/// every response matched without the general parser (which lowercases and looks up
/// every name).
pub fn header_name(bytes: &[u8]) -> Option<HeaderName> {
    let common = match bytes.len() {
        4 if bytes.eq_ignore_ascii_case(b"host") => Some(header::HOST),
        4 if bytes.eq_ignore_ascii_case(b"date") => Some(header::DATE),
        4 if bytes.eq_ignore_ascii_case(b"etag") => Some(header::ETAG),
        6 if bytes.eq_ignore_ascii_case(b"accept") => Some(header::ACCEPT),
        10 if bytes.eq_ignore_ascii_case(b"user-agent") => Some(header::USER_AGENT),
        10 if bytes.eq_ignore_ascii_case(b"connection") => Some(header::CONNECTION),
        12 if bytes.eq_ignore_ascii_case(b"content-type") => Some(header::CONTENT_TYPE),
        13 if bytes.eq_ignore_ascii_case(b"authorization") => Some(header::AUTHORIZATION),
        13 if bytes.eq_ignore_ascii_case(b"cache-control") => Some(header::CACHE_CONTROL),
        14 if bytes.eq_ignore_ascii_case(b"content-length") => Some(header::CONTENT_LENGTH),
        _ => None,
    };
    common.or_else(|| HeaderName::from_bytes(bytes).ok())
}

pub fn parse_length(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > 19 {
        return None;
    }
    bytes.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// A `Host` field value as RFC 9112 section 3.2 allows it: `uri-host [ ":" port ]` in
/// RFC 3986's grammar (a registered name or IPv4 address, or an IP literal in brackets;
/// no user information, no path). Empty is valid (an authority that is empty).
pub fn is_valid_host(bytes: &[u8]) -> bool {
    let (host, port) = if let Some(literal) = bytes.strip_prefix(b"[") {
        let Some(end) = literal.iter().position(|&b| b == b']') else {
            return false;
        };
        let address = &literal[..end];
        let valid_literal = !address.is_empty()
            && if address[0].eq_ignore_ascii_case(&b'v') {
                // IPvFuture: "v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" )
                address
                    .iter()
                    .skip(1)
                    .all(|&b| is_unreserved(b) || is_sub_delim(b) || b == b':')
            } else {
                address
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            };
        if !valid_literal {
            return false;
        }
        (&[][..], &literal[end + 1..])
    } else {
        match bytes.iter().position(|&b| b == b':') {
            Some(colon) => (&bytes[..colon], &bytes[colon..]),
            None => (bytes, &[][..]),
        }
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(b":")
            .is_some_and(|digits| digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit));
    port_ok && is_reg_name(host)
}

/// RFC 3986 `reg-name` (which covers IPv4 addresses): unreserved, sub-delims and
/// well-formed percent-encodings.
fn is_reg_name(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let escaped = bytes.get(i + 1..i + 3);
            if !escaped.is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) {
                return false;
            }
            i += 3;
        } else if is_unreserved(b) || is_sub_delim(b) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

/// Where each parsed header's name and value sit in the read buffer (start and end
/// offsets from `base`), so the head can be frozen once and the map built from slices
/// of it after the parser's borrow ends.
pub(crate) fn record_offsets(
    indices: &mut [(u32, u32, u32, u32)],
    headers: &[httparse::Header<'_>],
    base: usize,
) {
    for (slot, h) in indices.iter_mut().zip(headers) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        *slot = (
            name as u32,
            (name + h.name.len()) as u32,
            value as u32,
            (value + h.value.len()) as u32,
        );
    }
}

#[cfg(test)]
mod tests;
