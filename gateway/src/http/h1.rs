//! (Over 500 lines, with its tests: the head writer, head parser and chunked framing share
//! the buffer helpers here; a split by concern is issue 17's next step.)
//!
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

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

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
                // Only a final `chunked` coding delimits the body.
                chunked = value
                    .as_bytes()
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
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

/// The names upstreams send on nearly every response, matched without the general
/// parser (which lowercases and looks up every name).
fn header_name(bytes: &[u8]) -> Option<HeaderName> {
    let common = match bytes.len() {
        4 if bytes.eq_ignore_ascii_case(b"date") => Some(header::DATE),
        4 if bytes.eq_ignore_ascii_case(b"etag") => Some(header::ETAG),
        12 if bytes.eq_ignore_ascii_case(b"content-type") => Some(header::CONTENT_TYPE),
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

/// What the chunked decoder found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The buffer ends mid-way: read more.
    NeedMore,
    /// The last chunk and the trailers were read; the connection is at the next message.
    Done,
}

/// Decodes `Transfer-Encoding: chunked` incrementally; trailers are read and dropped.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: Chunk,
    /// Bytes of the current size line or of the trailer section, for the limits.
    seen: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size {
        value: u64,
        digits: u8,
    },
    Extension {
        value: u64,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (`empty`) or inside one.
    Trailer {
        empty: bool,
    },
    TrailerLf {
        empty: bool,
    },
    Done,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: Chunk::Size {
                value: 0,
                digits: 0,
            },
            seen: 0,
        }
    }
}

