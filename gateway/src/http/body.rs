//! Bodies shared by the layers: the request body on its way upstream (the client's body,
//! cut off at the body limit; generic over the client body so that the upstream pool need
//! not know the front end), and the responses the gateway answers itself (a complete body,
//! which the proxy wraps into its own response body type).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use ::http::header::{self, HeaderValue};
use ::http::{Response, StatusCode};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, SizeHint};
use shop_platform::AppError;

/// The client's request body on its way upstream, cut off at the body limit.
pub enum OutboundBody<B> {
    Empty,
    Limited { inner: B, remaining: u64 },
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit")]
pub struct BodyLimitExceeded;

impl<B> Body for OutboundBody<B>
where
    B: Body<Data = Bytes, Error = io::Error> + Unpin,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            OutboundBody::Empty => Poll::Ready(None),
            OutboundBody::Limited { inner, remaining } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        let len = data.len() as u64;
                        if len > *remaining {
                            return Poll::Ready(Some(Err(Box::new(BodyLimitExceeded))));
                        }
                        *remaining -= len;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutboundBody::Empty => true,
            OutboundBody::Limited { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutboundBody::Empty => SizeHint::with_exact(0),
            OutboundBody::Limited { inner, .. } => inner.size_hint(),
        }
    }
}

/// A JSON error response.
pub fn error(err: AppError) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(err.body_json())));
    *response.status_mut() = err.status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = err.retry_after_secs {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// A response the gateway answers itself.
pub fn local(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
