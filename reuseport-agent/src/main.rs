//! `reuseport-agent`: the daemon that steers SO_REUSEPORT groups (see the README). It owns
//! the kernel program of every group it manages and answers the control protocol.
//!
//! - [`agent`]: the state, and the requests that look groups up and change them.
//! - [`group`]: one managed group; it keeps its own rules (slots from [`slots`], record
//!   before table, table before attach, undo on failure); [`registry`]: its generations,
//!   states and slots, and the table the program follows.
//! - [`kernel`]: a group's program and maps, their pins, and the atomic table flip;
//!   [`grace`]: RCU grace periods before a retired table or slot is reused; [`sys`]: the
//!   sockarray syscalls aya does not wrap; [`bpffs`]: the bpffs directory and its lock.
//! - [`pinned`]: the record pinned with a group's maps; [`adopt`]: taking over pinned
//!   groups at start.
//! - [`register`]: a socket joins its group; [`creation`]: a new group's turn to load;
//!   [`lineage`]: which pid a launcher may name as its server; [`sockcheck`]: what a
//!   registered socket must be.
//! - [`scan`]: the periodic scan for closed listeners; [`wake`]: the wake-ups it hands out
//!   for connections migrated to a listener without a wake-up.
//! - [`restart`]: `restart` requests relayed to a group's supervisor and back; [`drain`]:
//!   what launchers report of a drain.
//! - [`server`]: the control socket's connections; [`admission`]: their bounds (count,
//!   time, size); [`quota`]: how much of the agent one user may take, and root's reserve;
//!   [`mailbox`]: what is pushed to a connection, bounded however slowly it reads;
//!   [`access`]: who may do what; [`control_socket`]: the socket's file.
//! - [`live`]: live figures for `status` from the kernel ([`diag`]: sock_diag, [`owners`]:
//!   which process holds which connection).
//! - [`notify`]: sd_notify for systemd (`Type=notify`: ready, status, stopping).
//! - [`metrics`]: `/metrics` for Prometheus and a status page (`--metrics-listen`).
//! - [`fault`]: fault-injection points for the tests (a feature of test builds).

mod access;
mod admission;
mod adopt;
mod agent;
mod bpffs;
mod control_socket;
mod creation;
mod diag;
mod drain;
mod fault;
mod grace;
mod group;
mod health;
mod kernel;
mod lineage;
mod live;
mod mailbox;
mod metrics;
mod notify;
mod owners;
mod pinned;
mod quota;
mod register;
mod registry;
mod restart;
mod rollback;
mod scan;
mod server;
mod slots;
mod sockcheck;
mod span;
mod split;
mod sys;
mod wake;

use std::path::PathBuf;

use clap::Parser;
use reuseport_proto::DEFAULT_CONTROL_PATH;

