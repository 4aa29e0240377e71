//! `reuseportctl exec`: the language-agnostic launcher. It binds and registers the
//! listeners, hands them to the server as fds 3, 4, … (systemd socket activation and
//! Server::Starter conventions), keeps the registrations open while the server runs and
//! exits with the server's status.

use std::{ffi::OsString, process::ExitCode};

use anyhow::Context as _;
use clap::Args;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::Instant,
};

use super::{
    GlobalOpts,
    args::{parse_name, parse_signal},
    draining::{Drain, DrainOpts, DrainTask},
    events::{self, Event, Phase, warn},
    launch::{self, DEFAULT_FD_NAME},
    listeners::{Listen, Registrations, check_listens, fd_names, parse_listen},
    reaper::Reaper,
    spawn::{self, FORWARDED_SIGNALS},
};
use reuseport_client::proto::GenState;

/// Run a server on registered SO_REUSEPORT listeners passed as fds 3, 4, ….
#[derive(Debug, Args)]
#[command(
    long_about = "Run a server on registered SO_REUSEPORT listeners passed as fds 3, 4, ….\n\n\
        For servers that can take listening sockets from their parent (systemd socket \
        activation, Server::Starter, or a plain `fd 3` option) and do not link the client \
        library. The launcher:\n\
        \n  1. creates a TCP listener with SO_REUSEPORT on each --listen ADDR:PORT (each its \
        own group) and registers it with the agent as a socket of generation N;\
        \n  2. starts COMMAND with the listeners as fds 3, 4, … in --listen order and \
        LISTEN_FDS=<how many>, LISTEN_PID=<its pid>, LISTEN_FDNAMES=<one name per listener: \
        its NAME=, else --name, else \"reuseport\"; joined with ':'>, \
        SERVER_STARTER_PORT=<ADDR:PORT>=3[;<ADDR:PORT>=4…] (IPv6 as [::1]:8080=3);\
        \n  3. closes its own copies of the listeners, so each lives exactly as long as \
        the server keeps it;\
        \n  4. stays alive while COMMAND runs, keeping the registration open, and forwards \
        SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to it;\
        \n  5. with --on-drain, once the generation drains in every group: waits until it is idle (no \
        connection in flight, empty accept queue; at most --drain-timeout), sends SIGNAL, \
        and SIGKILL if COMMAND still runs --kill-timeout later;\
        \n  6. exits with COMMAND's exit status, or 128+N if signal N killed it.\n\n\
        COMMAND runs in its own session (Ctrl-C in a terminal reaches it once, through the \
        launcher) and gets SIGTERM if the launcher itself dies.",
    after_long_help = "Exit status: COMMAND's status; 127 if COMMAND was not found, 126 if \
        it could not be executed; before COMMAND starts, the statuses of `reuseportctl \
        --help` (3: the agent is not running, 4: permission denied, 6: refused, 1: any other \
        failure).\n\n\
        Example, a blue/green deploy:\n\
        \x20 reuseportctl exec --listen 0.0.0.0:8080 --generation 1 --activate --on-drain TERM -- ./server-v1\n\
        \x20 reuseportctl exec --listen 0.0.0.0:8080 --generation 2 --on-drain TERM -- ./server-v2\n\
        \x20 reuseportctl activate 0.0.0.0:8080 2   # v1 drains and gets SIGTERM\n\n\
        Several listeners (fd 3 and fd 4, LISTEN_FDNAMES=http:admin):\n\
        \x20 reuseportctl exec --listen http=0.0.0.0:8080 --listen admin=127.0.0.1:9090 -g 1 --activate -- ./server"
)]
pub struct ExecArgs {
    /// Address to listen on, the group's address: IP:PORT or tcp://IP:PORT (IPv6 in
    /// brackets, e.g. [::]:443), optionally with the listener's LISTEN_FDNAMES entry before
    /// it (http=0.0.0.0:80). Repeat it for several listeners: fds 3, 4, … in this order.
    #[arg(long, value_name = "[NAME=]ADDR:PORT", required = true, value_parser = parse_listen)]
    pub listen: Vec<Listen>,
    /// Generation of this server, e.g. a deploy counter.
    #[arg(long, short = 'g', value_name = "N")]
    pub generation: u32,
    /// Make the generation active as soon as its listeners are registered (the active one
    /// drains): in every group at once, or, if one group refuses, in none (the command then
    /// never runs).
    #[arg(long)]
    pub activate: bool,
    /// Name of the generation, shown by `status` and passed in LISTEN_FDNAMES for every
    /// listener that has no NAME= of its own.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,
    /// Send SIGNAL to COMMAND, once, when its generation drains and is idle (e.g. TERM,
    /// SIGQUIT, 3); SIGKILL follows after --kill-timeout. Without it, COMMAND is left to
    /// exit on its own.
    #[arg(long, value_name = "SIGNAL", value_parser = parse_signal)]
    pub on_drain: Option<Signal>,
    #[command(flatten)]
    pub drain: DrainOpts,
    /// Report what happens as JSON events on stdout, one object per line (started, state,
    /// signalled, killed, exited, warning, error; docs/operations.md). The server's stdout
    /// then goes to stderr.
    #[arg(long)]
    pub json: bool,
    /// The server and its arguments (after `--` if they start with `-`).
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<OsString>,
}

