//! The status page's listener, built so that a misbehaving client on the LAN cannot hold the
//! page or `/healthz`:
//!
//! - **At most `status.max_connections` connections, and at most [`PER_ADDRESS`] from one
//!   LAN address** (loopback, the box's own monitoring, has only the global limit).
//! - **A response deadline of [`RESPONSE_DEADLINE`].** A connection that has not been
//!   answered within it, counted from being accepted or from its last response, is closed.
//!   This covers headers sent one byte at a time, requests never finished, and idle
//!   keep-alive. axum gives hyper no header timer of its own, so the deadline lives here,
//!   in the I/O.
//! - **Eviction instead of refusal.** A new connection over either limit evicts the oldest
//!   connection that has never been answered (from the same address, for the per-address
//!   limit). So however many slow connections an attacker opens, the next real request,
//!   `/healthz` among them, gets a slot at once. Only when every slot is held by a connection
//!   that has been answered is the new one turned away.

use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Connections one address may hold at once.
pub const PER_ADDRESS: usize = 8;
/// A connection not answered within this long (from being accepted, or from its last
/// response) is closed.
pub const RESPONSE_DEADLINE: Duration = Duration::from_secs(5);

/// One live connection, as the registry and its I/O both see it.
pub struct Slot {
    id: u64,
    ip: IpAddr,
    /// A response byte has been written on it.
    answered: AtomicBool,
    /// Another connection took its place: its next read or write fails.
    evicted: AtomicBool,
    /// Woken on eviction, so a read parked on the socket ends at once.
    waker: Mutex<Option<Waker>>,
}

impl Slot {
    fn evict(&self) {
        self.evicted.store(true, Relaxed);
        if let Some(w) = self.waker.lock().expect("slot lock").take() {
            w.wake();
        }
    }
}

/// Every live connection, oldest first.
#[derive(Default)]
pub struct Registry {
    live: Mutex<VecDeque<Arc<Slot>>>,
    next_id: AtomicU64,
}

impl Registry {
    /// Admit a connection from `ip`: `Some(slot)`, after evicting the oldest never-answered
    /// connection where a limit is reached, or `None` when no slot can be freed.
    fn admit(&self, ip: IpAddr, max: usize) -> Option<Arc<Slot>> {
        let mut live = self.live.lock().expect("registry lock");
        let evict_one = |live: &mut VecDeque<Arc<Slot>>, same_ip: bool| -> bool {
            let pos = live.iter().position(|s| {
                !s.answered.load(Relaxed) && !s.evicted.load(Relaxed) && (!same_ip || s.ip == ip)
            });
            match pos {
                Some(i) => {
                    if let Some(s) = live.remove(i) {
                        s.evict();
                    }
                    true
                }
                None => false,
            }
        };
        // The box itself (loopback: its own monitoring) shares one address with whatever else
        // runs on it: no per-address limit there, only the global one.
        if !ip.is_loopback()
            && live.iter().filter(|s| s.ip == ip).count() >= PER_ADDRESS
            && !evict_one(&mut live, true)
        {
            return None;
        }
        if live.len() >= max && !evict_one(&mut live, false) {
            return None;
        }
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Relaxed),
            ip,
            answered: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        live.push_back(slot.clone());
        Some(slot)
    }

    fn remove(&self, id: u64) {
        self.live
            .lock()
            .expect("registry lock")
            .retain(|s| s.id != id);
    }
}

/// The listener: admits connections through the [`Registry`].
pub struct Limited {
    inner: tokio::net::TcpListener,
    max: usize,
    registry: Arc<Registry>,
}

pub struct LimitedIo {
    io: tokio::net::TcpStream,
    slot: Arc<Slot>,
    registry: Arc<Registry>,
    /// When the connection is closed unless answered (reset by each response).
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Limited {
    /// `listener` with at most `max` connections (and [`PER_ADDRESS`] per address), each
    /// answered within [`RESPONSE_DEADLINE`] or closed: for another HTTP endpoint of this
    /// the gateway's status page, the district receiver's `/healthz` and `/metrics`.
    pub fn new(listener: tokio::net::TcpListener, max: usize) -> Limited {
        Limited {
            inner: listener,
            max,
            registry: Default::default(),
        }
    }
}

impl Drop for LimitedIo {
    fn drop(&mut self) {
        self.registry.remove(self.slot.id);
    }
}

impl axum::serve::Listener for Limited {
    type Io = LimitedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => match self.registry.admit(addr.ip(), self.max) {
                    Some(slot) => {
                        return (
                            LimitedIo {
                                io,
                                slot,
                                registry: self.registry.clone(),
                                deadline: Box::pin(tokio::time::sleep(RESPONSE_DEADLINE)),
                            },
                            addr,
                        )
                    }
                    // Every slot answered and busy: turn this one away (dropped, closed).
                    None => tracing::debug!(%addr, "status page: no free connection slot"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "status page: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "evicted for a new connection",
    )
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.slot.evicted.load(Relaxed) {
            return Poll::Ready(Err(aborted()));
        }
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => {
                *this.slot.waker.lock().expect("slot lock") = Some(cx.waker().clone());
                if this.slot.evicted.load(Relaxed) {
                    return Poll::Ready(Err(aborted()));
                }
                match std::future::Future::poll(this.deadline.as_mut(), cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no complete request within the response deadline",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.slot.evicted.load(Relaxed) {
            return Poll::Ready(Err(aborted()));
        }
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.slot.answered.store(true, Relaxed);
            this.deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + RESPONSE_DEADLINE);
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_connection_evicts_the_oldest_unanswered_one() {
        let r = Registry::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first: Vec<_> = (0..PER_ADDRESS).map(|_| r.admit(a, 100).unwrap()).collect();
        // The per-address limit: the oldest of a's unanswered goes.
        first[1].answered.store(true, Relaxed);
        first[0].answered.store(true, Relaxed);
        let _ = r.admit(a, 100).unwrap();
        assert!(first[2].evicted.load(Relaxed));
        assert!(!first[0].evicted.load(Relaxed), "answered ones stay");
        // The global limit: b evicts a's oldest unanswered.
        let _ = r.admit(b, PER_ADDRESS).unwrap();
        assert!(first[3].evicted.load(Relaxed));
        // All answered and full: turned away.
        let r = Registry::default();
        let only = r.admit(a, 1).unwrap();
        only.answered.store(true, Relaxed);
        assert!(r.admit(b, 1).is_none());
    }
}

/// The client's address, for the access log and the login rate limit (axum's `ConnectInfo`).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Limited>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Limited>) -> Self {
        Peer(*stream.remote_addr())
    }
}
