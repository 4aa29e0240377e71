//! Bounds on control connections, so that no client can stall the others: how many may be
//! open, how long a request may take to arrive, and who makes room at the limit.
//!
//! A registered connection stays open for as long as its registration (by design: closing
//! it unregisters the socket), so it is never timed out or evicted. Every other connection
//! must start a request within [`IDLE_TIMEOUT`] and finish it within [`FRAME_TIMEOUT`]; at the
//! connection limit, the connection that has waited longest for a request is closed to admit
//! the new one. How many places one uid may hold, and which ones only root may take, is
//! [`quota`](super::quota)'s rule: a uid at its quota makes room among its own idle
//! connections only. An operator's `status` therefore always gets through, however many idle
//! connections or registrations users hold open.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future as _,
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex},
    task::Poll,
    time::Duration,
};

use tokio::{io::Interest, sync::oneshot, time::Instant};

use super::quota::{Quotas, Usage};
use reuseport_proto::{
    frame::{Conn, Frame, FrameError},
    message::{ErrorKind, Reply},
};

/// How long an unregistered connection may stay silent between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request may take to arrive once its first byte has.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reply on an unregistered connection may wait for the client to read.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of `reuseport-agent --max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;
/// Pause after accept() fails for lack of resources (EMFILE…) and no connection could be
/// closed to make room, so the loop does not spin.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Pause after closing an idle connection for that reason: time for its task to let go of
/// the descriptor.
pub const EVICTION_PAUSE: Duration = Duration::from_millis(2);

/// Descriptors the agent needs besides control connections: its own (runtime, grace
/// helper, listener, logs, the few a group's creation or change opens for a moment) and,
/// per group, the two maps it holds open (see `kernel::GroupKernel`); a group in another
/// network namespace holds that namespace's too, which the reserve covers for a few dozen.
const RESERVED_FDS: u64 = 64;
const FDS_PER_GROUP: u64 = 2;

/// Why a connection is closed before its next request.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("no request within {} s; closing the connection", IDLE_TIMEOUT.as_secs())]
    Idle,
    #[error(
        "incomplete request: the frame did not arrive within {} s of its first byte; closing \
         the connection",
        FRAME_TIMEOUT.as_secs()
    )]
    Incomplete,
    /// Closed to make room; what was full.
    #[error("closing this idle connection to admit a new one: {0}")]
    Evicted(String),
}

impl RecvError {
    /// What to tell the client before closing, if it can still be told anything.
    pub fn reply(&self) -> Option<Reply> {
        let kind = match self {
            Self::Frame(FrameError::Io(_)) => return None,
            Self::Evicted(_) => ErrorKind::Limit,
            _ => ErrorKind::BadRequest,
        };
        let message = match self {
            // NB: a frame error says what is wrong with the frame, not what happens next.
            Self::Frame(e) => format!("{e}; closing the connection"),
            other => other.to_string(),
        };
        Some(Reply::Error { kind, message })
    }
}

/// Open control connections and the ones waiting for a request, oldest wait first.
pub struct Admission {
    quotas: Quotas,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    open: u32,
    /// Open connections per uid.
    by_uid: HashMap<u32, u32>,
    next_wait: u64,
    /// Connections waiting for a request: their uid, and what tells them to close.
    waiting: BTreeMap<u64, (u32, oneshot::Sender<String>)>,
}

impl Table {
    fn usage(&self, uid: u32) -> Usage {
        Usage {
            uid,
            of_uid: self.by_uid.get(&uid).copied().unwrap_or(0),
            of_non_root: self.open - self.by_uid.get(&0).copied().unwrap_or(0),
            total: self.open,
        }
    }

    /// Closes the connection that has waited longest among those of a uid `evictable`
    /// accepts; false if there is none.
    fn evict_oldest(&mut self, evictable: impl Fn(u32) -> bool, why: impl Fn() -> String) -> bool {
        let candidates: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, (uid, _))| evictable(*uid))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in candidates {
            let (_, tx) = self.waiting.remove(&seq).expect("seq from the map");
            if tx.send(why()).is_ok() {
                return true;
            }
        }
        false
    }
}

