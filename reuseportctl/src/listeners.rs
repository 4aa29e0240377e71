//! The listeners of one generation, as `exec` and `supervise` take them: `--listen
//! [NAME=]ADDR:PORT`, repeatable. Each listener is a socket of its own group, registered on a
//! connection of its own; the server gets them from fd 3 on, in `--listen` order, and the
//! launcher follows the generation through [`Registrations`], which folds the state of every
//! group into one.

use std::{collections::HashSet, future::poll_fn, pin::pin, task::Poll};

use reuseport_client::{
    ClientError, Registration,
    proto::{GenState, GroupAddr},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::args::parse_name;

/// The most listeners one server takes: far beyond any real server, low enough that
/// `SERVER_STARTER_PORT` and `LISTEN_FDNAMES` stay short.
pub const MAX_LISTENERS: usize = 32;

/// One `--listen [NAME=]ADDR:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    /// The name passed in `LISTEN_FDNAMES` for this listener (else `--name`, else
    /// `reuseport`).
    pub name: Option<String>,
    pub group: GroupAddr,
}

/// `127.0.0.1:80`, `http=127.0.0.1:80`, `admin=tcp://[::1]:8081`. An address never holds
/// `=`, so the first `=` ends the name.
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    let (name, addr) = match s.split_once('=') {
        Some((name, addr)) => {
            let name = parse_name(name).map_err(|e| format!("listener name {name:?}: {e}"))?;
            (Some(name), addr)
        }
        None => (None, s),
    };
    let group = addr.parse::<GroupAddr>().map_err(|e| e.to_string())?;
    Ok(Listen { name, group })
}

/// Refuses an empty list, more than [`MAX_LISTENERS`], and an address given twice (two
/// sockets of one generation in one group would only split its connections).
pub fn check_listens(listens: &[Listen]) -> anyhow::Result<()> {
    anyhow::ensure!(!listens.is_empty(), "give at least one --listen ADDR:PORT");
    anyhow::ensure!(
        listens.len() <= MAX_LISTENERS,
        "{} listeners: at most {MAX_LISTENERS} --listen",
        listens.len()
    );
    let mut seen = HashSet::new();
    for l in listens {
        anyhow::ensure!(
            seen.insert(l.group.addr),
            "--listen {} is given twice: give each address once",
            l.group.addr
        );
    }
    Ok(())
}

/// The `LISTEN_FDNAMES` entry of each listener.
pub fn fd_names<'a>(listens: &'a [Listen], default: &'a str) -> Vec<&'a str> {
    listens
        .iter()
        .map(|l| l.name.as_deref().unwrap_or(default))
        .collect()
}

/// `tcp://127.0.0.1:80`, or `tcp://127.0.0.1:80 and tcp://127.0.0.1:8081`, for log lines.
pub fn groups_named(groups: &[GroupAddr]) -> String {
    let names: Vec<String> = groups.iter().map(ToString::to_string).collect();
    names.join(" and ")
}

/// One state for a generation that has sockets in several groups: draining once it drains
/// in every group, active while it is active in any (it gets new connections there),
/// standby otherwise.
pub fn combined_state(states: &[GenState]) -> GenState {
    if states.iter().all(|s| *s == GenState::Draining) {
        GenState::Draining
    } else if states.contains(&GenState::Active) {
        GenState::Active
    } else {
        GenState::Standby
    }
}

/// A `restart` the agent forwarded: its id, and the group it was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartRequest {
    pub group: GroupAddr,
    pub id: u64,
}

/// The registrations of one generation's listeners, in `--listen` order. Dropping it closes
/// them all.
pub struct Registrations {
    regs: Vec<Registration>,
    /// Registrations whose [`Registration::closed`] has not resolved yet.
    open: Vec<bool>,
    state: watch::Receiver<GenState>,
    combiner: JoinHandle<()>,
}

impl Registrations {
    /// `regs` must not be empty.
    pub fn new(regs: Vec<Registration>) -> Self {
        let mut watched: Vec<_> = regs.iter().map(Registration::state).collect();
        let mut states: Vec<GenState> =
            watched.iter_mut().map(|w| *w.borrow_and_update()).collect();
        let (tx, state) = watch::channel(combined_state(&states));
        // NB: one task per registration: a `changed()` future dropped unfinished forgets
        // its waker, so they cannot be polled afresh in one loop.
        let (changes, mut changed) = mpsc::unbounded_channel();
        let watchers: Vec<JoinHandle<()>> = watched
            .into_iter()
            .enumerate()
            .map(|(i, mut w)| {
                let changes = changes.clone();
                tokio::spawn(async move {
                    while w.changed().await.is_ok() {
                        if changes.send(Some((i, *w.borrow_and_update()))).is_err() {
                            return;
                        }
                    }
                    let _ = changes.send(None);
                })
            })
            .collect();
        // Ends (dropping `tx`, so `changed()` fails) once any registration ends: the
        // generation then lacks a listener in some group.
        let combiner = tokio::spawn(async move {
            let _watchers = AbortOnDrop(watchers);
            while let Some(Some((i, state))) = changed.recv().await {
                states[i] = state;
                let now = combined_state(&states);
                tx.send_if_modified(|s| std::mem::replace(s, now) != now);
            }
        });
        let open = vec![true; regs.len()];
        Self {
            regs,
            open,
            state,
            combiner,
        }
    }

