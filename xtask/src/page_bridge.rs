//! The agent's status page, reachable from the host while the demo's agent runs in a private
//! network namespace: a listener bound on the host's loopback BEFORE the demo enters its
//! namespace, whose connections are relayed to the agent's metrics listener inside it.
//!
//! NB: a socket belongs to the network namespace of the thread that created it: the listener
//! stays in the host's namespace after the thread moves, and the connections the relay makes
//! afterwards are made in the demo's.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
};

/// The host's side: bound, not yet relaying.
pub struct PageBridge {
    listener: TcpListener,
}

impl PageBridge {
    /// Binds `preferred` on the host's loopback, or any free port when it is taken.
    pub fn bind(preferred: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(preferred)
            .or_else(|_| TcpListener::bind(SocketAddr::new(preferred.ip(), 0)))?;
        Ok(Self { listener })
    }

    /// The page's address for a browser on the host.
    pub fn addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Relays every connection to `target`, connected from the calling thread's namespace
    /// (call it once inside the demo's); runs until the process exits.
    pub fn relay_to(self, target: SocketAddr) {
        thread::spawn(move || {
            for client in self.listener.incoming().flatten() {
                // NB: connect here, on a thread that inherited the demo's namespace.
                let Ok(upstream) = TcpStream::connect(target) else {
                    continue;
                };
                pipe(&client, &upstream);
                pipe(&upstream, &client);
            }
        });
    }
}

/// Copies `from` into `to` on a thread of its own until `from` ends.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    thread::spawn(move || {
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}
