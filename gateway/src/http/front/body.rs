//! The request body the handler reads: framing (a length or chunks) decoded from the same
//! buffer and socket the head came from, and `100 Continue` sent on its first read when
//! the client asked for it.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

use super::{BodyState, CONTINUE, READ_CHUNK, Wire};
use crate::http::h1::{Decoded, ProtocolError};

/// The request body as the handler reads it, straight from the connection.
pub struct RequestBody {
    pub(super) wire: Rc<RefCell<Wire>>,
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
