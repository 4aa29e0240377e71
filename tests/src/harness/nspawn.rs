//! [`BootedSystem`]: the Debian root file system of [`super::rootfs`] booted with its own
//! systemd as PID 1 under `systemd-nspawn --boot`, driven from the test with `nsenter`.
//!
//! Hermetic: the test thread first enters private network and mount namespaces with a bpffs
//! of its own (as every test does, see [`super::TestEnv`]); the overlay the system boots on,
//! the tmpfs nspawn keeps its state in and the bpffs all live in that mount namespace, and
//! the container has its own network namespace. When the container is shut down and the test
//! ends, nothing of it is left on the host.
//!
//! What it takes to run the agent in there (measured on 6.18 with Debian 12's nspawn 252):
//! - `--capability=CAP_BPF,CAP_PERFMON`: nspawn's default set lacks both. Without them
//!   `bpf(2)` falls back to CAP_SYS_ADMIN, which the agent's unit does not keep.
//! - `--system-call-filter=bpf pidfd_getfd`: nspawn's seccomp filter refuses both otherwise;
//!   the launchers fetch their server's listener with `pidfd_getfd` to register it again
//!   after an agent restart.
//! - a bpffs at `/sys/fs/bpf`: a host's systemd mounts one at boot, a container's does not
//!   (and the agent's own mount would be private to its unit, see docs/operations.md).
//! - `--keep-unit --register=no`: PID 1 of the build machines is not systemd; without them
//!   nspawn fails with "Failed to open system bus".
//!
//! Debian 13's systemd 257 boots under the same nspawn 252: on the build machines' hybrid
//! cgroup layout nspawn gives the container a hybrid one too (a tmpfs at /sys/fs/cgroup, the
//! v2 hierarchy at unified/), and 257 reaches `running` in it, its journal saying "System is
//! tainted: unmerged-bin:cgroupsv1".

