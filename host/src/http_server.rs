//! The small HTTP/1.1 server behind a worker's `/metrics` and the dashboard: whoever can reach
//! the port must not run the process out of file descriptors or memory, nor lock others out.
//! Connections are capped in all and per peer address, a request head must arrive within a
//! bounded time (which also ends a kept-alive connection left idle), each connection lives for
//! a bounded time, and request heads are small.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use tokio::net::TcpListener;
use wasmtime_wasi_http::io::TokioIo;

use crate::sync::lock;

/// How many connections, from one peer and in all, for how long each, with how large a read
/// buffer.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Connections served at once; more are dropped.
    pub connections: usize,
    /// Of those, how many one peer address may hold, so that one client cannot take them all.
    pub per_peer: usize,
    /// The longest a connection stays open, however busy.
    pub connection_time: Duration,
    /// The longest a request head may take to arrive, counted from when the server is ready
    /// for it: a silent connection, or a kept-alive one left idle, is closed after this.
    pub header_time: Duration,
    pub buffer_bytes: usize,
}

/// Serves `handler` on `listener` until the task is aborted. Connections past either cap are
/// dropped at once; `what` names the server in log lines.
pub fn serve<H, F>(
    listener: TcpListener,
    what: &'static str,
    limits: ServerLimits,
    handler: H,
) -> tokio::task::JoinHandle<()>
where
    H: Fn(hyper::Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = hyper::Response<Full<Bytes>>> + Send + 'static,
{
    let open = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let peers = Arc::new(Peers {
        open: Mutex::default(),
        limit: limits.per_peer,
    });
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a {what} connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = open.clone().try_acquire_owned() else {
                tracing::debug!("too many {what} connections; one dropped");
                continue;
            };
            let Some(peer_slot) = peers.admit(peer.ip()) else {
                tracing::debug!(%peer, "too many {what} connections from one peer; one dropped");
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let _slots = (slot, peer_slot);
                let service = hyper::service::service_fn(move |request| {
                    let response = handler(request);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer)
                    .header_read_timeout(limits.header_time)
                    .max_buf_size(limits.buffer_bytes)
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(limits.connection_time, connection).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::debug!(%error, "a {what} connection ended badly"),
                    Err(_) => tracing::debug!("a {what} connection timed out"),
                }
            });
        }
    })
}

/// Open connections per peer address.
struct Peers {
    open: Mutex<HashMap<IpAddr, usize>>,
    limit: usize,
}

impl Peers {
    /// A slot for one more connection from `ip`, unless it holds its limit already.
    fn admit(self: &Arc<Peers>, ip: IpAddr) -> Option<PeerSlot> {
        let mut open = lock(&self.open);
        let count = open.entry(ip).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

/// One connection of a peer, given back when dropped.
struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.peers.open);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// hyper's timers on Tokio's clock. Without a timer hyper enforces no header-read timeout at
/// all (hyper-util's `TokioTimer` does the same; this crate does not otherwise need it).
#[derive(Clone, Copy, Debug)]
struct TokioTimer;

impl hyper::rt::Timer for TokioTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(TokioSleep(Box::pin(tokio::time::sleep(duration))))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(TokioSleep(Box::pin(tokio::time::sleep_until(
            deadline.into(),
        ))))
    }
}

struct TokioSleep(Pin<Box<tokio::time::Sleep>>);

impl Future for TokioSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for TokioSleep {}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    use super::*;

    const LIMITS: ServerLimits = ServerLimits {
        connections: 4,
        per_peer: 2,
        connection_time: Duration::from_secs(60),
        header_time: Duration::from_millis(300),
        buffer_bytes: 8192,
    };

    async fn server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = serve(listener, "test", LIMITS, |_| async {
            hyper::Response::new(Full::new(Bytes::from_static(b"ok")))
        });
        (addr, server)
    }

    /// Reads until the server closes the connection, or `None` if it has not within 5 s.
    async fn until_closed(stream: &mut TcpStream) -> Option<String> {
        let mut read = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut read));
        closed
            .await
            .ok()
            .map(|_| String::from_utf8_lossy(&read).into_owned())
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn silent_and_idle_connections_are_closed_after_the_header_time() {
        let (addr, server) = server().await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        assert!(
            until_closed(&mut silent).await.is_some(),
            "a silent connection stays open"
        );
        assert!(started.elapsed() < Duration::from_secs(3));

        // Kept alive after an answer, then idle: closed as well.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(GET).await.unwrap();
        let answered = until_closed(&mut idle)
            .await
            .expect("an idle connection stays open");
        assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
        server.abort();
    }

    #[tokio::test]
    async fn one_peer_cannot_take_every_connection() {
        let (addr, server) = server().await;
        let _held: Vec<TcpStream> = vec![
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        // Let the server accept both before the third arrives.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = TcpStream::connect(addr).await.unwrap();
        third.write_all(GET).await.ok();
        let refused = until_closed(&mut third).await.expect("dropped at once");
        assert!(
            refused.is_empty(),
            "a third connection of one peer is served: {refused}"
        );

        // Another address of this machine still gets in.
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut other = socket.connect(addr).await.unwrap();
        other.write_all(GET).await.unwrap();
        let served = until_closed(&mut other).await.expect("served, then idle");
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
        server.abort();
    }
}
