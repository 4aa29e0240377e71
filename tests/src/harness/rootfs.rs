//! Debian root file systems with a real systemd, for the tests that run the product the way
//! operators do (a `.deb`, units, `systemctl`): one per [`Release`] (Debian 12 with systemd
//! 252, Debian 13 with systemd 257), built with `debootstrap` from Debian's packages on first
//! use, cached under [`CACHE`] and never written again. Every boot runs on an overlay of one
//! (see [`super::nspawn`]), so one build serves every run on the machine.
//!
//! The cache key names everything that goes in (suite, variant, packages, [`LAYOUT`]): a
//! change to any of them builds a new tree next to the old one instead of reusing a stale one.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use nix::fcntl::{Flock, FlockArg};

use super::tool_missing;

/// Where built trees are kept: outside the clone, so a fresh clone on the same machine (CI's)
/// reuses them, next to the VM runner's kernels.
const CACHE: &str = "/var/cache/reuseport-tests/rootfs";
const MIRROR: &str = "http://deb.debian.org/debian";
/// What the tests need besides `--variant=minbase`: systemd as PID 1 (`systemd-sysv`), the
/// bus `systemctl` needs for some verbs, `ip`, and `kill` (procps) for `ExecReload=`.
const PACKAGES: &[&str] = &["dbus", "iproute2", "procps", "systemd", "systemd-sysv"];
/// The version of what [`finish`] does after debootstrap; bump it when that changes.
const LAYOUT: u32 = 1;

/// A Debian release the tests boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Debian 12: systemd 252 (no `Type=notify-reload`).
    Bookworm,
    /// Debian 13: systemd 257.
    Trixie,
}

impl Release {
    /// The suite as debootstrap and the mirror name it.
    ///
    /// NB: Debian 12's debootstrap knows trixie (its script is sid's), and its keyring
    /// verifies trixie's Release file.
    fn suite(self) -> &'static str {
        match self {
            Self::Bookworm => "bookworm",
            Self::Trixie => "trixie",
        }
    }
}

/// The cached root file system of `release`, built first if needed (≈2 minutes, from the
/// network).
///
/// NB: call it before the test enters its own network namespace: debootstrap downloads.
/// Panics when debootstrap is not installed or the build fails, with the reason.
pub fn debian_rootfs(release: Release) -> PathBuf {
    if let Some(reason) = tool_missing("debootstrap") {
        panic!("cannot build the Debian root file system: {reason}");
    }
    let key = cache_key(release);
    let dir = Path::new(CACHE).join(&key);
    let root = dir.join("root");
    let done = dir.join("complete");
    if done.exists() {
        return root;
    }
    fs::create_dir_all(CACHE).unwrap_or_else(|e| panic!("creating {CACHE}: {e}"));
    // NB: one build at a time on the machine; a second test (or run) waits, then finds it.
    let lock = File::create(Path::new(CACHE).join(".lock")).expect("create the cache lock");
    let _lock = Flock::lock(lock, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("locking {CACHE}/.lock: {e}"));
    if done.exists() {
        return root;
    }
    let _ = fs::remove_dir_all(&dir);
    let partial = Path::new(CACHE).join(format!("{key}.partial"));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).expect("create the build directory");
    let started = std::time::Instant::now();
    println!("rootfs: building {key} with debootstrap (once per machine) …");
    debootstrap(release, &partial);
    finish(&partial.join("root"));
    fs::rename(&partial, &dir).expect("move the finished root file system into place");
    File::create(&done).expect("mark the root file system complete");
    println!(
        "rootfs: {} built in {:.0}s",
        root.display(),
        started.elapsed().as_secs_f64()
    );
    root
}

/// `bookworm-minbase-l1-dbus+iproute2+systemd+systemd-sysv`.
fn cache_key(release: Release) -> String {
    format!(
        "{}-minbase-l{LAYOUT}-{}",
        release.suite(),
        PACKAGES.join("+")
    )
}

fn debootstrap(release: Release, partial: &Path) {
    let suite = release.suite();
    let log_path = partial.join("debootstrap.log");
    let log = File::create(&log_path).expect("create the debootstrap log");
    let status = Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .args([suite, &partial.join("root").display().to_string(), MIRROR])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup the log"))
        .stderr(log)
        .status()
        .expect("run debootstrap");
    if !status.success() {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        panic!(
            "debootstrap {suite} from {MIRROR} failed ({status}); is the mirror reachable? \
             Last lines of {}:\n{}",
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

/// What every boot wants and debootstrap does not do.
fn finish(root: &Path) {
    // An empty machine-id: systemd makes a fresh one at each boot instead of every boot of
    // the cache sharing debootstrap's.
    fs::write(root.join("etc/machine-id"), "").expect("empty /etc/machine-id");
    fs::write(root.join("etc/hostname"), "reuseport-rig\n").expect("write /etc/hostname");
    // The downloaded packages are not needed again (≈60 MB).
    if let Ok(debs) = fs::read_dir(root.join("var/cache/apt/archives")) {
        for deb in debs.flatten() {
            if deb.path().extension().is_some_and(|e| e == "deb") {
                let _ = fs::remove_file(deb.path());
            }
        }
    }
}