use std::{
    fs::File,
    io,
    os::{
        fd::AsFd as _,
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{
    cgroup::ContainerCgroup,
    namespaces::{enter_private_namespaces, pid1_child_of},
    tool_missing, wait_until,
};

/// How long the container may take to boot, and to shut down.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of the container's console printed when a test fails.
const CONSOLE_TAIL_LINES: usize = 80;
/// PATH inside the container (nsenter passes the caller's environment on).
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A booted Debian with systemd, shut down on drop.
pub struct BootedSystem {
    name: &'static str,
    /// A tmpfs of the test's mount namespace: overlay layers, the merged root, the console log.
    dir: PathBuf,
    nspawn: Option<Child>,
    leader: Pid,
    netns: File,
    /// Dropped after the container is down (fields drop after [`Drop::drop`]).
    _cgroup: ContainerCgroup,
}

impl BootedSystem {
    /// Boots `rootfs` (left untouched: the container writes to an overlay) after `prepare` put
    /// what the test needs into the merged root it is given. Enters private namespaces on
    /// the calling thread first.
    ///
    /// NB: build the root file system before (it needs the host's network).
    pub fn boot(name: &'static str, rootfs: &Path, prepare: impl FnOnce(&Path)) -> Self {
        if let Some(reason) = tool_missing("systemd-nspawn") {
            panic!("{name}: cannot boot the Debian root file system: {reason}");
        }
        enter_private_namespaces()
            .unwrap_or_else(|e| panic!("{name}: entering private namespaces: {e}"));
        // NB: nspawn keeps its locks and propagation directories under /run/systemd/nspawn;
        // a tmpfs over /run keeps them in this mount namespace instead of on the host.
        tmpfs(Path::new("/run")).unwrap_or_else(|e| panic!("{name}: tmpfs on /run: {e}"));
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("reuseport-rig-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the rig's directory");
        tmpfs(&dir).unwrap_or_else(|e| panic!("{name}: tmpfs on {}: {e}", dir.display()));
        let merged = dir.join("merged");
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir(dir.join(d)).expect("create an overlay directory");
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            rootfs.display(),
            dir.join("upper").display(),
            dir.join("work").display()
        );
        mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .unwrap_or_else(|e| panic!("{name}: overlay on {}: {e}", rootfs.display()));
        prepare(&merged);

        let console = File::create(dir.join("console.log")).expect("create the console log");
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("--directory")
            .arg(&merged)
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--settings=no",
                "--link-journal=no",
                "--resolv-conf=off",
                "--timezone=off",
                "--console=read-only",
                "--machine=reuseport-rig",
                "--capability=CAP_BPF,CAP_PERFMON",
                "--system-call-filter=bpf pidfd_getfd",
                "--bind=/sys/fs/bpf",
            ])
            .stdin(Stdio::null())
            .stdout(console.try_clone().expect("dup the console log"))
            .stderr(console);
        // NB: a test process that dies must not leave a container running: nspawn shuts it
        // down on SIGTERM.
        // SAFETY: prctl is async-signal-safe; runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(io::Error::from)
            });
        }
        let cgroup = ContainerCgroup::create(n)
            .unwrap_or_else(|e| panic!("{name}: a cgroup for the container: {e}"));
        cgroup
            .enter_on_exec(&mut cmd)
            .unwrap_or_else(|e| panic!("{name}: joining the container's cgroup: {e}"));
        let mut nspawn = cmd.spawn().expect("start systemd-nspawn");
        let mut leader = None;
        wait_until(
            "systemd-nspawn started the container's PID 1",
            BOOT_TIMEOUT,
            || {
                if let Some(status) = nspawn.try_wait().expect("wait for nspawn") {
                    let console = std::fs::read_to_string(dir.join("console.log"));
                    panic!(
                        "{name}: systemd-nspawn exited at once ({status}): {}",
                        console.unwrap_or_default()
                    );
                }
                // NB: nspawn forks an intermediate child first.
                leader = pid1_child_of(nspawn.id());
                leader.is_some()
            },
        );
        let leader = leader.expect("found above");
        // NB: PID 1 exists before it has moved to the container's network namespace: until the
        // boot is over, its namespace may still be the test's own (see `network_namespace`).
        let netns = File::open("/proc/thread-self/ns/net").expect("open our network namespace");
        let mut system = Self {
            name,
            dir,
            nspawn: Some(nspawn),
            leader,
            netns,
            _cgroup: cgroup,
        };
        system.wait_booted();
        system.netns = system.network_namespace();
        system
    }

    /// The container's network namespace, once it is booted; panics if it is the test's own.
    fn network_namespace(&self) -> File {
        let ns = File::open(format!("/proc/{}/ns/net", self.leader))
            .expect("open the container's network namespace");
        let ours = File::open("/proc/thread-self/ns/net").expect("open our network namespace");
        let inode = |f: &File| f.metadata().map(|m| m.ino()).expect("stat a namespace");
        assert_ne!(
            inode(&ns),
            inode(&ours),
            "{}: the booted container should have a network namespace of its own",
            self.name
        );
        ns
    }

    /// Until `systemctl is-system-running` says `running`; panics on `degraded` with the
    /// failed units.
    fn wait_booted(&mut self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let state = loop {
            self.assert_nspawn_running();
            // NB: --wait blocks until boot is over, but fails at once while the bus is not up.
            let out = self.exec(&[
                "timeout",
                &BOOT_TIMEOUT.as_secs().to_string(),
                "systemctl",
                "is-system-running",
                "--wait",
            ]);
            let state = stdout(&out).trim().to_owned();
            if matches!(state.as_str(), "running" | "degraded") {
                break state;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the container did not finish booting within {BOOT_TIMEOUT:?} (last state \
                 {state:?}, {})",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        if state == "degraded" {
            let failed = self.exec(&["systemctl", "--failed", "--no-legend"]);
            panic!(
                "{}: the container booted degraded; failed units:\n{}",
                self.name,
                stdout(&failed)
            );
        }
    }

    fn assert_nspawn_running(&mut self) {
        let nspawn = self.nspawn.as_mut().expect("nspawn running");
        if let Some(status) = nspawn.try_wait().expect("wait for nspawn") {
            panic!(
                "{}: systemd-nspawn exited ({status}); console:\n{}",
                self.name,
                self.console_tail()
            );
        }
    }

    /// Runs `args` inside the container (all its namespaces, a clean environment) and waits.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("{}: nsenter {args:?}: {e}", self.name))
    }

    /// `exec`, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{}: {args:?} failed in the container ({}): {}{}",
            self.name,
            out.status,
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        stdout(&out)
    }

    /// `/bin/sh -c script` inside the container, asserting success; returns stdout.
    pub fn sh(&self, script: &str) -> String {
        self.ok(&["/bin/sh", "-c", script])
    }

    /// A command that runs `args` inside the container, for the caller to adjust and start.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &self.leader.to_string(), "--all", "--"])
            .args(args)
            .env_clear()
            .env("PATH", CONTAINER_PATH)
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "")
            .stdin(Stdio::null());
        cmd
    }

    /// Makes `cmd` (a program of the host) run in the container's network namespace only:
    /// a host tool as a client of the container's servers.
    pub fn in_network(&self, cmd: &mut Command) {
        let netns = self.netns.try_clone().expect("dup the netns descriptor");
        // SAFETY: setns is async-signal-safe; runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
    }

    /// The container's network namespace and PID 1's, as the kernel names them, for a test's
    /// failure message.
    pub fn describe_namespaces(&self) -> String {
        let link = |path: String| {
            std::fs::read_link(&path)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|e| format!("{path}: {e}"))
        };
        format!(
            "the test's handle: {}; the container's PID 1 ({}): {}; the test thread: {}",
            link(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&self.netns)
            )),
            self.leader,
            link(format!("/proc/{}/ns/net", self.leader)),
            link("/proc/thread-self/ns/net".to_owned()),
        )
    }

    /// What the container printed on its console, the last lines.
    pub fn console_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n")
    }

    /// `systemctl poweroff` through nspawn (SIGTERM: it asks PID 1 to halt), SIGKILL to the
    /// container's PID 1 if it is not down within [`SHUTDOWN_TIMEOUT`]. What went wrong, if
    /// anything.
    fn shut_down(&mut self) -> Option<String> {
        let mut nspawn = self.nspawn.take()?;
        let _ = kill(Pid::from_raw(nspawn.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        loop {
            match nspawn.try_wait() {
                Ok(Some(_)) => return None,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    // NB: PID 1 of a pid namespace takes every process of it along.
                    let _ = kill(self.leader, Signal::SIGKILL);
                    let _ = nspawn.kill();
                    let _ = nspawn.wait();
                    return Some(format!(
                        "the container did not shut down within {SHUTDOWN_TIMEOUT:?}"
                    ));
                }
            }
        }
    }
}

impl Drop for BootedSystem {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let journal = self.exec(&["journalctl", "--no-pager", "--lines=150"]);
            eprintln!(
                "--- {}: the container's journal ---\n{}",
                self.name,
                stdout(&journal)
            );
        }
        let problem = self.shut_down();
        if std::thread::panicking() || problem.is_some() {
            eprintln!(
                "--- {}: container console ---\n{}",
                self.name,
                self.console_tail()
            );
        }
        let _ = umount2(&self.dir, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(problem) = problem
            && !std::thread::panicking()
        {
            panic!("{}: {problem}", self.name);
        }
    }
}

fn tmpfs(at: &Path) -> nix::Result<()> {
    mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
