//! A minimal AMQP 0-9-1 client for the one thing lapin cannot do: read a message whose
//! properties are not valid in lapin's model.
//!
//! lapin decodes every AMQP short string (`message_id`, `reply_to`, header keys, ...) as
//! UTF-8 and treats a failure, or a header field of a type it does not know, as a fatal
//! connection error. The broker then requeues the message and delivers it again to the
//! next connection: one such message wedges every consumer of the queue. This client keeps
//! every string as bytes, so a caller (report-service's sweeper) can receive such a
//! message, copy it to a dead-letter queue and ack it.
//!
//! It speaks just enough of the protocol for that: the handshake (PLAIN), one channel in
//! confirm mode, one consumer (`basic.qos`, `basic.consume`, `basic.cancel`), `basic.ack`,
//! a confirmed `basic.publish`, and closing. No heartbeats, no recovery: each use is a
//! short, bounded exchange, and every call is wrapped in a timeout by its caller. It must
//! not grow into a second client.
//!
//! The caller opens the byte stream (TCP, or TLS over TCP: any [`Transport`]) and hands
//! it to [`RawClient::open`], so this crate knows nothing of sockets, certificates or
//! URLs. Public API: [`RawClient`], [`Login`], the message types below, and the codec
//! helpers a caller needs to judge a message ([`table_problem`], [`escape_bytes`]) and to
//! test against the wire format ([`content_header`], [`parse_content_header`]).
//!
//! Layout: `types` holds the message types and limits, `codec` the wire encoding of
//! properties and header tables, `client` the connection and its frames; this file is
//! the crate's face.

mod client;
mod codec;
mod types;

pub use client::{Login, RawClient};
pub use codec::{content_header, escape_bytes, parse_content_header, table_problem};
pub use types::{
    FRAME_MAX, MAX_TABLE_DEPTH, RawConfirm, RawDelivery, RawError, RawProperties, RawTable, RawValue, Transport,
};
