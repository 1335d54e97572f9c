//! The status page's listener: at most `status.max_connections` connections at once, each
//! closed after `IDLE_TIMEOUT` without a byte read (slow headers, idle keep-alive), so a
//! misbehaving client on the LAN cannot hold the page or `/healthz`.

use super::*;

/// A listener that holds at most `permits` connections open at once.
pub(super) struct Limited {
    pub(super) inner: tokio::net::TcpListener,
    pub(super) permits: Arc<Semaphore>,
}

pub(super) struct LimitedIo {
    pub(super) io: tokio::net::TcpStream,
    pub(super) _permit: OwnedSemaphorePermit,
    /// Closes the connection after `IDLE_TIMEOUT` without a byte read: covers slow headers and
    /// idle keep-alive (axum gives hyper no timer of its own).
    pub(super) idle: Pin<Box<tokio::time::Sleep>>,
}

/// A connection that sends nothing for this long is closed.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

impl axum::serve::Listener for Limited {
    type Io = LimitedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    return (
                        LimitedIo {
                            io,
                            _permit: permit,
                            idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
                        },
                        addr,
                    )
                }
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

impl AsyncRead for LimitedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.idle
                        .as_mut()
                        .reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match std::future::Future::poll(this.idle.as_mut(), cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "idle connection",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
