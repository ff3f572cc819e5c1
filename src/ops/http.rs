//! The operations endpoint: `GET /health` (200 when ready, 503 otherwise) and
//! `GET /metrics` (Prometheus text), plus the client the `healthcheck` command uses.
//!
//! Connections are bounded, so a slow or idle client cannot pile up sockets or hold the
//! shutdown: at most [`MAX_CONNECTIONS`] at once (more are closed at accept), request
//! headers must arrive within [`HEADER_TIMEOUT`], a connection lives at most
//! [`CONNECTION_LIFETIME`], and at shutdown open connections are closed, not waited for.

use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
struct Shared {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// A request's headers must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection (keep-alive included) is closed after this.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Serves until `shutdown` is cancelled, then closes every open connection.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/health", get(health_status))
        .route("/metrics", get(metrics_text))
        .with_state(Shared { health, metrics });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Owned here and aborted at shutdown: no connection outlives the endpoint.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of descriptors and the like: the next accept may succeed.
                Err(error) => {
                    tracing::warn!(%error, "cannot accept an HTTP connection");
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!("too many HTTP connections; closing a new one");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        connections.spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // Either outcome ends the connection; a client error is its own business.
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
    connections.abort_all();
    Ok(())
}

async fn health_status(State(shared): State<Shared>) -> impl IntoResponse {
    let health = &shared.health;
    let status = if health.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = format!(
        r#"{{"ready":{},"index_ready":{},"consumer_attached":{},"undecodable_message":{}}}"#,
        health.ready(),
        health.index_ready(),
        health.consumer_attached(),
        health.undecodable()
    );
    (status, [(header::CONTENT_TYPE, "application/json")], body)
}

async fn metrics_text(State(shared): State<Shared>) -> impl IntoResponse {
    // The gauges that are a reading, not an event: taken when scraped.
    shared.metrics.ready.set(i64::from(shared.health.ready()));
    if let Some(bytes) = crate::platform::heap::resident_anonymous_bytes() {
        shared.metrics.heap_resident_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], shared.metrics.encode())
}

/// `GET /health` on `addr` with a plain HTTP/1.0 request; true on a 200. Blocking, for
/// the `healthcheck` command (a slim container image has no curl).
pub fn probe(addr: SocketAddr, timeout: Duration) -> std::io::Result<bool> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = Vec::new();
    stream.take(4096).read_to_end(&mut response)?;
    let status_line = response.split(|&b| b == b'\n').next().unwrap_or_default();
    Ok(status_line.starts_with(b"HTTP/1.1 200") || status_line.starts_with(b"HTTP/1.0 200"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The endpoint serving `health`, on a free port.
    async fn endpoint(
        health: Arc<Health>,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<std::io::Result<()>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, health, Arc::new(Metrics::new()), stop.clone()));
        (addr, stop, server)
    }

    /// A worker's health once it is indexed and consuming.
    fn ready() -> Arc<Health> {
        let health = Arc::new(Health::default());
        health.set_index_ready(true);
        health.set_consumer_attached(true);
        health
    }

    /// `GET path`: the status code and body.
    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
    }

    /// 503 while the data is indexed (the endpoint is bound first for exactly this), while
    /// no consumer is attached, and while an undecodable message blocks the queue; 200
    /// only with all three right. The body names each part.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_is_503_until_indexed_and_attached_and_while_a_message_is_stuck() {
        let health = Arc::new(Health::default());
        let (addr, stop, server) = endpoint(Arc::clone(&health)).await;
        let steps = [
            (
                false,
                false,
                false,
                503,
                r#"{"ready":false,"index_ready":false,"consumer_attached":false,"undecodable_message":false}"#,
            ),
            (
                true,
                false,
                false,
                503,
                r#"{"ready":false,"index_ready":true,"consumer_attached":false,"undecodable_message":false}"#,
            ),
            (
                false,
                true,
                false,
                503,
                r#"{"ready":false,"index_ready":false,"consumer_attached":true,"undecodable_message":false}"#,
            ),
            (
                true,
                true,
                false,
                200,
                r#"{"ready":true,"index_ready":true,"consumer_attached":true,"undecodable_message":false}"#,
            ),
            (
                true,
                true,
                true,
                503,
                r#"{"ready":false,"index_ready":true,"consumer_attached":true,"undecodable_message":true}"#,
            ),
        ];
        for (index, consumer, stuck, status, body) in steps {
            health.set_index_ready(index);
            health.set_consumer_attached(consumer);
            health.set_undecodable(stuck);
            let got = tokio::task::spawn_blocking(move || get(addr, "/health")).await.unwrap();
            assert_eq!(got, (status, body.to_owned()), "index {index}, consumer {consumer}, stuck {stuck}");
        }
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    /// Idle clients hold at most `MAX_CONNECTIONS` sockets, each only until its header
    /// timeout; whoever comes next is served; a shutdown does not wait for them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_clients_are_bounded_and_never_hold_the_shutdown() {
        let (addr, stop, server) = endpoint(ready()).await;
        let idle: Vec<std::net::TcpStream> =
            (0..MAX_CONNECTIONS + 8).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        // One of the idle clients is closed by the server after the header timeout:
        // reading it ends (EOF or reset) instead of blocking forever.
        let mut first = idle[0].try_clone().unwrap();
        first.set_read_timeout(Some(HEADER_TIMEOUT * 3)).unwrap();
        let started = std::time::Instant::now();
        let ended = tokio::task::spawn_blocking(move || {
            let mut rest = Vec::new();
            match first.read_to_end(&mut rest) {
                Ok(_) => true,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut,
            }
        })
        .await
        .unwrap();
        assert!(ended && started.elapsed() < HEADER_TIMEOUT * 3, "the idle connection was closed by the server");
        let ready = tokio::task::spawn_blocking(move || probe(addr, Duration::from_secs(10))).await.unwrap();
        assert!(ready.unwrap(), "a real request is served once the idle ones timed out");
        // A connection accepted just before the shutdown, silent for far longer than
        // the shutdown may take: the endpoint stops without waiting for it.
        let late = std::net::TcpStream::connect(addr).unwrap();
        stop.cancel();
        tokio::time::timeout(Duration::from_millis(500), server)
            .await
            .expect("shutdown does not wait")
            .unwrap()
            .unwrap();
        drop((idle, late));
    }
}