impl ChunkedDecoder {
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ProtocolError> {
        loop {
            if let Chunk::Data(remaining) = self.state {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = remaining.min(buf.len() as u64) as usize;
                let data = buf.split_to(n).freeze();
                let left = remaining - n as u64;
                self.state = if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left)
                };
                return Ok(Decoded::Data(data));
            }
            if self.state == Chunk::Done {
                return Ok(Decoded::Done);
            }
            let Some(&b) = buf.first() else {
                return Ok(Decoded::NeedMore);
            };
            buf.advance(1);
            self.seen += 1;
            self.state = match self.state {
                Chunk::Size { value, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if digits >= 15 {
                            return Err(ProtocolError::Chunk);
                        }
                        let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                        Chunk::Size {
                            value: value * 16 + digit,
                            digits: digits + 1,
                        }
                    }
                    b';' | b' ' | b'\t' if digits > 0 => Chunk::Extension { value },
                    b'\r' if digits > 0 => Chunk::SizeLf { value },
                    _ => return Err(ProtocolError::Chunk),
                },
                Chunk::Extension { value } => match b {
                    b'\r' => Chunk::SizeLf { value },
                    b'\n' => return Err(ProtocolError::Chunk),
                    _ if self.seen > MAX_CHUNK_LINE => return Err(ProtocolError::Chunk),
                    _ => Chunk::Extension { value },
                },
                Chunk::SizeLf { value } => match b {
                    b'\n' => {
                        self.seen = 0;
                        if value == 0 {
                            Chunk::Trailer { empty: true }
                        } else {
                            Chunk::Data(value)
                        }
                    }
                    _ => return Err(ProtocolError::Chunk),
                },
                Chunk::DataCr => match b {
                    b'\r' => Chunk::DataLf,
                    _ => return Err(ProtocolError::Chunk),
                },
                Chunk::DataLf => match b {
                    b'\n' => {
                        self.seen = 0;
                        Chunk::Size {
                            value: 0,
                            digits: 0,
                        }
                    }
                    _ => return Err(ProtocolError::Chunk),
                },
                Chunk::Trailer { empty } => match b {
                    b'\r' => Chunk::TrailerLf { empty },
                    b'\n' => return Err(ProtocolError::Chunk),
                    _ if self.seen > MAX_TRAILERS => return Err(ProtocolError::Chunk),
                    _ => Chunk::Trailer { empty: false },
                },
                Chunk::TrailerLf { empty } => match b {
                    b'\n' if empty => Chunk::Done,
                    b'\n' => Chunk::Trailer { empty: true },
                    _ => return Err(ProtocolError::Chunk),
                },
                Chunk::Data(_) | Chunk::Done => unreachable!("handled above"),
            };
        }
    }
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
mod tests {
    #[test]
    fn host_values_follow_rfc_3986_authority_without_userinfo() {
        for good in [
            &b"shop.example"[..],
            b"shop.example:8080",
            b"127.0.0.1",
            b"127.0.0.1:80",
            b"[::1]",
            b"[::1]:8080",
            b"[2001:db8::7]",
            b"[v1.fe80::a+en1]",
            b"xn--bcher-kva.example",
            b"caf%C3%A9.example",
            b"localhost:",
            b"",
        ] {
            assert!(
                super::is_valid_host(good),
                "{:?}",
                String::from_utf8_lossy(good)
            );
        }
        for bad in [
            &b"user@shop.example"[..],
            b"shop.example/path",
            b"shop.example:80:81",
            b"shop.example:port",
            b"shop.example:123456",
            b"shop example",
            b"[::1",
            b"[::1]x",
            b"[]",
            b"[::g]",
            b"caf%C.example",
            b"a\tb",
            b"shop.example?",
            b"shop.example#",
        ] {
            assert!(
                !super::is_valid_host(bad),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    use super::*;

    fn head(method: &Method, text: &str) -> Result<Option<ResponseHead>, ProtocolError> {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_response(&mut buf, method)
    }

    #[test]
    fn encodes_the_request_head_with_forwarding_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("shop.example"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        headers.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        headers.insert(crate::http::REQUEST_ID, HeaderValue::from_static("bad id"));
        headers.insert(
            crate::http::trace::TRACEPARENT,
            HeaderValue::from_static("inbound"),
        );
        let client = HeaderValue::from_static("127.0.0.1");
        let host = HeaderValue::from_static("shop.example");
        let request = RequestHead {
            method: &Method::POST,
            target: "/products?x=1",
            headers: &headers,
            framing: RequestFraming::Length,
            forwarded_for: &client,
            forwarded_host: Some(&host),
            request_id: &HeaderValue::from_static("r-1"),
            traceparent: b"00-01-02-01",
            drop_tracestate: true,
        };
        let mut out = Vec::new();
        request.encode(&HeaderValue::from_static("10.1.2.3:8081"), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /products?x=1 HTTP/1.1\r\nhost: 10.1.2.3:8081\r\nx-request-id: r-1\r\n\
             traceparent: 00-01-02-01\r\naccept: */*\r\n\
             content-length: 5\r\nx-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: shop.example\r\n\r\n"
        );
    }

    #[test]
    fn a_body_of_unknown_length_is_rechunked_without_content_length() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        headers.insert(
            crate::http::trace::TRACESTATE,
            HeaderValue::from_static("vendor=1"),
        );
        let client = HeaderValue::from_static("::1");
        let request = RequestHead {
            method: &Method::PUT,
            target: "/",
            headers: &headers,
            framing: RequestFraming::Chunked,
            forwarded_for: &client,
            forwarded_host: None,
            request_id: &HeaderValue::from_static("r-2"),
            traceparent: b"00-01-02-01",
            drop_tracestate: false,
        };
        let mut out = Vec::new();
        request.encode(&HeaderValue::from_static("u:1"), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("content-length"), "{text}");
        assert!(
            text.contains("tracestate: vendor=1\r\n"),
            "a continued trace keeps it"
        );
        assert!(
            text.ends_with("transfer-encoding: chunked\r\n\r\n"),
            "{text}"
        );
        let mut chunk = Vec::new();
        encode_chunk(&[b'x'; 300], &mut chunk);
        assert!(chunk.starts_with(b"12c\r\nxxx"));
        assert!(chunk.ends_with(b"x\r\n"));
    }

    #[test]
    fn parses_a_response_head_and_leaves_the_body() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"[..],
        );
        let head = parse_response(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.framing, ResponseFraming::Length(5));
        assert!(head.keep_alive);
        assert_eq!(head.headers["content-type"], "text/plain");
        assert_eq!(&buf[..], b"hello");
    }

    #[test]
    fn an_incomplete_head_asks_for_more_and_an_endless_one_is_refused() {
        assert!(
            head(&Method::GET, "HTTP/1.1 200 OK\r\nContent-Le")
                .unwrap()
                .is_none()
        );
        let endless = format!("HTTP/1.1 200 OK\r\nx: {}", "y".repeat(MAX_HEAD_BYTES));
        assert!(matches!(
            head(&Method::GET, &endless),
            Err(ProtocolError::HeadTooLarge)
        ));
        assert!(head(&Method::GET, "HTTP/1.1 2x0 OK\r\n\r\n").is_err());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |method: &Method, text: &str| {
            let h = head(method, text).unwrap().unwrap();
            (h.framing, h.keep_alive)
        };
        assert_eq!(
            framing(
                &Method::GET,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n"
            ),
            (ResponseFraming::Chunked, true)
        );
        assert_eq!(
            framing(
                &Method::GET,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"
            ),
            (ResponseFraming::UntilClose, false)
        );
        assert_eq!(
            framing(&Method::GET, "HTTP/1.1 200 OK\r\n\r\n"),
            (ResponseFraming::UntilClose, false)
        );
        assert_eq!(
            framing(
                &Method::HEAD,
                "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
            ),
            (ResponseFraming::Empty, true)
        );
        assert_eq!(
            framing(
                &Method::GET,
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n"
            ),
            (ResponseFraming::Empty, true)
        );
        assert_eq!(
            framing(&Method::GET, "HTTP/1.1 204 No Content\r\n\r\n"),
            (ResponseFraming::Empty, true)
        );
        assert_eq!(
            framing(
                &Method::GET,
                "HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\n"
            ),
            (ResponseFraming::Length(2), false)
        );
        assert_eq!(
            framing(&Method::GET, "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n"),
            (ResponseFraming::Length(2), false)
        );
        assert!(matches!(
            head(
                &Method::GET,
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"
            ),
            Err(ProtocolError::ContentLength)
        ));
        assert!(matches!(
            head(
                &Method::GET,
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"
            ),
            Err(ProtocolError::ContentLength)
        ));
    }

    #[test]
    fn interim_responses_are_skipped_and_switching_protocols_refused() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"[..],
        );
        let head = parse_response(&mut buf, &Method::POST).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert!(!head.headers.contains_key("link"));
        assert!(buf.is_empty());
        assert!(matches!(
            self::head(&Method::GET, "HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            Err(ProtocolError::Switching(101))
        ));
    }

    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, bool), ProtocolError> {
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match decoder.decode(&mut buf)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::NeedMore => break,
                    Decoded::Done => return Ok((out, buf.is_empty())),
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn decodes_chunked_bodies_split_anywhere() {
        let body = b"5;name=value\r\nhello\r\nA\r\n, world!!!\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in 1..body.len() {
            let (data, clean) = decode_all(body, step).unwrap();
            assert_eq!(&data[..], b"hello, world!!!", "step {step}");
            assert!(clean);
        }
        let (data, clean) = decode_all(b"0\r\n\r\n", 5).unwrap();
        assert!(data.is_empty() && clean);
    }

    #[test]
    fn refuses_malformed_chunks() {
        for bad in [
            &b"\r\n"[..],
            b"5\r\nhelloXX",
            b"g\r\n",
            b"1111111111111111\r\n",
            b"5\nhello\r\n",
        ] {
            assert!(decode_all(bad, bad.len()).is_err(), "{bad:?}");
        }
        let (_, done) = decode_all(b"5\r\nhel", 3).unwrap();
        assert!(!done, "incomplete is not done");
    }
}
