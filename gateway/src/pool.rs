//! A worker's upstream connections: HTTP/1 connections per endpoint, owned by one thread,
//! so checking one out is a `Vec::pop` with no lock and no key hashing. A connection goes
//! back to the pool when its response body has been read to the end; one dropped mid-body
//! is closed. Idle connections older than the idle timeout are closed by a sweeper.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::proxy::OutboundBody;
use crate::upstream::Endpoint;

pub struct Pool {
    idle: RefCell<HashMap<u64, Vec<Idle>>>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

struct Idle {
    sender: SendRequest<OutboundBody>,
    since: Instant,
}

#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: the endpoint is down (eject it; safe to retry).
    Connect(std::io::Error),
    /// The exchange failed after the request may have reached the upstream.
    Exchange(hyper::Error),
}

/// A connection lent for one exchange; give it back with [`Lease::release`] once the
/// response body has ended.
pub struct Lease {
    pool: Rc<Pool>,
    key: u64,
    sender: SendRequest<OutboundBody>,
}

impl Lease {
    pub fn release(self) {
        let Lease { pool, key, sender } = self;
        pool.put(key, sender);
    }
}

fn key(endpoint: &Arc<Endpoint>) -> u64 {
    endpoint.id
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration, connect_timeout: Duration) -> Rc<Self> {
        Rc::new(Self {
            idle: RefCell::new(HashMap::new()),
            max_idle,
            idle_timeout,
            connect_timeout,
        })
    }

    /// Closes idle connections past the idle timeout, every half timeout, until the
    /// worker's runtime ends. Runs on the worker's `LocalSet`.
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
                        now.duration_since(c.since) < pool.idle_timeout && !c.sender.is_closed()
                    });
                    !conns.is_empty()
                });
            }
        });
    }

    fn put(&self, key: u64, sender: SendRequest<OutboundBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let conns = idle.entry(key).or_default();
        if conns.len() < self.max_idle {
            conns.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    fn take(&self, key: u64) -> Option<SendRequest<OutboundBody>> {
        let mut idle = self.idle.borrow_mut();
        let conns = idle.get_mut(&key)?;
        let now = Instant::now();
        while let Some(conn) = conns.pop() {
            if !conn.sender.is_closed() && now.duration_since(conn.since) < self.idle_timeout {
                return Some(conn.sender);
            }
        }
        None
    }

    async fn connect(&self, endpoint: &Endpoint) -> Result<SendRequest<OutboundBody>, SendError> {
        let address = endpoint.authority.as_str();
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(address),
        )
        .await
        .map_err(|_| SendError::Connect(std::io::ErrorKind::TimedOut.into()))?
        .map_err(SendError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect(std::io::Error::other(e)))?;
        tokio::task::spawn_local(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Sends `request` on a pooled connection (or a new one). A pooled connection that
    /// turns out to be closed before the request was written is replaced transparently.
    pub async fn send(
        self: &Rc<Self>,
        endpoint: &Arc<Endpoint>,
        request: Request<OutboundBody>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let key = key(endpoint);
        let mut request = request;
        if let Some(mut sender) = self.take(key)
            && sender.ready().await.is_ok()
        {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, self.lease(key, sender))),
                Err(mut err) => match err.take_message() {
                    // Never written: the upstream closed this idle connection.
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Exchange(err.into_error())),
                },
            }
        }
        let mut sender = self.connect(endpoint).await?;
        match sender.send_request(request).await {
            Ok(response) => Ok((response, self.lease(key, sender))),
            Err(err) => Err(SendError::Exchange(err)),
        }
    }

    fn lease(self: &Rc<Self>, key: u64, sender: SendRequest<OutboundBody>) -> Lease {
        Lease {
            pool: self.clone(),
            key,
            sender,
        }
    }
}
