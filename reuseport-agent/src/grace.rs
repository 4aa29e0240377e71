//! RCU grace periods, as seen from userspace.
//!
//! The kernel program reads a `SteeringConfig` buffer in place while the agent may want to
//! rewrite it. A buffer the program stopped pointing at (after a flip) can still be read by
//! a program invocation that started before the flip. Those invocations run inside an RCU
//! read-side critical section (`reuseport_select_sock` takes `rcu_read_lock`), so once a full
//! RCU grace period has elapsed after the flip, nobody can be reading the old buffer.
//!
//! `membarrier(MEMBARRIER_CMD_GLOBAL)` is `synchronize_rcu()` for userspace
//! (<https://elixir.bootlin.com/linux/v6.18/source/kernel/sched/membarrier.c#L602>); it
//! takes ≈8 ms here. Flips must not wait that long each, so a background thread runs grace
//! periods only while someone holds an unexpired [`Ticket`], and writers check
//! [`Grace::passed`] before reusing a buffer or a sockarray slot; only a writer that runs
//! out of reusable buffers blocks in [`Grace::wait`].

use std::{
    sync::{Arc, Condvar, Mutex},
    thread,
};

/// "A grace period that started after this ticket was taken has completed."
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

#[derive(Default)]
struct State {
    /// Grace periods started so far.
    started: u64,
    /// Grace periods completed so far (they run one at a time, in order).
    completed: u64,
    /// Highest ticket anyone is waiting on.
    wanted: u64,
    failed: Option<String>,
}

#[derive(Clone)]
pub struct Grace {
    inner: Arc<(Mutex<State>, Condvar)>,
}

impl Grace {
    /// Starts the grace-period thread. Fails if the kernel lacks `MEMBARRIER_CMD_GLOBAL`
    /// (4.3+) or refuses it (nohz_full kernels), because flips would then be unsafe.
    pub fn start() -> std::io::Result<Self> {
        synchronize_rcu()?;
        let inner = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let worker = inner.clone();
        thread::Builder::new()
            .name("rcu-grace".into())
            .spawn(move || run(&worker))?;
        Ok(Self { inner })
    }

    /// Marks "now": the returned ticket passes once a grace period that began later has
    /// completed. Asks the worker to run one.
    pub fn retire(&self) -> Ticket {
        let (lock, cv) = &*self.inner;
        let mut st = lock.lock().expect("grace state poisoned");
        let ticket = st.started + 1;
        st.wanted = st.wanted.max(ticket);
        cv.notify_all();
        Ticket(ticket)
    }

    pub fn passed(&self, t: Ticket) -> bool {
        self.inner.0.lock().expect("grace state poisoned").completed >= t.0
    }

    /// Blocks until `t` has passed.
    pub fn wait(&self, t: Ticket) {
        let (lock, cv) = &*self.inner;
        let mut st = lock.lock().expect("grace state poisoned");
        st.wanted = st.wanted.max(t.0);
        cv.notify_all();
        while st.completed < t.0 {
            if let Some(err) = &st.failed {
                // NB: never proceed unsafely; a failed membarrier is a broken kernel promise.
                panic!("RCU grace period failed: {err}");
            }
            st = cv.wait(st).expect("grace state poisoned");
        }
    }
}

fn run(inner: &(Mutex<State>, Condvar)) {
    let (lock, cv) = inner;
    let mut st = lock.lock().expect("grace state poisoned");
    loop {
        while st.completed >= st.wanted {
            st = cv.wait(st).expect("grace state poisoned");
        }
        st.started += 1;
        let this = st.started;
        drop(st);
        let res = synchronize_rcu();
        st = lock.lock().expect("grace state poisoned");
        match res {
            Ok(()) => st.completed = this,
            Err(e) => st.failed = Some(e.to_string()),
        }
        cv.notify_all();
    }
}

fn synchronize_rcu() -> std::io::Result<()> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_pass_after_a_later_grace_period() {
        let g = Grace::start().expect("membarrier");
        let t1 = g.retire();
        g.wait(t1);
        assert!(g.passed(t1));
        let t2 = g.retire();
        assert!(t2 > t1);
        g.wait(t2);
        assert!(g.passed(t2));
    }
}