pub async fn run(global: &GlobalOpts, args: ExecArgs) -> anyhow::Result<ExitCode> {
    if args.json {
        events::use_json()?;
    }
    launch(global, args).await.map(ExitCode::from)
}

/// The whole launcher; returns the status to exit with.
async fn launch(global: &GlobalOpts, args: ExecArgs) -> anyhow::Result<u8> {
    // Resolved first: a typo in COMMAND should not touch the agent.
    let program = spawn::resolve_program(&args.command[0], std::env::var_os("PATH").as_deref())?;
    check_listens(&args.listen)?;
    let bound = launch::bind(
        &global.control,
        &args.listen,
        args.generation,
        args.name.clone(),
        args.activate,
    )?;

    let names = fd_names(
        &args.listen,
        args.name.as_deref().unwrap_or(DEFAULT_FD_NAME),
    );
    let listeners: Vec<_> = args
        .listen
        .iter()
        .map(|l| l.group.addr)
        .zip(names)
        .collect();
    let env = spawn::child_env(std::env::vars_os(), &listeners);
    let mut plan = spawn::Plan::new(&program, &args.command, env)
        .context("the command line contains a NUL byte")?;
    // Watched before fork, so that neither an early exit nor an early signal is lost.
    let sigchld = signal(SignalKind::child()).context("cannot watch SIGCHLD")?;
    let mut forwarded = Vec::with_capacity(FORWARDED_SIGNALS.len());
    for sig in FORWARDED_SIGNALS {
        let stream = signal(SignalKind::from_raw(sig as i32))
            .with_context(|| format!("cannot watch {sig}"))?;
        forwarded.push((sig, stream));
    }
    // The server owns the listeners now; a copy kept here would outlive the server.
    let (pid, registration) = bound.register_and_start(&mut plan).await?;
    drop(plan);

    for (sig, mut stream) in forwarded {
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                // ESRCH only when the child is already gone, which the SIGCHLD arm handles.
                let _ = kill(pid, sig);
            }
        });
    }
    let drain = args.on_drain.map(|signal| Drain {
        control: global.control.clone(),
        groups: registration.groups(),
        generation: registration.generation(),
        pid,
        signal,
        opts: args.drain,
    });
    supervise(pid, registration, drain, sigchld).await
}

/// Waits for the child, signalling it when its generation drains, and returns the exit
/// status to exit with. The registration stays open until this returns. As PID 1 or a
/// subreaper, it also reaps the orphans it inherits (see [`Reaper`]).
async fn supervise(
    pid: Pid,
    mut registration: Registrations,
    mut drain: Option<Drain>,
    mut sigchld: tokio::signal::unix::Signal,
) -> anyhow::Result<u8> {
    let mut reaper = Reaper::new();
    reaper.track(pid);
    let mut state = registration.state();
    let mut watching_state = true;
    let generation = registration.generation();
    let mut last = *state.borrow_and_update();
    Event::Started {
        generation,
        pid: pid.as_raw(),
        groups: registration.groups(),
        state: last,
    }
    .report_json_only();
    let mut draining: Option<DrainTask> = None;
    let mut draining_since = None;
    // A socket can join a generation that is already draining.
    on_state(last, &mut drain, &mut draining, &mut draining_since);

    loop {
        tokio::select! {
            _ = sigchld.recv() => {
                if let Some(status) = reaper.try_reap(pid)? {
                    let drained = draining_since.map(|since: Instant| since.elapsed());
                    Event::exited(generation, status, Phase::from(last), drained)
                        .report_json_only();
                    if let Some(code) = launch::exit_code(status) {
                        return Ok(code);
                    }
                }
            }
            changed = state.changed(), if watching_state => match changed {
                Ok(()) => {
                    let now = *state.borrow_and_update();
                    if now != last {
                        last = now;
                        Event::State { generation, state: now }.report_json_only();
                    }
                    on_state(now, &mut drain, &mut draining, &mut draining_since);
                }
                Err(_) => watching_state = false,
            },
            (group, closed) = registration.closed() => {
                let why = match closed {
                    Ok(()) => String::new(),
                    Err(e) => format!(" ({e})"),
                };
                warn(format_args!(
                    "the agent closed the control connection{why}: pid {pid} keeps running, \
                     but its listener is no longer registered in {group}"
                ));
            }
        }
    }
}

