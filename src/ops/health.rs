//! Readiness: the service is ready when its data is indexed, a consumer is attached to
//! the task queue, and it is not stuck behind a message its AMQP client cannot decode.
//! Set by the app and the consume loop, read by `/health`; every change is published on
//! a watch channel, so whoever waits for a state (a test, a supervisor) need not poll.

use tokio::sync::watch;

/// The readiness inputs at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthState {
    /// A dataset is indexed and served.
    pub index_ready: bool,
    /// A consumer is attached to the task queue.
    pub consumer_attached: bool,
    /// A delivery could not be decoded and has not been moved out of the way yet.
    pub undecodable: bool,
    /// Consumer attachments so far (1 after the first connection, +1 per reconnect).
    pub sessions: u64,
}

impl HealthState {
    /// Ready to answer tasks: indexed, consuming, and not blocked by a poison message.
    pub fn ready(&self) -> bool {
        self.index_ready && self.consumer_attached && !self.undecodable
    }
}

/// The service's readiness, set by the parts that know and watched by `/health`.
#[derive(Debug)]
pub struct Health {
    state: watch::Sender<HealthState>,
}

impl Default for Health {
    fn default() -> Self {
        Health { state: watch::Sender::new(HealthState::default()) }
    }
}

impl Health {
    /// Whether a dataset is served.
    pub fn set_index_ready(&self, ready: bool) {
        self.state.send_if_modified(|s| std::mem::replace(&mut s.index_ready, ready) != ready);
    }

    /// Whether a consumer is attached; each attachment counts a session.
    pub fn set_consumer_attached(&self, attached: bool) {
        self.state.send_modify(|s| {
            if attached && !s.consumer_attached {
                s.sessions += 1;
            }
            s.consumer_attached = attached;
        });
    }

    /// Whether a poison message blocks the task queue.
    pub fn set_undecodable(&self, stuck: bool) {
        self.state.send_if_modified(|s| std::mem::replace(&mut s.undecodable, stuck) != stuck);
    }

    /// The inputs now.
    pub fn state(&self) -> HealthState {
        *self.state.borrow()
    }

    /// Every change from now on.
    pub fn watch(&self) -> watch::Receiver<HealthState> {
        self.state.subscribe()
    }

    /// See [`HealthState::index_ready`].
    pub fn index_ready(&self) -> bool {
        self.state().index_ready
    }

    /// See [`HealthState::consumer_attached`].
    pub fn consumer_attached(&self) -> bool {
        self.state().consumer_attached
    }

    /// See [`HealthState::undecodable`].
    pub fn undecodable(&self) -> bool {
        self.state().undecodable
    }

    /// See [`HealthState::ready`].
    pub fn ready(&self) -> bool {
        self.state().ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_data_a_consumer_and_no_undecodable_message() {
        let health = Health::default();
        let mut changes = health.watch();
        health.set_index_ready(true);
        assert!(!health.ready());
        health.set_consumer_attached(true);
        assert!(health.ready());
        health.set_undecodable(true);
        assert!(!health.ready());
        health.set_undecodable(false);
        health.set_consumer_attached(false);
        health.set_consumer_attached(true);
        assert_eq!(health.state().sessions, 2);
        assert!(changes.has_changed().unwrap());
        assert_eq!(*changes.borrow_and_update(), health.state());
    }
}
