//! Policy: decisions about a request, made without I/O. The route table (which upstream,
//! which access rule), access control (tokens, admin, CORS), per-client rate limits and
//! the response cache's rules and store.

pub mod access;
pub mod cache;
pub mod ratelimit;
pub mod routes;
