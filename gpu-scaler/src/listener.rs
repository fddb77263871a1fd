//! Accepting TCP connections within a cap, for the gRPC servers (scaler and
//! peer). A connection past the cap is closed as soon as it is accepted, so a
//! client that opens thousands of idle connections costs a file descriptor for
//! an instant, not one for as long as it likes (issue 13); the connections
//! already served (KEDA's, which it keeps open) are never the ones that go.
//!
//! The HTTP listener has its own loop (`daemon::http`), which instead makes
//! room by closing the oldest idle connection, so probes always get in.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A connection that holds one of its listener's permits while it lives.
pub struct Capped {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Capped {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Connections refused because the cap was reached, per listener.
#[derive(Debug, Default)]
pub struct Refused(pub AtomicU64);

/// The accepted connections of `listener`, at most `max` open at once; the
/// ones past it are closed at once and counted in `refused`. Accept errors
/// (e.g. out of file descriptors) are logged and retried after a pause rather
/// than ending the server.
pub fn capped(
    listener: TcpListener,
    max: usize,
    name: &'static str,
    refused: Arc<Refused>,
) -> impl Stream<Item = io::Result<Capped>> + Send + 'static {
    let permits = Arc::new(Semaphore::new(max));
    futures::stream::unfold(
        (listener, permits, refused),
        move |(listener, permits, refused)| async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(listener = name, %error, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let _ = stream.set_nodelay(true);
                        let conn = Capped {
                            inner: stream,
                            _permit: permit,
                        };
                        return Some((Ok(conn), (listener, permits, refused)));
                    }
                    Err(_) => {
                        let n = refused.0.fetch_add(1, Ordering::Relaxed) + 1;
                        // Once per power of two: a flood does not flood the log.
                        if n.is_power_of_two() {
                            tracing::warn!(
                                listener = name,
                                max,
                                refused = n,
                                "connection cap reached; closing new connections"
                            );
                        }
                        drop(stream);
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;
    use tokio::io::AsyncReadExt as _;

    use super::*;

    #[tokio::test]
    async fn past_the_cap_connections_are_closed_and_permits_come_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let refused = Arc::new(Refused::default());
        let mut incoming = Box::pin(capped(listener, 2, "test", refused.clone()));
        let _c1 = TcpStream::connect(addr).await.expect("connect 1");
        let _c2 = TcpStream::connect(addr).await.expect("connect 2");
        let a1 = incoming.next().await.expect("one").expect("ok");
        let _a2 = incoming.next().await.expect("two").expect("ok");
        // The third is accepted and closed: its reads see EOF.
        let mut c3 = TcpStream::connect(addr).await.expect("connect 3");
        let accept_more = tokio::spawn(async move {
            let next = incoming.next().await;
            (incoming, next.map(|r| r.is_ok()))
        });
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), c3.read(&mut buf))
            .await
            .expect("closed promptly")
            .unwrap_or(0);
        assert_eq!(n, 0, "refused connection closed");
        assert_eq!(refused.0.load(Ordering::Relaxed), 1);
        // Closing a served one frees its permit for the next client.
        drop(a1);
        let _c4 = TcpStream::connect(addr).await.expect("connect 4");
        let (_incoming, got) = tokio::time::timeout(Duration::from_secs(5), accept_more)
            .await
            .expect("accepted after a permit came back")
            .expect("task");
        assert_eq!(got, Some(true));
    }
}
