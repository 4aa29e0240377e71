//! `exec` and `supervise` as a container's PID 1 or a child subreaper: the orphans their
//! servers leave behind are handed to them, and they reap them instead of collecting
//! zombies, while still reporting their servers' own exits.
//!
//! The launchers run as subreapers here (`PR_SET_CHILD_SUBREAPER`), which inherit orphans
//! exactly as PID 1 does, without a pid namespace of their own.

use std::{
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::harness::{TestEnv, skip, wait_until};

const TIMEOUT: Duration = Duration::from_secs(30);

/// An orphan the server leaves behind: the pid file its parent writes, and the fifo whose
/// line ends it.
struct Orphan {
    pid_file: std::path::PathBuf,
    fifo: std::path::PathBuf,
}

impl Orphan {
    fn new(env: &TestEnv) -> Self {
        let fifo = env.dir().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        Self {
            pid_file: env.dir().join("orphan"),
            fifo,
        }
    }
}

/// Starts `reuseportctl ARGS… -- sh -c SCRIPT` as a child subreaper; SCRIPT starts a process
/// that waits for a line on the fifo, writes its pid and exits (orphaning it), then runs as
/// the server until signalled.
fn launch_subreaper(env: &TestEnv, args: &[&str], orphan: &Orphan) -> Child {
    let script = format!(
        "sh -c \"sh -c 'read x < {}' & echo \\$! > {}\"; exec sleep 600",
        orphan.fifo.display(),
        orphan.pid_file.display()
    );
    let mut cmd = env.ctl_command();
    cmd.args(args)
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl is async-signal-safe; runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("start reuseportctl")
}

/// Whether `pid` is a child of `parent`, alive or a zombie (exited, never waited for).
fn child_of(pid: i32, parent: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // NB: after the command name in parentheses: state, then ppid.
    let ppid = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned));
    ppid == Some(parent.to_string())
}

/// Waits until the orphan has been handed to `launcher`, ends it, and waits until the
/// launcher has reaped it.
fn orphan_reaped(env: &TestEnv, launcher: &mut Child, orphan: &Orphan) {
    wait_until("the server left an orphan", TIMEOUT, || {
        std::fs::read_to_string(&orphan.pid_file).is_ok_and(|s| s.ends_with('\n'))
    });
    let pid: i32 = std::fs::read_to_string(&orphan.pid_file)
        .expect("orphan pid")
        .trim()
        .parse()
        .expect("a pid");
    let parent = launcher.id();
    wait_until(
        "the orphan was handed to the launcher, its subreaper",
        TIMEOUT,
        || child_of(pid, parent),
    );
    std::fs::write(&orphan.fifo, b"end\n").expect("end the orphan");
    wait_until(
        "the launcher reaped the orphan it inherited (no zombie left)",
        TIMEOUT,
        || !child_of(pid, parent),
    );
    assert!(
        launcher.try_wait().expect("try_wait").is_none(),
        "reaping an orphan should not end the launcher: its server still runs"
    );
    println!("{}: orphan {pid} reaped by pid {parent}", env.name());
}

/// SIGTERM to the launcher, which forwards it to its server; its exit status.
fn stop(launcher: &mut Child) -> std::process::ExitStatus {
    let _ = kill(Pid::from_raw(launcher.id() as i32), Signal::SIGTERM);
    let status = launcher.wait().expect("wait for the launcher");
    println!("launcher exited: {status}");
    status
}

fn have_sh(test: &str) -> bool {
    let found = Path::new("/bin/sh").exists();
    if !found {
        skip(
            test,
            "/bin/sh is not installed (the server is a shell script)",
        );
    }
    found
}

#[test]
fn exec_as_a_subreaper_reaps_orphans_and_reports_its_server() {
    const PORT: u16 = 9971;
    let env = TestEnv::new("exec_as_a_subreaper_reaps_orphans_and_reports_its_server");
    if !have_sh(env.name()) {
        return;
    }
    let orphan = Orphan::new(&env);
    let listen = format!("127.0.0.1:{PORT}");
    let mut exec = launch_subreaper(
        &env,
        &["exec", "--listen", &listen, "--generation", "1"],
        &orphan,
    );
    orphan_reaped(&env, &mut exec, &orphan);
    assert_eq!(
        env.status(PORT).active,
        Some(1),
        "the server stays registered"
    );
    let status = stop(&mut exec);
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "exec should still exit with its server's status (killed by the forwarded SIGTERM)"
    );
}

#[test]
fn supervise_as_a_subreaper_reaps_orphans() {
    const PORT: u16 = 9981;
    let env = TestEnv::new("supervise_as_a_subreaper_reaps_orphans");
    if !have_sh(env.name()) {
        return;
    }
    let orphan = Orphan::new(&env);
    let listen = format!("127.0.0.1:{PORT}");
    let mut supervise = launch_subreaper(&env, &["supervise", "--listen", &listen], &orphan);
    orphan_reaped(&env, &mut supervise, &orphan);
    assert_eq!(
        env.status(PORT).active,
        Some(1),
        "the server stays registered"
    );
    let status = stop(&mut supervise);
    assert!(
        status.success(),
        "supervise should stop its generation and exit 0 on SIGTERM: {status}"
    );
}
