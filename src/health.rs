//! Readiness: the service is ready when its data is indexed, a consumer is attached to
//! the task queue, and it is not stuck behind a message its AMQP client cannot decode.
//! Set by the app and the consume loop, read by `/health`.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Health {
    index_ready: AtomicBool,
    consumer_attached: AtomicBool,
    /// A delivery could not be decoded and has not been moved out of the way yet.
    undecodable: AtomicBool,
}

impl Health {
    pub fn set_index_ready(&self, ready: bool) {
        self.index_ready.store(ready, Ordering::SeqCst);
    }

    pub fn set_consumer_attached(&self, attached: bool) {
        self.consumer_attached.store(attached, Ordering::SeqCst);
    }

    pub fn index_ready(&self) -> bool {
        self.index_ready.load(Ordering::SeqCst)
    }

    pub fn consumer_attached(&self) -> bool {
        self.consumer_attached.load(Ordering::SeqCst)
    }

    pub fn set_undecodable(&self, stuck: bool) {
        self.undecodable.store(stuck, Ordering::SeqCst);
    }

    pub fn undecodable(&self) -> bool {
        self.undecodable.load(Ordering::SeqCst)
    }

    pub fn ready(&self) -> bool {
        self.index_ready() && self.consumer_attached() && !self.undecodable()
    }
}
