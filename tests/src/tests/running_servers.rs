//! Adopting running servers that bind their own sockets: `reuseportctl register --pid`
//! takes a process's listening SO_REUSEPORT sockets (`pidfd_getfd`) and registers them for
//! it, until it exits. With real nginx (`listen … reuseport`, one socket per worker): two
//! instances on one port, each worker registered on its own, flipped under load and the old
//! one stopped gracefully, lose no request.
//!
//! nginx runs in the test's network namespace, with its configuration, pid file and logs in
//! the test's temp dir. It is not in the VM guests: the test skips there. A server of our own
//! that binds its own listener shows `register --pid --fd --wait` everywhere.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::{
        fd::AsRawFd as _,
        unix::{fs::PermissionsExt as _, process::CommandExt as _},
    },
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::drain::serve_slowly;
use crate::harness::{
    ApacheBench, Tally, TestEnv, bin_path, generation_status, helper_args, local, request_once,
    skip, ss, tool_missing, wait_until,
};

/// nginx starting, workers registering, a graceful stop.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Requests of our client each generation answers before the next step.
const ANSWERS: u64 = 50;

/// One nginx instance (master and 2 workers) on `127.0.0.1:port` with `reuseport`,
/// answering `gen N`; stopped (SIGTERM, then waited for) when dropped.
struct Nginx {
    conf: PathBuf,
    master: Child,
}

impl Nginx {
    fn start(env: &TestEnv, port: u16, generation: u32) -> Self {
        let dir = env.dir().join(format!("nginx-{generation}"));
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let d = dir.display();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
                 proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
                 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
                 server {{\n    listen 127.0.0.1:{port} reuseport;\n    \
                 location / {{ default_type text/plain; return 200 \"gen {generation}\\n\"; }}\n  }}\n}}\n"
            ),
        )
        .expect("write nginx.conf");
        let master = Command::new("nginx")
            .args(["-p", &d.to_string(), "-c", &conf.display().to_string()])
            .stdin(Stdio::null())
            .spawn()
            .expect("start nginx");
        Self { conf, master }
    }

    /// Its workers' pids, once each watches its socket: every worker holds every worker's
    /// `reuseport` socket on `port` and watches its own with epoll (which is how `register
    /// --all-listeners` tells them apart). A worker adds its master channel to epoll after
    /// its listener, so any watched descriptor will do.
    fn workers(&mut self, port: u16) -> Vec<i32> {
        let master = self.master.id() as i32;
        let mut workers = Vec::new();
        wait_until("nginx's 2 workers watch their sockets", TIMEOUT, || {
            if let Ok(Some(status)) = self.master.try_wait() {
                panic!("nginx exited ({status}) as it started");
            }
            workers = children_of(master);
            let listeners = ss(port, true);
            workers.len() == 2
                && workers
                    .iter()
                    .all(|w| listeners.iter().any(|s| s.pids.contains(w)) && watches_something(*w))
        });
        workers
    }

    /// `nginx -s quit`: the graceful stop; returns once the master has exited.
    fn quit(&mut self) {
        let status = Command::new("nginx")
            .args(["-c", &self.conf.display().to_string(), "-s", "quit"])
            .status()
            .expect("run nginx -s quit");
        assert!(status.success(), "nginx -s quit failed: {status}");
        let master = &mut self.master;
        wait_until("the old nginx has exited", TIMEOUT, || {
            master.try_wait().expect("wait for nginx").is_some()
        });
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if self.master.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.master.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.master.wait();
        }
    }
}

/// `pid` has an epoll instance with a descriptor in it.
fn watches_something(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo")).is_ok_and(|dir| {
        dir.flatten().any(|e| {
            std::fs::read_to_string(e.path())
                .is_ok_and(|i| i.lines().any(|l| l.starts_with("tfd:")))
        })
    })
}

/// The pids whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let mut children: Vec<i32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                // `pid (comm) state ppid …`; comm may hold spaces, so split after ')'.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                    == Some(pid)
            })
        })
        .collect();
    children.sort_unstable();
    children
}

/// One HTTP/1.0 request on a new connection: the generation in the body (`gen N`).
fn http_get(addr: SocketAddr) -> std::io::Result<u32> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let bad = || std::io::Error::other(format!("unexpected answer {reply:?}"));
    if !reply.starts_with("HTTP/1.1 200") {
        return Err(bad());
    }
    reply
        .rsplit_once("\r\n\r\n")
        .and_then(|(_, body)| body.trim().strip_prefix("gen ")?.parse().ok())
        .ok_or_else(bad)
}

/// Our HTTP clients: threads making one request per connection until stopped.
struct HttpLoad {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    threads: Vec<JoinHandle<()>>,
}