impl Admission {
    /// `quotas.max_connections` places, shared as [`Quotas`] says.
    pub fn new(quotas: Quotas) -> Arc<Self> {
        Arc::new(Self {
            quotas,
            table: Mutex::new(Table::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("admission table poisoned")
    }

    /// A place for a new connection of `uid`. When its quota, the users' share or the table
    /// is full, the connection that has waited longest for a request among those whose
    /// place would do is closed to make room; the refusal to send (a `limit` error) when
    /// every such connection is registered or busy.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<Admitted, String> {
        let mut t = self.lock();
        if let Some(full) = self.quotas.connection_full(t.usage(uid))
            && !t.evict_oldest(
                |other| full.freed_by(other, uid),
                || self.quotas.connections_full(full, uid),
            )
        {
            return Err(self.quotas.connection_refusal(full, uid));
        }
        t.open += 1;
        *t.by_uid.entry(uid).or_default() += 1;
        Ok(Admitted {
            admission: self.clone(),
            uid,
            fresh: true,
        })
    }

    /// Closes the longest-waiting connection (accept() ran out of descriptors).
    pub fn evict_one(&self) -> bool {
        self.lock().evict_oldest(
            |_| true,
            || "the agent ran out of file descriptors (RLIMIT_NOFILE)".to_owned(),
        )
    }
}

/// One admitted connection; gives its place back when dropped.
pub struct Admitted {
    admission: Arc<Admission>,
    uid: u32,
    /// Nothing was read yet: the frame buffer is empty.
    fresh: bool,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut t = self.admission.lock();
        t.open -= 1;
        if let Some(n) = t.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                t.by_uid.remove(&self.uid);
            }
        }
    }
}

/// A connection's entry among the ones waiting for a request; removed when dropped.
struct Waiting<'a> {
    admission: &'a Admission,
    seq: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.admission.lock().waiting.remove(&self.seq);
    }
}

impl Admitted {
    /// The next request on `conn`, or `None` when the client closed it. Connections that
    /// are not `busy` (a registration, or one waiting for a restart's outcome) are bounded
    /// in time and may be evicted while they wait.
    pub async fn next_frame(
        &mut self,
        conn: &mut Conn,
        busy: bool,
    ) -> Result<Option<Frame>, RecvError> {
        if busy {
            return Ok(conn.recv().await?);
        }
        let (tx, evicted) = oneshot::channel();
        let _waiting = {
            let mut t = self.admission.lock();
            let seq = t.next_wait;
            t.next_wait += 1;
            t.waiting.insert(seq, (self.uid, tx));
            Waiting {
                admission: &self.admission,
                seq,
            }
        };
        let fresh = std::mem::replace(&mut self.fresh, false);
        tokio::select! {
            frame = bounded_recv(conn, fresh) => frame,
            Ok(why) = evicted => Err(RecvError::Evicted(why)),
        }
    }

    /// Sends `reply`; on an unregistered connection, gives up after [`SEND_TIMEOUT`] (a
    /// client that does not read). False when the connection is no longer usable.
    pub async fn send(&self, conn: &Conn, reply: &Reply, registered: bool) -> bool {
        if registered {
            return conn.send(reply, None).await.is_ok();
        }
        matches!(
            tokio::time::timeout(SEND_TIMEOUT, conn.send(reply, None)).await,
            Ok(Ok(()))
        )
    }
}

async fn bounded_recv(conn: &mut Conn, fresh: bool) -> Result<Option<Frame>, RecvError> {
    if !fresh {
        // A client that sent its next request with the previous one: it may already sit in
        // the frame buffer, where no readiness event will announce it.
        // NB: `Conn::recv` is cancel-safe (it buffers what it reads), so one poll is enough.
        let mut recv = std::pin::pin!(conn.recv());
        if let Poll::Ready(frame) =
            std::future::poll_fn(|cx| Poll::Ready(recv.as_mut().poll(cx))).await
        {
            return Ok(frame?);
        }
    }
    wait_for_data(conn).await?;
    match tokio::time::timeout(FRAME_TIMEOUT, conn.recv()).await {
        Ok(frame) => Ok(frame?),
        Err(_) => Err(RecvError::Incomplete),
    }
}

/// Waits until the client sends a byte or closes, at most [`IDLE_TIMEOUT`].
async fn wait_for_data(conn: &Conn) -> Result<(), RecvError> {
    let deadline = Instant::now() + IDLE_TIMEOUT;
    let stream = conn.stream();
    loop {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Err(_) => return Err(RecvError::Idle),
            Ok(Err(e)) => return Err(FrameError::Io(e).into()),
            Ok(Ok(())) => {}
        }
        // NB: readiness can be left over from the last read; only a peek tells whether data
        // (or the end of the stream) is really there.
        let peeked = stream.try_io(Interest::READABLE, || {
            let mut byte = 0u8;
            // SAFETY: a one-byte buffer we own; MSG_PEEK leaves the byte in the socket.
            let n = unsafe {
                libc::recv(
                    stream.as_raw_fd(),
                    (&raw mut byte).cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
        match peeked {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(FrameError::Io(e).into()),
        }
    }
}

/// Raises RLIMIT_NOFILE to what `max_groups` groups and `wanted` control connections need:
/// the soft limit to the hard one (the default soft limit, 1024, would make a thousand idle
/// clients exhaust the agent's descriptors), and the hard one too where the agent may (root
/// with CAP_SYS_RESOURCE, up to `fs.nr_open`). Returns how many control connections fit
/// next to the groups, at most `wanted`.
pub fn fit_connections(wanted: u32, max_groups: u32) -> usize {
    let needed = RESERVED_FDS + FDS_PER_GROUP * u64::from(max_groups) + u64::from(wanted);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on structs we own.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "reading RLIMIT_NOFILE");
            return wanted as usize;
        }
        let hard = lim.rlim_max.max(needed.min(nr_open()));
        let tries = [hard, lim.rlim_max].map(|n| libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        });
        // NB: without CAP_SYS_RESOURCE (the shipped unit's bounding set lacks it: it sets
        // LimitNOFILE= instead) raising the hard limit fails; the soft one still may rise.
        match tries
            .iter()
            .find(|t| t.rlim_cur <= lim.rlim_cur || libc::setrlimit(libc::RLIMIT_NOFILE, *t) == 0)
        {
            Some(t) => t.rlim_cur.max(lim.rlim_cur),
            None => {
                tracing::warn!(
                    error = %std::io::Error::last_os_error(),
                    soft = lim.rlim_cur, hard = lim.rlim_max,
                    "cannot raise the soft RLIMIT_NOFILE to the hard limit"
                );
                lim.rlim_cur
            }
        }
    };
    let room = soft.saturating_sub(RESERVED_FDS + FDS_PER_GROUP * u64::from(max_groups));
    let fit = u64::from(wanted).min(room).max(1) as usize;
    if fit < wanted as usize {
        tracing::warn!(
            wanted,
            fit,
            nofile = soft,
            "fewer control connections than asked fit in RLIMIT_NOFILE; raise the hard limit \
             (LimitNOFILE= in a systemd unit) or lower --max-groups"
        );
    }
    fit
}