/// Default bpffs directory where the agent pins each group's program and maps.
const DEFAULT_BPFFS_PATH: &str = "/sys/fs/bpf/reuseport";

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Steers new connections of SO_REUSEPORT groups to the active generation"
)]
struct Cli {
    /// Control socket path.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_PATH, env = "REUSEPORT_CONTROL")]
    control: PathBuf,
    /// bpffs directory for the pinned programs and maps (bpffs is mounted if needed).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BPFFS_PATH)]
    bpffs: PathBuf,
    /// Use the select-only program even where select-or-migrate is available (testing the
    /// 4.19–5.13 code path).
    #[arg(long, env = "REUSEPORT_SELECT_ONLY", value_parser = clap::builder::FalseyValueParser::new())]
    select_only: bool,
    /// Do not make wake-up connections after a listener closes (tests use this to see what
    /// the kernel does by itself with migrated connections).
    #[arg(long, hide = true, env = "REUSEPORT_NO_WAKE_UPS", value_parser = clap::builder::FalseyValueParser::new())]
    no_wake_ups: bool,
    /// ABI version written into pinned group records (tests simulate an older agent with it;
    /// 1 pins no record at all, as agents of ABI 1 did).
    #[arg(long, hide = true, env = "REUSEPORT_TEST_PIN_ABI", default_value_t = reuseport_common::ABI_VERSION)]
    pin_abi_version: u32,
    /// Group (name or numeric gid) that owns the control socket; its members may activate and
    /// drain every group. Without it, only root and each group's owner may.
    #[arg(long, value_name = "GROUP", env = "REUSEPORT_CONTROL_GROUP")]
    control_group: Option<String>,
    /// Most groups this agent manages; registering a socket for one more is refused.
    #[arg(long, value_name = "N", default_value_t = agent::DEFAULT_MAX_GROUPS,
          value_parser = clap::value_parser!(u32).range(1..), env = "REUSEPORT_MAX_GROUPS")]
    max_groups: u32,
    /// Most groups one non-root uid may own (default: a quarter of --max-groups). Users
    /// together never take the last sixteenth of --max-groups: it is kept for root.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..),
          env = "REUSEPORT_MAX_GROUPS_PER_UID")]
    max_groups_per_uid: Option<u32>,
    /// Most control connections open at once, registrations included. At the limit the
    /// connection idle the longest is closed; registrations never are.
    #[arg(long, value_name = "N", default_value_t = agent::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..), env = "REUSEPORT_MAX_CONNECTIONS")]
    max_connections: u32,
    /// Most control connections one non-root uid may hold, registrations included
    /// (default: a quarter of --max-connections). Users together never take the last
    /// sixteenth of --max-connections: it is kept for root.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..),
          env = "REUSEPORT_MAX_CONNECTIONS_PER_UID")]
    max_connections_per_uid: Option<u32>,
    /// A `reuseportctl restart` whose supervisor reports no outcome this long after the
    /// agent forwarded it fails (for its requester and in `status`).
    #[arg(long, value_name = "DUR", default_value = "10m", env = "REUSEPORT_RESTART_TIMEOUT",
          value_parser = humantime::parse_duration)]
    restart_timeout: std::time::Duration,
    /// Serve `/metrics` (Prometheus) and a status page at `/` on this address, e.g.
    /// 127.0.0.1:9464. Off without it.
    #[arg(long, value_name = "ADDR:PORT", env = "REUSEPORT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Let --metrics-listen take an address other than loopback: whoever reaches it sees
    /// every group, pid and generation name (there is no authentication).
    #[arg(long, env = "REUSEPORT_METRICS_ALLOW_REMOTE", value_parser = clap::builder::FalseyValueParser::new())]
    metrics_allow_remote: bool,
    /// How log lines look on stderr: `text` for people, `json` for log collectors (one
    /// object per line: timestamp, level, message and fields such as group, generation,
    /// pid; one line per flip, registration and refused request).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text,
          env = "REUSEPORT_LOG_FORMAT")]
    log_format: LogFormat,
    /// Print the man page, reuseport-agent(8), and exit (the package's build runs it).
    #[arg(long, hide = true)]
    man_page: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // NB: flattened: a collector finds `group` and `generation` at the top level, next
        // to `message`, instead of inside a `fields` object.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// One malloc arena for every thread.
///
/// NB: glibc gives each thread that allocates under contention an arena of its own and
/// keeps what is freed there. Requests run on tokio's blocking threads (a hundred and more
/// under load), so every flip, status and registration left memory resident in a different
/// arena: RSS grew to 165 MiB at 64 groups after a few hundred flips. The agent serialises
/// its work on one state lock anyway; one arena costs it nothing measurable.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt before any other thread exists; it only changes allocator policy.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    if cli.man_page {
        return print_man_page();
    }
    init_logging(cli.log_format);
    // NB: a panic with the state lock held would leave a process that answers "internal
    // error" forever; aborting lets it be restarted, and the new agent adopts the pinned
    // groups (steering never stops meanwhile).
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    let log_format = cli.log_format;
    let metrics = match cli
        .metrics_listen
        .map(|a| metrics::Listen::new(a, cli.metrics_allow_remote))
        .transpose()
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("reuseport-agent: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let opts = agent::Options {
        control: cli.control,
        bpffs: cli.bpffs,
        select_only: cli.select_only,
        wake_ups: !cli.no_wake_ups,
        pin_abi: cli.pin_abi_version,
        control_group: cli.control_group,
        max_groups: cli.max_groups,
        groups_per_uid: cli.max_groups_per_uid,
        max_connections: cli.max_connections,
        connections_per_uid: cli.max_connections_per_uid,
        restart_timeout: cli.restart_timeout,
        metrics,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reuseport-agent: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(agent::run(opts)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if log_format == LogFormat::Json => {
            tracing::error!(error = %format!("{e:#}"), "reuseport-agent stopped");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("reuseport-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// reuseport-agent(8), from the CLI definition.
fn print_man_page() -> std::process::ExitCode {
    let man = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).section("8");
    let mut page = Vec::new();
    match man.render(&mut page).and_then(|()| {
        use std::io::Write as _;
        std::io::stdout().write_all(&page)
    }) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reuseport-agent: cannot write the man page: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
