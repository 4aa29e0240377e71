//! `cargo xtask ci-fresh`: the check every change passes before it is submitted. It runs CI
//! the way a fresh machine would: a fresh clone of the committed HEAD in a temporary
//! directory, in a private mount namespace where `/sys/fs/bpf` is unmounted (a fresh machine
//! has no bpffs), with a clean environment, running `.ci/run` under CI's 90-minute limit.
//! Afterwards it checks that the run left nothing behind on the host: no pins in the host's
//! `/sys/fs/bpf`, no process started from the clone, nothing new under `/run` or in the
//! cgroup hierarchies.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// CI's own limit for one run of `.ci/run`.
const CI_LIMIT: Duration = Duration::from_secs(90 * 60);

/// Environment variables a fresh root shell on a CI machine has; everything else (cargo's
/// `CARGO_*`, `RUSTUP_TOOLCHAIN`, a developer's `RUSTFLAGS`…) is dropped.
const KEPT_ENV: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "LANG", "TERM", "TMPDIR"];

#[derive(clap::Args, Debug)]
pub struct CiFreshOpts {
    /// Runs of `.ci/run` in a row on the same clone (the second must pass as well).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=5))]
    pub runs: u32,
    /// Keep the clone (and its multi-GB target directory) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

pub fn ci_fresh(opts: &CiFreshOpts) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("cargo xtask ci-fresh needs root, like CI: run it in a root shell");
    }
    let root = crate::workspace();
    warn_uncommitted(&root);
    let head = git(&root, &["rev-parse", "--short", "HEAD"])?;
    let work = tempfile::Builder::new()
        .prefix("reuseport-ci-fresh-")
        .tempdir()
        .context("creating the work directory")?;
    let clone = work.path().join("p");
    println!("ci-fresh: cloning HEAD {head} into {}", clone.display());
    crate::setup::run(
        Command::new("git")
            .args(["clone", "-q"])
            .arg(&root)
            .arg(&clone),
    )?;
    let res = check_runs(opts, &clone);
    if opts.keep || res.is_err() {
        // NB: kept on purpose (to look at a failure, or with --keep): not removed on drop.
        let _ = work.keep();
        println!("ci-fresh: the clone stays in {}", clone.display());
    } else {
        work.close().context("removing the work directory")?;
    }
    res
}

fn check_runs(opts: &CiFreshOpts, clone: &Path) -> anyhow::Result<()> {
    let before = HostState::read();
    for run in 1..=opts.runs {
        let started = Instant::now();
        println!(
            "ci-fresh: run {run} of {}: bash .ci/run (bpffs unmounted, clean environment)",
            opts.runs
        );
        let status = run_ci(clone)?;
        let took = started.elapsed();
        let left = HostState::read().left_since(&before, clone);
        println!(
            "ci-fresh: run {run}: {} in {}m{:02}s",
            if status { "passed" } else { "FAILED" },
            took.as_secs() / 60,
            took.as_secs() % 60
        );
        if !status {
            bail!("run {run} of .ci/run failed on a fresh clone");
        }
        if !left.is_empty() {
            bail!("run {run} left state on the host:\n  {}", left.join("\n  "));
        }
        println!("ci-fresh: run {run} left nothing on the host (bpffs, processes, /run, cgroups)");
    }
    Ok(())
}

/// Runs `.ci/run` in `clone` as a fresh machine would; true if it passed in time.
fn run_ci(clone: &Path) -> anyhow::Result<bool> {
    let mut cmd = Command::new("bash");
    cmd.arg(".ci/run")
        .current_dir(clone)
        .env_clear()
        .envs(kept_env())
        .env("CI", "true")
        .stdin(Stdio::null());
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            private_mounts_without_bpffs()?;
            // NB: CI's runner kills the whole run when it exceeds its limit; so does this.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting bash .ci/run")?;
    let deadline = Instant::now() + CI_LIMIT;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            println!("ci-fresh: .ci/run exceeded CI's limit of {CI_LIMIT:?}");
            return Ok(false);
        }
        // Polling a child's exit, not waiting for readiness.
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// In the child between fork and exec: a mount namespace of its own in which nothing is
/// mounted at `/sys/fs/bpf`, the state of a machine that never mounted bpffs.
fn private_mounts_without_bpffs() -> std::io::Result<()> {
    // SAFETY: plain syscalls on constant, NUL-terminated paths.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // NB: bpffs may be mounted more than once on top of itself: unmount until EINVAL
        // (nothing mounted there any more).
        while libc::umount2(c"/sys/fs/bpf".as_ptr(), libc::MNT_DETACH) == 0 {}
    }
    Ok(())
}

fn kept_env() -> Vec<(OsString, OsString)> {
    KEPT_ENV
        .iter()
        .filter_map(|k| std::env::var_os(k).map(|v| (OsString::from(k), v)))
        .collect()
}

/// Where a run could leave something on the host: pins, runtime files, cgroups (a booted
/// container's systemd makes them), as the entries of each directory.
const WATCHED: &[&str] = &[
    "/sys/fs/bpf",
    "/run",
    "/sys/fs/cgroup",
    "/sys/fs/cgroup/systemd",
    "/sys/fs/cgroup/unified",
];

/// What a run could leave on the host: the entries of each [`WATCHED`] directory.
struct HostState(Vec<BTreeSet<String>>);

impl HostState {
    fn read() -> Self {
        Self(WATCHED.iter().map(|d| names(Path::new(d))).collect())
    }

    /// One line per thing that exists now and did not before, or that runs from `clone`.
    fn left_since(&self, before: &Self, clone: &Path) -> Vec<String> {
        let mut left: Vec<String> = WATCHED
            .iter()
            .zip(self.0.iter().zip(&before.0))
            .flat_map(|(dir, (now, then))| now.difference(then).map(move |n| format!("{dir}/{n}")))
            .collect();
        left.extend(processes_from(clone));
        left
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Processes whose executable or working directory lies in `clone` (agents, servers, QEMU
/// and cargo of the run), as `pid comm` lines.
fn processes_from(clone: &Path) -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().into_owned();
            if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let inside = |link: &str| {
                std::fs::read_link(e.path().join(link)).is_ok_and(|p: PathBuf| p.starts_with(clone))
            };
            (inside("exe") || inside("cwd")).then(|| {
                let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                format!("process {pid} ({}) still runs from the clone", comm.trim())
            })
        })
        .collect()
}

fn warn_uncommitted(root: &Path) {
    if git(root, &["status", "--porcelain", "--untracked-files=no"]).is_ok_and(|s| !s.is_empty()) {
        println!("ci-fresh: NB: uncommitted changes are not part of the check (it clones HEAD)");
    }
}

fn git(root: &Path, args: &[&str]) -> anyhow::Result<String> {
    crate::setup::output(Command::new("git").current_dir(root).args(args))
        .with_context(|| format!("git {} failed in {}", args.join(" "), root.display()))
}
