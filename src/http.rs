//! The operations endpoint: `GET /health` (200 when ready, 503 otherwise) and
//! `GET /metrics` (Prometheus text), plus the client the `healthcheck` command uses.

use crate::health::Health;
use crate::metrics::Metrics;
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

/// Serves until `shutdown` is cancelled.
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
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await
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
