//! The response on the wire: the head written from the handler's `http::Response`, the
//! body framed (a length, chunks, or until close for HTTP/1.0) and gathered into as few
//! writes as the body allows; the linger after an answer that left a body unread.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Body;
use tokio::io::AsyncWrite;

use super::{WRITE_BATCH, Wire};
use crate::http::h1;

/// After an answer that left a request body unread, how long and how much of it is read
/// and dropped before closing, so the client sees the answer rather than a reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024 * 1024;

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
pub(super) async fn write_response<B: Body<Data = Bytes> + Unpin>(
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

pub(super) async fn write_all(wire: &Rc<RefCell<Wire>>, bytes: &[u8]) -> io::Result<()> {
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
pub(super) async fn linger(wire: &Rc<RefCell<Wire>>) {
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
