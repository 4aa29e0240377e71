//! Fault-injection points: places where a test makes the agent die exactly as `kill -9` would,
//! to prove that what it pins survives a crash at that very moment (a kill from outside lands
//! at random).
//!
//! Compiled in only with the `fault-injection` feature, which the test builds enable. Without
//! it [`point`] is empty, and an agent started with [`ENV`] set refuses to start: a test that
//! asks for a fault must never pass because nothing was injected.

/// `REUSEPORT_FAULT_AT=NAME` kills the agent the first time it passes point `NAME`;
/// `NAME:N` the N-th time.
pub const ENV: &str = "REUSEPORT_FAULT_AT";

/// Refuses an injection request this build cannot honour.
pub fn check_env() -> anyhow::Result<()> {
    if !cfg!(feature = "fault-injection") && std::env::var_os(ENV).is_some() {
        anyhow::bail!(
            "{ENV} is set, but this reuseport-agent was built without the fault-injection \
             feature: build it with `--features fault-injection`, or unset {ENV}"
        );
    }
    Ok(())
}

/// Point `name`: SIGKILL of the agent itself when [`ENV`] names it (see there).
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    use std::sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    };
    static WANTED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static PASSES: AtomicU64 = AtomicU64::new(0);
    let wanted = WANTED.get_or_init(|| {
        let spec = std::env::var(ENV).ok()?;
        Some(match spec.rsplit_once(':') {
            Some((name, n)) => (name.to_owned(), n.parse().ok()?),
            None => (spec, 1),
        })
    });
    let Some((at, nth)) = wanted else { return };
    if at == name && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
        tracing::warn!(point = name, "fault injection: the agent kills itself here");
        // SAFETY: kill(2) of our own pid; nothing runs after it.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Point `name`: nothing in builds without the `fault-injection` feature.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}
