//! The accept loop: HTTP/1.1 connections served by hyper with a header read timeout, a cap on
//! open connections, and a bounded graceful close.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// How long connections may take to close once the server stops, before they are dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The kernel send buffer of each connection (Linux doubles it for bookkeeping). Autotuning
/// would let it grow to `tcp_wmem`'s maximum (4 MiB by default): that much of a stream whose
/// client stops reading would pile up in the kernel before its generation pauses. 32 KiB
/// still carries thousands of tokens per round trip.
const SEND_BUFFER: usize = 32 * 1024;

/// Connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Longest time to receive a request's headers.
    pub header_timeout: Duration,
    /// Most open connections; the next ones wait to be accepted.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `stop` resolves; then stops accepting, lets each
/// connection finish its current response (idle keep-alive connections close at once), and
/// returns within [`CLOSE_GRACE`].
pub async fn serve_connections(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    stop: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (closing, closed) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            () = &mut stop => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Tokens are small writes: without this, Nagle's algorithm holds them for up to 40 ms.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "TCP_NODELAY");
        }
        if let Err(err) = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER) {
            tracing::debug!(error = %err, "SO_SNDBUF");
        }
        let app = app.clone();
        let mut closed = closed.clone();
        connections.spawn(async move {
            let _permit = permit;
            serve_one(stream, peer, app, limits.header_timeout, &mut closed).await;
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = closing.send(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(CLOSE_GRACE, drained).await.is_err() {
        tracing::warn!(
            open = connections.len(),
            "closing connections that did not finish"
        );
        connections.abort_all();
    }
    Ok(())
}

async fn serve_one(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    header_timeout: Duration,
    closed: &mut watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        app.clone().oneshot(request.map(Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
                return;
            }
            changed = closed.wait_for(|closed| *closed), if !closing => {
                closing = true;
                let _ = changed;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}
