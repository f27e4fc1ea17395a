//! The request head: parsed with `httparse` over the connection's read buffer (header
//! values are slices of it), checked against RFC 9112's rules (one `Host`, body framing
//! that cannot be read two ways), and turned into the handler's `http::request::Parts`.

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};

use super::BodyState;
use crate::http::h1::{self, ChunkedDecoder};

/// Request header lines accepted; more is a 431 (the handler refuses more than
/// the proxy's `MAX_HEADERS` with a JSON 431 of its own).
const MAX_REQUEST_HEADERS: usize = 100;
/// Largest request head accepted.
pub(super) const MAX_REQUEST_HEAD: usize = 96 * 1024;

/// A request head the connection cannot take.
pub(super) enum Refusal {
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

pub(super) struct Parsed {
    pub(super) request: http::request::Parts,
    pub(super) body: BodyState,
    pub(super) keep_alive: bool,
    pub(super) expect_continue: bool,
}

/// Parses a request head from the front of `buf`; `Ok(None)`: incomplete.
pub(super) fn parse_request(buf: &mut BytesMut) -> Result<Option<Parsed>, Refusal> {
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
        let name = h1::header_name(&head[ns as usize..ne as usize])
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
            chunked = h1::ends_chunked(value.as_bytes());
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
