//! The small HTTP/1.1 server behind a worker's `/metrics` and the dashboard: whoever can reach
//! the port must not run the process out of file descriptors or memory, so connections are
//! capped, each lives for a bounded time, and request heads are small.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use tokio::net::TcpListener;
use wasmtime_wasi_http::io::TokioIo;

/// How many connections, for how long each, with how large a read buffer.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub connections: usize,
    pub connection_time: Duration,
    pub buffer_bytes: usize,
}

/// Serves `handler` on `listener` until the task is aborted. Connections past the cap are
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
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
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
            let handler = handler.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |request| {
                    let response = handler(request);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
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
