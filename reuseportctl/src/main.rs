//! The operator CLI, `reuseportctl`: one module per subcommand.
//!
//! Errors are printed as one line, `reuseportctl: <message>: <cause>: …`, and make the
//! process exit with the status of their kind ([`exit`]).

use std::{path::PathBuf, process::ExitCode};

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};

pub mod activate;
mod args;
mod check;
pub mod drain;
mod draining;
mod events;
pub mod exec;
mod exit;
mod launch;
mod listeners;
mod manual;
mod output;
mod reaper;
pub mod register;
pub mod restart;
pub mod rollback;
mod spawn;
pub mod status;
pub mod supervise;
pub mod version;

#[derive(Debug, Parser)]
#[command(
    name = "reuseportctl",
    version,
    about = "Operate reuseport groups: show them, switch the active generation, launch servers.",
    long_about = "Operate reuseport groups through reuseport-agent.\n\n\
        A group is every listener on one address (SO_REUSEPORT); each listener belongs to a \
        generation (one deploy of a server). New connections go to the active generation only; \
        the others drain. `activate` switches generations without refusing a connection, \
        `exec` starts a server of any language on a registered listener, and `supervise` \
        replaces generations of a server on SIGHUP (like start_server).",
    after_long_help = exit::HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Clone, Debug, Args)]
pub struct GlobalOpts {
    /// The agent's control socket.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "REUSEPORT_CONTROL",
        default_value = reuseport_client::DEFAULT_CONTROL_PATH
    )]
    pub control: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Status(status::StatusArgs),
    Activate(activate::ActivateArgs),
    Drain(drain::DrainArgs),
    Rollback(rollback::RollbackArgs),
    Restart(restart::RestartArgs),
    Exec(exec::ExecArgs),
    Supervise(supervise::SuperviseArgs),
    Register(register::RegisterArgs),
    Version(version::VersionArgs),
    Completions(manual::CompletionsArgs),
    #[command(hide = true)]
    ManPages(manual::ManPagesArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A bad value (e.g. an address) is a one-line error like every other; help,
        // version and usage mistakes keep clap's own output.
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ValueValidation | ErrorKind::InvalidValue
            ) =>
        {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or_default();
            report(first.strip_prefix("error: ").unwrap_or(first));
            return ExitCode::from(exit::USAGE);
        }
        Err(e) => e.exit(),
    };
    // NB: current-thread on purpose: `exec` and `supervise` fork, and the child's parent-death signal
    // (PR_SET_PDEATHSIG) follows the thread that forked, which must be the one that lives
    // as long as the launcher: the main thread.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            report(&format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let code = exit::code_of(&e);
            if events::json() {
                // NB: the launchers' errors under --json: the last event of the stream.
                events::Event::Error {
                    message: one_line(&e),
                    exit_status: code,
                }
                .report_json_only();
            } else {
                report(&one_line(&e));
            }
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Status(args) => status::run(&cli.global, args).await,
        Command::Activate(args) => activate::run(&cli.global, args).await,
        Command::Drain(args) => drain::run(&cli.global, args).await,
        Command::Rollback(args) => rollback::run(&cli.global, args).await,
        Command::Restart(args) => restart::run(&cli.global, args).await,
        Command::Exec(args) => exec::run(&cli.global, args).await,
        Command::Supervise(args) => supervise::run(&cli.global, args).await,
        Command::Register(args) => register::run(&cli.global, args).await,
        Command::Version(args) => version::run(&cli.global, args).await,
        Command::Completions(args) => manual::completions(&args),
        Command::ManPages(args) => manual::man_pages(&args),
    }
}

/// Prints an error line; a closed stderr is not worth a panic on the way out.
fn report(message: &str) {
    use std::io::Write as _;
    // NB: errors quote the agent, whose messages may carry another user's text.
    let _ = writeln!(
        std::io::stderr(),
        "reuseportctl: {}",
        reuseport_client::proto::text::escape(message)
    );
}

/// The error and its causes on one line, joined by ": ". A cause whose text the previous
/// message already contains is left out: some errors print their source themselves.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    let mut last = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || last.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
        last = text;
    }
    line
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn control_is_accepted_before_and_after_the_subcommand() {
        let cli = Cli::try_parse_from(["reuseportctl", "--control", "/a", "status"]).unwrap();
        assert_eq!(cli.global.control, PathBuf::from("/a"));
        let cli = Cli::try_parse_from(["reuseportctl", "status", "--control", "/b"]).unwrap();
        assert_eq!(cli.global.control, PathBuf::from("/b"));
    }

    #[test]
    fn errors_fit_on_one_line_without_repeats() {
        let io = std::io::Error::other("connection reset");
        let err = anyhow::Error::new(io).context("control connection: connection reset");
        assert_eq!(one_line(&err), "control connection: connection reset");
        let err = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(one_line(&err), "outer: middle: inner");
    }
}