/// Once the generation drains: notes since when, and starts the drain sequence (with
/// `--on-drain`).
fn on_state(
    state: GenState,
    drain: &mut Option<Drain>,
    draining: &mut Option<DrainTask>,
    since: &mut Option<Instant>,
) {
    if state != GenState::Draining {
        return;
    }
    since.get_or_insert_with(Instant::now);
    if let Some(d) = drain.take() {
        *draining = Some(d.start());
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use super::*;
    use reuseport_client::{
        self as client,
        proto::{GenState, GroupAddr, Op, Register, Reply, Request, frame::Conn},
    };

    /// A directory of its own for a test's control socket and files.
    fn tempdir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("reuseportctl-exec-{tag}-"))
            .tempdir()
            .expect("create temp dir")
    }

    async fn wait_for_line(path: &Path, line: &str) {
        for _ in 0..500 {
            if std::fs::read_to_string(path).is_ok_and(|s| s.lines().any(|l| l == line)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "child should write {line:?} to {} within 5 s",
            path.display()
        );
    }

    /// The launcher against a fake agent: the child gets the listener as fd 3 and the
    /// activation variables, the drain signal arrives once the pushed state is draining,
    /// and the launcher exits with the child's status and then closes the registration.
    ///
    /// NB: tokio's handlers for the forwarded signals stay installed in the test process
    /// afterwards (tokio never uninstalls them), so Ctrl-C no longer stops this test binary.
    #[tokio::test]
    async fn launcher_hands_over_the_listener_and_signals_on_drain() {
        let dir = tempdir("drain");
        let control = dir.path().join("agent.sock");
        let out = dir.path().join("out");
        // A free port, kept bound (with SO_REUSEPORT) so no one else takes it meanwhile.
        let probe = client::reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let group: GroupAddr = format!("tcp://{}", probe.local_addr().unwrap())
            .parse()
            .unwrap();

        let agent_listener = tokio::net::UnixListener::bind(&control).expect("bind control");
        let agent_out = out.clone();
        let agent = tokio::spawn(async move {
            let (stream, _) = agent_listener.accept().await.expect("accept");
            let mut conn = Conn::new(stream);
            let (req, fds) = conn.recv_msg::<Request>().await.unwrap().unwrap();
            let Op::Register(Register {
                group: g,
                generation: 5,
                name,
                activate: true,
                ..
            }) = req.op
            else {
                panic!("expected a register of generation 5 with activate: {req:?}");
            };
            assert_eq!(name.as_deref(), Some("web"));
            assert_eq!(
                fds.len(),
                1,
                "the listener should come with the register request"
            );
            drop(fds);
            let state = |state| Reply::State {
                group: g,
                generation: 5,
                state,
            };
            let reply = Reply::Registered {
                group: g,
                generation: 5,
                slot: 0,
                state: GenState::Active,
            };
            conn.send(&reply, None).await.unwrap();
            wait_for_line(&agent_out, "ready").await;
            conn.send(&state(GenState::Draining), None).await.unwrap();
            let end = tokio::time::timeout(Duration::from_secs(5), conn.recv()).await;
            assert!(
                matches!(end, Ok(Ok(None))),
                "the launcher should close the registration after the child exited: {end:?}"
            );
        });

        let script = r#"
            echo "$LISTEN_PID $$ $LISTEN_FDS $LISTEN_FDNAMES $SERVER_STARTER_PORT" > "$0"
            [ -S /proc/self/fd/3 ] && echo socket >> "$0"
            trap 'echo drained >> "$0"; exit 7' TERM
            echo ready >> "$0"
            while :; do sleep 0.01; done
        "#;
        let args = ExecArgs {
            listen: vec![Listen { name: None, group }],
            generation: 5,
            activate: true,
            name: Some("web".into()),
            on_drain: Some(Signal::SIGTERM),
            drain: DrainOpts {
                immediate_signal: true,
                ..DrainOpts::default()
            },
            json: false,
            command: ["sh", "-c", script, out.to_str().unwrap()]
                .map(OsString::from)
                .to_vec(),
        };
        let global = GlobalOpts { control };
        let status = tokio::time::timeout(Duration::from_secs(10), launch(&global, args))
            .await
            .expect("the child should exit within 10 s of the drain")
            .expect("launcher");
        agent.await.unwrap();
        assert_eq!(
            status, 7,
            "the launcher should exit with the child's status"
        );

        let out = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        let vars: Vec<&str> = lines[0].split(' ').collect();
        assert_eq!(
            vars[0], vars[1],
            "LISTEN_PID should be the child's pid: {out}"
        );
        assert_eq!(
            vars[2..],
            ["1", "web", &format!("{}=3", group.addr)],
            "{out}"
        );
        assert_eq!(lines[1..], ["socket", "ready", "drained"], "{out}");
    }

    #[tokio::test]
    async fn missing_command_fails_before_the_agent_is_asked() {
        let dir = tempdir("missing");
        let args = ExecArgs {
            listen: vec![parse_listen("127.0.0.1:9").unwrap()],
            generation: 1,
            activate: false,
            name: None,
            on_drain: None,
            drain: DrainOpts::default(),
            json: false,
            command: vec!["no-such-command-anywhere".into()],
        };
        // No agent listens on this path: the error must still be about the command.
        let global = GlobalOpts {
            control: dir.path().join("agent.sock"),
        };
        let err = launch(&global, args).await.unwrap_err();
        let spawn_err = err
            .downcast_ref::<spawn::SpawnError>()
            .expect("a SpawnError");
        assert_eq!(spawn_err.exit_code(), 127);
    }
}
