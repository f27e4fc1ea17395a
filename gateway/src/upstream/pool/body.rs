//! The upstream's response body: read from the pooled connection as the client's side
//! asks for it, the connection going back to the pool when the body ends cleanly.

use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::{BODY_CHUNK, Conn, Pool};
use crate::http::h1::{ChunkedDecoder, Decoded, ResponseFraming};

/// The upstream's response body, read from the connection as the client's side asks for
/// it. The connection goes back to the pool only when the body ended cleanly and the
/// upstream allows reuse; dropped mid-body, it is closed.
pub struct UpstreamBody {
    state: State,
    conn: Option<Conn>,
    pool: Rc<Pool>,
    key: u64,
    keep_alive: bool,
    /// A break found in the same poll that produced data is reported on the next poll,
    /// so the client's side can flush what came before it (the head, at least).
    broken: Option<io::Error>,
}

enum State {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

impl UpstreamBody {
    pub(super) fn new(
        pool: Rc<Pool>,
        key: u64,
        conn: Conn,
        framing: ResponseFraming,
        keep_alive: bool,
    ) -> Self {
        let mut body = Self {
            state: match framing {
                ResponseFraming::Empty => State::Done,
                ResponseFraming::Length(n) => State::Length(n),
                ResponseFraming::Chunked => State::Chunked(ChunkedDecoder::default()),
                ResponseFraming::UntilClose => State::UntilClose,
            },
            conn: Some(conn),
            pool,
            key,
            keep_alive,
            broken: None,
        };
        if matches!(body.state, State::Done) {
            body.finish();
        }
        body
    }

    /// The body ended: the connection goes back if it is at a clean message boundary.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.pool.put(self.key, conn);
        }
    }

    fn fail(
        &mut self,
        error: io::Error,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.state = State::Done;
        self.conn = None;
        self.broken = Some(error);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Some(error) = this.broken.take() {
            return Poll::Ready(Some(Err(error)));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Length(remaining) => {
                    if !conn.buf.is_empty() {
                        let n = (*remaining).min(conn.buf.len() as u64);
                        let data = conn.buf.split_to(n as usize).freeze();
                        *remaining -= n;
                        if *remaining == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Chunked(decoder) => match decoder.decode(&mut conn.buf) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::Done) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(e) => return this.fail(e.into(), cx),
                },
                State::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            let conn = this.conn.as_mut().expect("checked above");
            if conn.buf.capacity() - conn.buf.len() < BODY_CHUNK / 4 {
                conn.buf.reserve(BODY_CHUNK.max(conn.buf.len()));
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if matches!(this.state, State::UntilClose) {
                        this.state = State::Done;
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    return this.fail(
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "upstream closed the connection mid-body",
                        ),
                        cx,
                    );
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(e, cx),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done) && self.broken.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}
