//! RabbitMQ plumbing, with no service policy: connecting (plain or TLS), declaring
//! queues, consuming, publishing with confirms, acks, every call bounded in time.
//!
//! What to send, with which properties, and when to ack is the delivery wing's
//! decision; which queues exist is its `topology`.

pub mod address;
pub mod raw;
pub mod session;
pub mod tls;

pub use address::{AddressError, AmqpAddresses, AmqpUrl, Failover, UrlError, redact};
pub use session::{
    BROKER_TIMEOUT, BrokerError, Declared, FRAME_MAX, Publisher, Routed, Session, SessionSpec, ack, requeue,
    requeue_within,
};
pub use tls::TlsSettings;