impl HttpLoad {
    fn start(addr: SocketAddr, threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let threads = (0..threads)
            .map(|_| {
                let (stop, tally) = (stop.clone(), tally.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let result = http_get(addr);
                        tally.lock().unwrap().record(result);
                    }
                })
            })
            .collect();
        Self {
            stop,
            tally,
            threads,
        }
    }

    fn wait_answers(&self, generation: u32, at_least: u64) {
        wait_until(
            &format!("generation {generation} answers {at_least} requests"),
            TIMEOUT,
            || self.tally.lock().unwrap().of(generation) >= at_least,
        );
    }

    fn stop(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("load thread");
        }
        self.tally.lock().unwrap().clone()
    }
}

/// `reuseportctl register --pid W --all-listeners -g N [--activate]` for each worker.
fn register_workers(env: &TestEnv, workers: &[i32], generation: u32, activate: bool) {
    for w in workers {
        let (pid, generation) = (w.to_string(), generation.to_string());
        let mut args = vec![
            "register",
            "--pid",
            &pid,
            "--all-listeners",
            "-g",
            &generation,
        ];
        if activate {
            args.push("--activate");
        }
        let out = env.ctl(&args);
        assert!(
            out.status.success(),
            "register --pid {pid} should succeed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn nginx_workers_registered_by_pid_flip_and_stop_without_a_failed_request() {
    const NAME: &str = "nginx_workers_registered_by_pid_flip_and_stop_without_a_failed_request";
    const PORT: u16 = 7851;
    for tool in ["nginx", "ab"] {
        if let Some(reason) = tool_missing(tool) {
            return skip(NAME, &reason);
        }
    }
    let env = TestEnv::new(NAME);
    let mut v1 = Nginx::start(&env, PORT, 1);
    let v1_workers = v1.workers(PORT);
    register_workers(&env, &v1_workers, 1, true);
    let s = env.status(PORT);
    let g1 = generation_status(&s, 1);
    let mut pids: Vec<i32> = g1.sockets.iter().map(|s| s.pid).collect();
    pids.sort_unstable();
    assert_eq!(
        pids, v1_workers,
        "generation 1 should hold one socket per worker, shown with the worker's pid: {s:?}"
    );
    assert_eq!(s.active, Some(1));

    let ours = HttpLoad::start(local(PORT), 2);
    let ab = ApacheBench::start(local(PORT), 4);
    ours.wait_answers(1, ANSWERS);

    let mut v2 = Nginx::start(&env, PORT, 2);
    let v2_workers = v2.workers(PORT);
    register_workers(&env, &v2_workers, 2, false);
    let before = ours.tally.lock().unwrap().of(2);
    assert_eq!(before, 0, "a standby generation should get no connection");

    let out = env.ctl(&["activate", &local(PORT).to_string(), "2"]);
    assert!(out.status.success(), "activate: {out:?}");
    ours.wait_answers(2, ANSWERS);

    v1.quit();
    wait_until(
        "generation 1's registrations end with its workers",
        TIMEOUT,
        || {
            env.status(PORT)
                .generations
                .iter()
                .all(|g| g.generation == 2)
        },
    );
    let after_quit = ours.tally.lock().unwrap().of(2);
    ours.wait_answers(2, after_quit + ANSWERS);
    let ab = ab.stop();
    let t = ours.stop();
    println!("{NAME}: our client: {t}; {ab}");
    assert_eq!(t.failed, 0, "our client: no request may fail: {t}");
    assert!(
        ab.complete > 0 && ab.failures() == 0,
        "ApacheBench: no request may fail: {ab}"
    );
    drop(v2);
    wait_until(
        "generation 2's registrations end when nginx stops",
        TIMEOUT,
        || env.try_status(PORT).is_none(),
    );
}

#[test]
fn register_pid_refuses_a_process_without_a_reuseport_listener() {
    const NAME: &str = "register_pid_refuses_a_process_without_a_reuseport_listener";
    let env = TestEnv::new(NAME);
    // This test process holds the agent's connections but no listener.
    let me = std::process::id().to_string();
    let out = env.ctl(&["register", "--pid", &me, "--all-listeners", "-g", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "register should fail: {stderr}");
    assert!(
        stderr.contains("no listening TCP socket with SO_REUSEPORT") && stderr.lines().count() == 1,
        "the error should be one line saying what is missing: {stderr}"
    );

    // Another user may not take root's sockets: one line, before anything is asked of the
    // agent or the kernel.
    let ctl = env.dir().join("reuseportctl-for-nobody");
    std::fs::copy(bin_path("reuseportctl"), &ctl).expect("copy reuseportctl");
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut cmd = Command::new(&ctl);
    cmd.args(["--control", &env.control_path().display().to_string()])
        .args(["register", "--pid", &me, "--all-listeners", "-g", "1"]);
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run reuseportctl as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "register as nobody should fail: {stderr}"
    );
    assert!(
        stderr.contains("permission denied")
            && stderr.contains("needs root or its owner")
            && stderr.lines().count() == 1,
        "the error should be one line saying who may do it: {stderr}"
    );
}

/// The uid and gid of `nobody`.
const NOBODY: u32 = 65534;

/// Set in [`plain_reuseport_server`] processes: `PORT GENERATION MARKER_FILE`.
const PLAIN_SERVER_ENV: &str = "REUSEPORT_TEST_PLAIN_SERVER";
const PLAIN_SERVER_TEST: &str = "tests::running_servers::plain_reuseport_server";

/// A running server that binds its own SO_REUSEPORT listener, killed when dropped.
struct PlainServer {
    child: Child,
    /// The listener's descriptor number in the server.
    fd: i32,
}

impl PlainServer {
    fn start(env: &TestEnv, port: u16, generation: u32) -> Self {
        let marker = env.dir().join(format!("plain-{generation}.fd"));
        let child = Command::new(std::env::current_exe().expect("current_exe"))
            .args(helper_args(PLAIN_SERVER_TEST))
            .env(
                PLAIN_SERVER_ENV,
                format!("{port} {generation} {}", marker.display()),
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("start the server");
        let mut server = Self { child, fd: -1 };
        wait_until(
            &format!("the server of generation {generation} listens"),
            TIMEOUT,
            || {
                server.assert_running();
                std::fs::read_to_string(&marker)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .map(|fd| server.fd = fd)
                    .is_some()
            },
        );
        server
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("the server exited early: {status}");
        }
    }
}

impl Drop for PlainServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `register --pid P --fd N --activate --wait` holds a running server's listener in the
/// foreground: the generation is active with P as its server and answers every request, and
/// the command ends by itself when P exits, leaving nothing registered. A descriptor that is
/// not a listener gets one line saying so.
#[test]
fn register_pid_fd_wait_holds_a_servers_listener_until_it_exits() {
    const NAME: &str = "register_pid_fd_wait_holds_a_servers_listener_until_it_exits";
    const PORT: u16 = 7851;
    let env = TestEnv::new(NAME);
    let mut server = PlainServer::start(&env, PORT, 1);
    let (pid, fd) = (server.pid().to_string(), server.fd.to_string());

    // fd 0 of the server is /dev/null, not a socket.
    let out = env.ctl(&["register", "--pid", &pid, "--fd", "0", "-g", "1", "--wait"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{NAME}: fd 0: {}", stderr.trim_end());
    assert!(
        !out.status.success() && stderr.lines().count() == 1 && stderr.contains("fd 0"),
        "a descriptor that is not a listener should get one line naming it: {stderr}"
    );

    let mut holder = env
        .ctl_command()
        .args(["register", "--pid", &pid, "--fd", &fd, "-g", "1"])
        .args(["--activate", "--wait", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start reuseportctl register --wait");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("read what register printed");
    let registered: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("register --json should print JSON ({e}): {line:?}"));
    assert_eq!(
        (
            registered["generation"].as_u64(),
            registered["state"].as_str(),
            registered["pid"].as_i64()
        ),
        (Some(1), Some("active"), Some(i64::from(server.pid()))),
        "register --json should describe the registration: {registered}"
    );
    wait_until("generation 1 is active", TIMEOUT, || {
        server.assert_running();
        assert!(
            holder.try_wait().expect("try_wait").is_none(),
            "register --wait should hold the registration while the server runs"
        );
        env.try_status(PORT).is_some_and(|s| s.active == Some(1))
    });
    let status = env.status(PORT);
    let pids: Vec<i32> = generation_status(&status, 1)
        .sockets
        .iter()
        .map(|s| s.pid)
        .collect();
    assert_eq!(
        pids,
        [server.pid()],
        "status should show the server as the socket's process: {status:?}"
    );
    let mut t = Tally::default();
    for n in 0..20 {
        t.record(request_once(local(PORT), n));
    }
    assert_eq!(
        (t.failed, t.of(1)),
        (0, 20),
        "the server should answer every request: {t}"
    );

    drop(server);
    wait_until(
        "register --wait ends once the server has exited",
        TIMEOUT,
        || holder.try_wait().expect("try_wait").is_some(),
    );
    assert!(
        env.try_status(PORT)
            .is_none_or(|s| s.generations.is_empty()),
        "nothing of the exited server may stay registered: {:?}",
        env.try_status(PORT)
    );
}

/// Not a test: a server that knows nothing of reuseport but SO_REUSEPORT (as nginx with
/// `reuseport`): binds its own listener, writes its descriptor number to the marker file and
/// answers `req N` with `gen G N+1` until it is killed.
#[test]
#[ignore = "helper: entry point of the servers that bind their own listener"]
fn plain_reuseport_server() {
    let Ok(spec) = std::env::var(PLAIN_SERVER_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, ' ');
    let (port, generation, marker) = (
        parts.next().and_then(|p| p.parse().ok()).expect("PORT"),
        parts
            .next()
            .and_then(|g| g.parse().ok())
            .expect("GENERATION"),
        parts.next().expect("MARKER_FILE"),
    );
    let listener =
        reuseport_client::reuseport_listener(local(port)).expect("bind the reuseport listener");
    std::fs::write(marker, listener.as_raw_fd().to_string()).expect("write the marker");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || serve_slowly(stream, generation));
    }
}
