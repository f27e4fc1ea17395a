//! The HTTP/1 layer: the codec (request and response heads, body framing, limits), the
//! server side of a client connection (generic over its [`front::Handler`]), the
//! per-connection deadlines, and the trace-context headers the codec strips or forwards.
//! It knows nothing of routes, upstreams or the proxy.

pub mod body;
pub mod deadline;
pub mod front;
pub mod h1;
pub mod trace;

use ::http::header::HeaderName;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
