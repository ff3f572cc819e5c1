//! What operators see: readiness (`/health`), Prometheus metrics (`/metrics`), the HTTP
//! endpoint serving both, and JSON logs.
//!
//! The other wings report into [`metrics::Metrics`] and [`health::Health`]; nothing here
//! knows what a task or a phone is beyond the labels it counts.

pub mod health;
pub mod http;
pub mod metrics;
pub mod telemetry;
