//! [`Container`]: a command run the way a container runtime runs it: in user, mount and PID
//! namespaces of its own, its root an unprivileged uid and gid of the host
//! ([`CONTAINER_UID`], as rootless runtimes and Docker's `userns-remap` map it), PID 1 of its
//! pid namespace, `/proc` of its own, a tmpfs on `/run` and the agent's control directory
//! bind-mounted at `/run/reuseport` (the default control path works unchanged). The network
//! namespace is the caller's (`--net=host`) or one it names (a pod's).
//!
//! The namespaces come from `unshare` (util-linux, or busybox in the VM guests), started as the
//! container's host uid: an unprivileged user may create a user namespace and map itself to
//! root in it.

use std::{
    fs::File,
    io,
    os::{fd::AsFd as _, unix::fs::PermissionsExt as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{namespaces::pid1_child_of, patience, wait_until};

/// The host uid and gid the container's root maps to.
pub const CONTAINER_UID: u32 = 100_000;
pub const CONTAINER_GID: u32 = 100_000;
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// `tmpfs` on /run, the control directory bound at `/run/reuseport` (where the default
/// control socket is), then the command as PID 1.
const SETUP: &str = r#"set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/reuseport
mount -o bind "$0" /run/reuseport
exec "$@""#;

/// A running container; killed (all of its pid namespace) on drop.
pub struct Container {
    name: String,
    unshare: Option<Child>,
    init: Pid,
    log: PathBuf,
}

impl Container {
    /// Runs `command` as PID 1 of a new container that sees `control_dir` at
    /// `/run/reuseport`, in `netns` if given (else the caller's network namespace), with
    /// `env` added to the environment. Output goes to `<log_dir>/<name>.log`.
    pub fn start(
        name: &str,
        log_dir: &Path,
        control_dir: &Path,
        netns: Option<&File>,
        env: &[(&str, String)],
        command: &[&str],
    ) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("create the container's log");
        let mut cmd = Command::new("unshare");
        // NB: the options util-linux and busybox (the VM guests') both know: user namespace
        // with root mapped to the caller, mount, pid, fork, /proc.
        cmd.args([
            "-U",
            "-r",
            "-m",
            "--propagation",
            "private",
            "-p",
            "-f",
            "--mount-proc",
            "--",
            "sh",
            "-c",
            SETUP,
        ])
        .arg(control_dir)
        .args(command)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup the log"))
        .stderr(out);
        let netns = netns.map(|f| f.try_clone().expect("dup the netns descriptor"));
        // NB: the runtime joins the network namespace while it is still root, then becomes the
        // container's host uid; Command::uid would drop root before pre_exec runs.
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(netns) = &netns {
                    setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                }
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(CONTAINER_GID) != 0
                    || libc::setuid(CONTAINER_UID) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut unshare = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: start unshare: {e}"));
        let mut init = None;
        wait_until(
            &format!("{name}: the container's PID 1 runs"),
            patience(START_TIMEOUT),
            || {
                if let Some(status) = unshare.try_wait().expect("wait for unshare") {
                    panic!(
                        "{name}: the container exited at once ({status}):\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                init = pid1_child_of(unshare.id());
                init.is_some()
            },
        );
        Self {
            name: name.to_owned(),
            unshare: Some(unshare),
            init: init.expect("found above"),
            log,
        }
    }

    /// The host's pid of the container's PID 1.
    pub fn init(&self) -> Pid {
        self.init
    }

    /// The host's pids of the processes whose parent is the container's PID 1, with their
    /// command names.
    pub fn children_of_init(&self) -> Vec<(Pid, String)> {
        let init = self.init.as_raw();
        let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
            .unwrap_or_default();
        children
            .split_whitespace()
            .filter_map(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                Some((Pid::from_raw(pid.parse().ok()?), comm.trim().to_owned()))
            })
            .collect()
    }

    /// `kill SIGNAL` of the container's PID 1, as `docker stop` or `docker kill -s` do.
    pub fn signal(&self, signal: Signal) {
        kill(self.init, signal).expect("signal the container's PID 1");
    }

    /// Panics with the log if the container has exited.
    pub fn assert_running(&mut self) {
        let unshare = self.unshare.as_mut().expect("running");
        if let Some(status) = unshare.try_wait().expect("wait for unshare") {
            panic!(
                "{}: the container exited ({status}); log:\n{}",
                self.name,
                self.log()
            );
        }
    }

    /// The container's exit status (its PID 1's, as `unshare --fork` passes it on), or None
    /// if it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let unshare = self.unshare.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = unshare.try_wait().expect("wait for unshare") {
                self.unshare = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the container printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut unshare) = self.unshare.take() {
            // NB: PID 1 of a pid namespace takes every process of it along.
            let _ = kill(self.init, Signal::SIGKILL);
            let _ = unshare.kill();
            let _ = unshare.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- container {} ---\n{}", self.name, self.log());
        }
    }
}

/// A fifo anyone may open (the container's root is another uid of the host).
pub fn shared_fifo(path: &Path) -> PathBuf {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o666)).expect("mkfifo");
    // NB: mkfifo applies the umask.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    path.to_owned()
}
