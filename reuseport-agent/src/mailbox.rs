//! What the agent pushes down one control connection, held in bounded memory however slowly
//! (or never) the client reads.
//!
//! A registration's state is coalesced: a client that falls behind gets the latest state of
//! its generation when it reads again, not a backlog of every flip it missed. Restart requests
//! (to a supervisor) and restart outcomes (to whoever asked) each matter, so they queue; the
//! queue is bounded because [`restart`](super::restart) lets at most
//! [`MAX_WAITING_RESTARTS`] restarts wait per group and per requester, and refuses more.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;

use reuseport_proto::message::Reply;

/// Restarts that may wait for their supervisor at once, per group and per requesting
/// connection (see [`restart`](super::restart)).
pub const MAX_WAITING_RESTARTS: usize = 8;

/// Queued pushes a connection may hold: the restart requests of its group (it may be a
/// supervisor) and the outcomes of the restarts it asked for.
const QUEUE_CAP: usize = 2 * MAX_WAITING_RESTARTS;

/// The pushes waiting for one connection's writer.
#[derive(Debug, Default)]
pub struct Mailbox {
    inner: Mutex<Inner>,
    ready: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    /// The latest state change not written yet (a registration has one generation).
    state: Option<Reply>,
    queue: VecDeque<Reply>,
    /// Restart outcomes this connection waits for.
    outcomes_due: usize,
}

/// The queue holds [`QUEUE_CAP`] pushes already.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl Mailbox {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("mailbox poisoned")
    }

    /// A state change: replaces one the client has not been sent yet.
    pub fn push_state(&self, reply: Reply) {
        self.lock().state = Some(reply);
        self.ready.notify_one();
    }

    /// A push that must not be coalesced; refused when the queue is full.
    pub fn push(&self, reply: Reply) -> Result<(), Full> {
        {
            let mut inner = self.lock();
            if inner.queue.len() >= QUEUE_CAP {
                return Err(Full);
            }
            inner.queue.push_back(reply);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// The connection asked for a restart: its outcome will be pushed here.
    pub fn expect_outcome(&self) {
        self.lock().outcomes_due += 1;
    }

    /// The outcome of a restart asked for on this connection (see [`Self::push`]).
    pub fn push_outcome(&self, reply: Reply) -> Result<(), Full> {
        {
            let mut inner = self.lock();
            inner.outcomes_due = inner.outcomes_due.saturating_sub(1);
        }
        self.push(reply)
    }

    /// Whether a restart outcome is still due: the connection is not idle while it waits
    /// for one, whatever the client sends meanwhile.
    pub fn awaits_outcome(&self) -> bool {
        self.lock().outcomes_due > 0
    }

    /// The next push to write. Cancel-safe: a push is taken only when this returns it.
    pub async fn next(&self) -> Reply {
        loop {
            if let Some(reply) = self.take() {
                return reply;
            }
            // NB: notify_one stores a permit when nobody waits, so a push between `take`
            // and this await is not missed.
            self.ready.notified().await;
        }
    }

    /// The state first: a push queued after a state change is written after it.
    fn take(&self) -> Option<Reply> {
        let mut inner = self.lock();
        inner.state.take().or_else(|| inner.queue.pop_front())
    }

    /// Pushes waiting now (for tests).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        let inner = self.lock();
        inner.queue.len() + usize::from(inner.state.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reuseport_proto::message::{GenState, RestartOutcome};

    fn state(state: GenState) -> Reply {
        Reply::State {
            group: "tcp://127.0.0.1:80".parse().unwrap(),
            generation: 1,
            state,
        }
    }

    fn outcome(id: u64) -> Reply {
        Reply::RestartResult {
            group: "tcp://127.0.0.1:80".parse().unwrap(),
            id,
            outcome: RestartOutcome::Active { generation: 2 },
        }
    }

    #[tokio::test]
    async fn a_reader_that_falls_behind_gets_the_latest_state_only() {
        let m = Mailbox::new();
        for i in 0..10_000 {
            m.push_state(state(if i % 2 == 0 {
                GenState::Draining
            } else {
                GenState::Active
            }));
        }
        assert_eq!(
            m.waiting(),
            1,
            "10,000 flips should leave one state to send"
        );
        assert_eq!(m.next().await, state(GenState::Active));
        assert_eq!(m.waiting(), 0);
    }

    #[tokio::test]
    async fn queued_pushes_are_kept_in_order_and_bounded() {
        let m = Mailbox::new();
        for id in 0..QUEUE_CAP as u64 {
            m.push(outcome(id)).expect("room");
        }
        assert_eq!(m.push(outcome(99)), Err(Full), "the queue is bounded");
        m.push_state(state(GenState::Active));
        assert_eq!(
            m.next().await,
            state(GenState::Active),
            "the state goes first"
        );
        for id in 0..QUEUE_CAP as u64 {
            assert_eq!(m.next().await, outcome(id), "outcomes arrive in order");
        }
    }

    #[tokio::test]
    async fn a_push_wakes_a_waiting_writer_and_cancelling_loses_nothing() {
        let m = Mailbox::new();
        // A writer that gives up waiting (its select! took another branch) loses nothing.
        let waited = tokio::time::timeout(std::time::Duration::from_millis(10), m.next()).await;
        assert!(waited.is_err(), "nothing to send yet");
        let writer = tokio::spawn({
            let m = m.clone();
            async move { m.next().await }
        });
        m.push(outcome(7)).expect("room");
        assert_eq!(writer.await.expect("writer"), outcome(7));
    }
}