/// `fs.nr_open`: the most descriptors any process may be allowed.
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_limit_the_longest_waiting_connection_makes_room() {
        let a = Admission::new(Quotas::new(1, None, 2, None));
        let s1 = a.admit(0).expect("first place");
        let _s2 = a.admit(0).expect("second place");
        // Nobody waits for a request: both are busy, so a third is refused.
        assert!(a.admit(0).is_err(), "busy connections must not be evicted");
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        a.lock().waiting.insert(7, (0, tx1));
        a.lock().waiting.insert(9, (0, tx2));
        let _s3 = a
            .admit(0)
            .expect("room is made by evicting a waiting connection");
        let why = rx1
            .try_recv()
            .expect("the longest-waiting one is told to close");
        assert!(why.contains("maximum of 2"), "{why}");
        assert!(rx2.try_recv().is_err(), "only one connection is evicted");
        drop(s1);
        assert_eq!(a.lock().open, 2);
    }

    #[test]
    fn a_user_at_its_quota_evicts_only_its_own_idle_connections() {
        // 16 places: 4 per uid, 1 kept for root.
        let a = Admission::new(Quotas::new(1, None, 16, None));
        let mine: Vec<Admitted> = (0..4).map(|_| a.admit(1000).expect("quota")).collect();
        let (theirs_tx, mut theirs) = oneshot::channel();
        a.lock().waiting.insert(1, (2000, theirs_tx));
        match a.admit(1000) {
            Err(message) => assert!(message.contains("--max-connections-per-uid"), "{message}"),
            Ok(_) => panic!("a fifth connection of uid 1000 should be refused"),
        }
        assert!(
            theirs.try_recv().is_err(),
            "another uid's connection is not evicted"
        );
        let (own_tx, mut own) = oneshot::channel();
        a.lock().waiting.insert(2, (1000, own_tx));
        let _fifth = a.admit(1000).expect("its own idle connection makes room");
        let why = own.try_recv().expect("its own idle connection is closed");
        assert!(why.contains("uid 1000"), "{why}");
        drop(mine);
        assert_eq!(a.lock().by_uid.get(&1000), Some(&1));
    }

    #[test]
    fn users_filling_their_share_leave_roots_place() {
        let a = Admission::new(Quotas::new(1, None, 16, None));
        let users: Vec<Admitted> = (0..15)
            .map(|i| a.admit(1000 + i / 4).expect("the users' share"))
            .collect();
        match a.admit(2000) {
            Err(message) => assert!(message.contains("kept for root"), "{message}"),
            Ok(_) => panic!("the last place is root's"),
        }
        let _root = a.admit(0).expect("root's place");
        drop(users);
    }

    #[test]
    fn only_frame_errors_of_the_transport_go_unanswered() {
        let io = RecvError::Frame(FrameError::Io(std::io::ErrorKind::BrokenPipe.into()));
        assert!(io.reply().is_none());
        let why = Quotas::new(1, None, 3, None).connections_full(crate::quota::Full::Table, 0);
        match RecvError::Evicted(why).reply() {
            Some(Reply::Error { kind, message }) => {
                assert_eq!(kind, ErrorKind::Limit);
                assert!(message.contains("maximum of 3"), "{message}");
            }
            other => panic!("eviction should be a limit error, got {other:?}"),
        }
        assert!(matches!(
            RecvError::Idle.reply(),
            Some(Reply::Error {
                kind: ErrorKind::BadRequest,
                ..
            })
        ));
    }
}
