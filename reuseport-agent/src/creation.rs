//! Creating a group without stalling anyone else.
//!
//! A new group loads and verifies its program: 50 ms here, seconds on some kernels. While
//! that runs, no lock anyone else needs is held, and only a few creations run at once:
//!
//! - a registration for a new group first reserves it in the state ([`Creating`]), which is
//!   where the group quotas count it; a second registration for the same group waits for
//!   that creation to end instead of starting its own;
//! - it then waits, without holding a thread, for a [`Permit`]: one creation at a time per
//!   uid, so one user's burst of new groups queues behind itself, and at most
//!   [`CONCURRENT_CREATIONS`] of non-root users at once, so the blocking threads that serve
//!   `status`, flips and unregistrations are never all taken by program loads. Root's
//!   creations do not wait for other users'.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// Creations of non-root users that load programs at once.
pub const CONCURRENT_CREATIONS: usize = 2;

/// A group being created: counted for its owner's quota, and awaited by other
/// registrations for the same group.
pub struct Creating {
    pub owner: u32,
    /// Closed when the creation ends, whether or not it succeeded.
    pub done: watch::Receiver<()>,
}

impl Creating {
    /// A creation for `owner`, and what ends it when dropped.
    pub fn start(owner: u32) -> (Self, watch::Sender<()>) {
        let (tx, rx) = watch::channel(());
        (Self { owner, done: rx }, tx)
    }
}

/// Who may load a program now.
pub struct Gate {
    running: Arc<Semaphore>,
    per_uid: Arc<Mutex<HashMap<u32, Arc<Semaphore>>>>,
}

impl Gate {
    pub fn new() -> Self {
        Self {
            running: Arc::new(Semaphore::new(CONCURRENT_CREATIONS)),
            per_uid: Arc::default(),
        }
    }

    /// Waits until a creation asked for by `uid` may run.
    pub async fn enter(&self, uid: u32) -> Permit {
        let mine = self
            .per_uid
            .lock()
            .expect("creation gate poisoned")
            .entry(uid)
            .or_insert_with(|| Arc::new(Semaphore::new(1)))
            .clone();
        let own = mine.acquire_owned().await.expect("never closed");
        let running = if uid == 0 {
            None
        } else {
            Some(
                self.running
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("never closed"),
            )
        };
        Permit {
            uid,
            own: Some(own),
            _running: running,
            per_uid: self.per_uid.clone(),
        }
    }

    /// Uids with a creation running or waiting (for tests).
    #[cfg(test)]
    fn uids(&self) -> usize {
        self.per_uid.lock().expect("creation gate poisoned").len()
    }
}

/// Leave to run one creation; the next one of the same uid waits until it is dropped.
pub struct Permit {
    uid: u32,
    own: Option<OwnedSemaphorePermit>,
    _running: Option<OwnedSemaphorePermit>,
    per_uid: Arc<Mutex<HashMap<u32, Arc<Semaphore>>>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        drop(self.own.take());
        let mut per_uid = self.per_uid.lock().expect("creation gate poisoned");
        // NB: the map's is the last reference once nobody of this uid waits: forget it.
        if per_uid
            .get(&self.uid)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            per_uid.remove(&self.uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn blocked(gate: &Gate, uid: u32) -> bool {
        tokio::time::timeout(Duration::from_millis(20), gate.enter(uid))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn one_creation_per_uid_a_few_at_once_and_root_never_waits_for_users() {
        let gate = Gate::new();
        let a = gate.enter(1000).await;
        assert!(
            blocked(&gate, 1000).await,
            "a uid runs one creation at a time"
        );
        let b = gate.enter(1001).await;
        assert!(
            blocked(&gate, 1002).await,
            "at most {CONCURRENT_CREATIONS} users' creations run at once"
        );
        let root = gate.enter(0).await;
        drop(a);
        let _c = gate.enter(1002).await;
        drop((b, root));
        assert_eq!(gate.uids(), 1, "a uid with nothing running is forgotten");
    }

    #[tokio::test]
    async fn a_creation_ends_for_its_waiters_when_dropped() {
        let (creating, end) = Creating::start(7);
        let mut waiter = creating.done.clone();
        drop(end);
        assert!(waiter.changed().await.is_err(), "the waiter is woken");
    }
}
