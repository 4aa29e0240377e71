//! Fault-injection points: places where a test makes the agent die exactly as `kill -9` would,
//! to prove that what it pins survives a crash at that very moment (a kill from outside lands
//! at random); places where a kernel write fails on demand ([`fail`]), to prove that a
//! failed change leaves nothing half done; a panic ([`panic_point`]); and places where a
//! thread waits until the test lets it go on ([`hold`]), to make a slow step (a verifier run)
//! or a race (two agents starting at once) happen exactly when a test wants it.
//!
//! Compiled in only with the `fault-injection` feature, which the test builds enable. Without
//! it the points are empty, and an agent started with one of the variables set refuses to
//! start: a test that asks for a fault must never pass because nothing was injected.

/// `REUSEPORT_FAULT_AT=NAME` kills the agent the first time it passes point `NAME`;
/// `NAME:N` the N-th time.
pub const ENV: &str = "REUSEPORT_FAULT_AT";
/// `REUSEPORT_FAULT_FAIL=NAME[:N]` makes [`fail`] point `NAME` return an error on its N-th
/// pass (the first by default), as if the kernel had refused the write there.
pub const FAIL_ENV: &str = "REUSEPORT_FAULT_FAIL";
/// `REUSEPORT_FAULT_PANIC=NAME[:N]` panics at [`panic_point`] `NAME` on its N-th pass.
pub const PANIC_ENV: &str = "REUSEPORT_FAULT_PANIC";
/// `REUSEPORT_FAULT_HOLD=NAME[:N]` stops the thread at [`hold`] point `NAME` on its N-th pass
/// until the file [`RELEASE_ENV`] names exists (for good without it).
pub const HOLD_ENV: &str = "REUSEPORT_FAULT_HOLD";
/// The file whose creation lets a held thread go on (see [`HOLD_ENV`]).
#[cfg_attr(
    not(feature = "fault-injection"),
    expect(dead_code, reason = "only the hold points of test builds read it")
)]
pub const RELEASE_ENV: &str = "REUSEPORT_FAULT_RELEASE";

/// `REUSEPORT_TEST_FOREIGN_PROGRAM=1` makes the agent record a program id that is not its
/// own in every pinned record: the next agent then treats the pinned program as another
/// build's and replaces it, which is how the tests take the upgrade path of a real new
/// release without building two agents.
pub const FOREIGN_PROGRAM_ENV: &str = "REUSEPORT_TEST_FOREIGN_PROGRAM";

/// The point between pinning a group's record and switching its table (`Group::publish`).
pub const BETWEEN_RECORD_AND_TABLE: &str = "between-record-and-table";

/// Refuses an injection request this build cannot honour.
pub fn check_env() -> anyhow::Result<()> {
    for var in [ENV, FAIL_ENV, PANIC_ENV, HOLD_ENV, FOREIGN_PROGRAM_ENV] {
        if !cfg!(feature = "fault-injection") && std::env::var_os(var).is_some() {
            anyhow::bail!(
                "{var} is set, but this reuseport-agent was built without the fault-injection \
                 feature: build it with `--features fault-injection`, or unset {var}"
            );
        }
    }
    Ok(())
}

/// The program id to record for a program whose real id is `real` (see
/// [`FOREIGN_PROGRAM_ENV`]).
#[cfg(feature = "fault-injection")]
pub fn recorded_program_id(real: String) -> String {
    if std::env::var_os(FOREIGN_PROGRAM_ENV).is_some_and(|v| v == "1") {
        format!("foreign-{real}")
    } else {
        real
    }
}

/// The program id to record: always the real one in builds without `fault-injection`.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn recorded_program_id(real: String) -> String {
    real
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

/// The N-th pass of point `name`, as the variable `var` asks (`NAME[:N]`).
#[cfg(feature = "fault-injection")]
fn nth_pass(var: &'static str, name: &str) -> bool {
    use std::{
        collections::HashMap,
        sync::{Mutex, OnceLock},
    };
    type Wanted = Option<(String, u64)>;
    static SPECS: OnceLock<Mutex<HashMap<&'static str, (Wanted, u64)>>> = OnceLock::new();
    let mut specs = SPECS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (wanted, passes) = specs.entry(var).or_insert_with(|| {
        let wanted = std::env::var(var).ok().and_then(|spec| {
            Some(match spec.rsplit_once(':') {
                Some((name, n)) => (name.to_owned(), n.parse().ok()?),
                None => (spec, 1),
            })
        });
        (wanted, 0)
    });
    let Some((at, nth)) = wanted else {
        return false;
    };
    if at != name {
        return false;
    }
    *passes += 1;
    *passes == *nth
}

/// Point `name` of a fallible step: an injected error when [`FAIL_ENV`] names it.
#[cfg(feature = "fault-injection")]
pub fn fail(name: &str) -> std::io::Result<()> {
    if !nth_pass(FAIL_ENV, name) {
        return Ok(());
    }
    tracing::warn!(point = name, "fault injection: this step fails");
    Err(std::io::Error::other(format!("injected failure at {name}")))
}

/// Point `name` of a fallible step: never fails in builds without the feature.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fail(_name: &str) -> std::io::Result<()> {
    Ok(())
}

/// Point `name`: a panic when [`PANIC_ENV`] names it.
#[cfg(feature = "fault-injection")]
pub fn panic_point(name: &str) {
    if nth_pass(PANIC_ENV, name) {
        panic!("fault injection: panic at {name}");
    }
}

/// Point `name`: nothing in builds without the feature.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn panic_point(_name: &str) {}

/// Point `name`: waits here when [`HOLD_ENV`] names it, until [`RELEASE_ENV`]'s file exists.
/// Logs `fault injection: holding at NAME` first, which tests wait for.
#[cfg(feature = "fault-injection")]
pub fn hold(name: &str) {
    if !nth_pass(HOLD_ENV, name) {
        return;
    }
    let release = std::env::var_os(RELEASE_ENV).map(std::path::PathBuf::from);
    tracing::warn!(point = name, release = ?release, "fault injection: holding at {name}");
    // NB: polled: the test creates the file from another process, and this runs only in
    // test builds.
    while !release.as_ref().is_some_and(|p| p.exists()) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    tracing::warn!(point = name, "fault injection: released at {name}");
}

/// Point `name`: nothing in builds without the feature.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn hold(_name: &str) {}
