//! The one broker all tests in this binary share. Tests use it side by side; a test
//! that stops it (a broker restart) has it to itself: it waits until no other test
//! holds a share, and tests that start meanwhile wait until it is done. Every test that
//! touches the broker holds a share through its [`Names`](super::amqp::Names).

use parking_lot::{Condvar, Mutex};
use std::time::Duration;

/// How long a test waits for its turn before failing instead of hanging.
const TURN: Duration = Duration::from_secs(900);

struct State {
    sharing: usize,
    exclusive: bool,
}

static STATE: Mutex<State> = Mutex::new(State { sharing: 0, exclusive: false });
static CHANGED: Condvar = Condvar::new();

/// What a test holds while it uses the broker.
#[derive(Debug)]
pub(crate) enum Use {
    Shared,
    Exclusive,
}

impl Use {
    /// Blocks while a test has the broker to itself.
    pub(crate) fn shared() -> Use {
        let mut state = STATE.lock();
        while state.exclusive {
            assert!(!CHANGED.wait_for(&mut state, TURN).timed_out(), "waited {TURN:?} for a broker restart test");
        }
        state.sharing += 1;
        Use::Shared
    }

    /// Blocks until no other test uses the broker.
    pub(crate) fn exclusive() -> Use {
        let mut state = STATE.lock();
        while state.exclusive || state.sharing > 0 {
            assert!(!CHANGED.wait_for(&mut state, TURN).timed_out(), "waited {TURN:?} for the broker to be free");
        }
        state.exclusive = true;
        Use::Exclusive
    }
}

impl Drop for Use {
    fn drop(&mut self) {
        let mut state = STATE.lock();
        match self {
            Use::Shared => state.sharing -= 1,
            Use::Exclusive => state.exclusive = false,
        }
        CHANGED.notify_all();
    }
}