    /// The groups, as the agent names them, in `--listen` order.
    pub fn groups(&self) -> Vec<GroupAddr> {
        self.regs.iter().map(Registration::group).collect()
    }

    pub fn generation(&self) -> u32 {
        self.regs[0].generation()
    }

    /// The generation's [`combined_state`], updated as the agent pushes changes; `changed()`
    /// fails once any registration has ended.
    pub fn state(&self) -> watch::Receiver<GenState> {
        self.state.clone()
    }

    /// The restart requests the agent pushes down any of the registrations (`supervise`
    /// registers every listener as supervised, so `restart` works with any of its groups),
    /// each with the group it was asked for: the outcome must be reported for that group.
    pub fn take_restart_requests(&mut self) -> Option<mpsc::UnboundedReceiver<RestartRequest>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut any = false;
        for reg in &mut self.regs {
            let Some(mut requests) = reg.take_restart_requests() else {
                continue;
            };
            any = true;
            let (group, tx) = (reg.group(), tx.clone());
            // Ends with the registration (its sender drops) or with the receiver.
            tokio::spawn(async move {
                while let Some(id) = requests.recv().await {
                    if tx.send(RestartRequest { group, id }).is_err() {
                        return;
                    }
                }
            });
        }
        any.then_some(rx)
    }

    /// The sockets now live as fds 3, 4, … of process `pid`.
    pub fn follow_child(&self, pid: i32, first_fd: i32) {
        for (fd, reg) in (first_fd..).zip(&self.regs) {
            reg.follow_child(pid, fd);
        }
    }

    /// Resolves when one of the registrations ends for good (see [`Registration::closed`]),
    /// with its group; pending forever once all have. Cancel-safe.
    pub async fn closed(&mut self) -> (GroupAddr, Result<(), ClientError>) {
        let (regs, open) = (&mut self.regs, &mut self.open);
        poll_fn(|cx| {
            for (reg, open) in regs.iter_mut().zip(open.iter_mut()) {
                if !*open {
                    continue;
                }
                let group = reg.group();
                // NB: `closed` is cancel-safe, so a fresh future each poll loses nothing.
                if let Poll::Ready(res) = pin!(reg.closed()).poll(cx) {
                    *open = false;
                    return Poll::Ready((group, res));
                }
            }
            Poll::Pending
        })
        .await
    }
}

struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl Drop for Registrations {
    fn drop(&mut self) {
        self.combiner.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_may_be_named() {
        let plain = parse_listen("127.0.0.1:80").unwrap();
        assert_eq!((plain.name, plain.group.addr.port()), (None, 80));
        let named = parse_listen("admin=tcp://[::1]:8081").unwrap();
        assert_eq!(named.name.as_deref(), Some("admin"));
        assert_eq!(named.group.addr, "[::1]:8081".parse().unwrap());
        assert!(
            parse_listen("a:b=127.0.0.1:80").is_err(),
            "':' separates names"
        );
        assert!(parse_listen("=127.0.0.1:80").is_err(), "an empty name");
        assert!(parse_listen("web=").is_err(), "a name without an address");
    }

    #[test]
    fn an_address_is_given_once() {
        let l = |s| parse_listen(s).unwrap();
        assert!(check_listens(&[l("127.0.0.1:80"), l("127.0.0.1:81")]).is_ok());
        let twice = check_listens(&[l("127.0.0.1:80"), l("x=127.0.0.1:80")]).unwrap_err();
        assert!(twice.to_string().contains("given twice"), "{twice}");
        assert!(check_listens(&[]).is_err());
    }

    #[test]
    fn a_generation_drains_once_it_drains_everywhere() {
        use GenState::*;
        assert_eq!(combined_state(&[Draining, Draining]), Draining);
        assert_eq!(combined_state(&[Draining, Active]), Active);
        assert_eq!(combined_state(&[Standby, Active]), Active);
        assert_eq!(combined_state(&[Standby, Draining]), Standby);
        assert_eq!(combined_state(&[Standby]), Standby);
    }
}
