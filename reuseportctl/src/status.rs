//! `reuseportctl status`: the groups, their generations, counters and live figures; also
//! as a check for monitoring (`--check`) and redrawn in place (`--watch`).

use std::{process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Args;

use super::{GlobalOpts, args::parse_duration, check, output};
use reuseport_client::{ControlClient, proto::GroupAddr};

/// Show groups, their generations, sockets, counters and live connections.
#[derive(Debug, Args)]
#[command(
    long_about = "Show groups, their generations, sockets, counters and live connections.\n\n\
    Per group: its address, the program mode (select-or-migrate on 5.14+ kernels), the active \
    generation, a FALLING BACK marker when no active socket is left, the connections no \
    registered socket could take (unsteered), and the connections on its address now. Per \
    generation: its state (a draining one says whether it is still serving N connections, \
    idle, signalled or killed), sockets (with the ones their process already closed), owning \
    pids, socket-array slots, LIVE (connections its processes hold, connections queued in \
    its listeners / their backlog, and connection attempts its listeners dropped since they \
    registered), and the connections it received as the active generation (SELECTED), as a \
    fallback (FALLBACK) and from a closing listener's queue (MIGRATED). The live figures are \
    read from the kernel (sock_diag) for each answer.",
    after_long_help = "Exit status: 0; 3 if the agent is not running, 4 if it may not be \
    asked, 5 if GROUP is unknown (see `reuseportctl --help`). With --check: 0 when \
    every group has an active generation with a listening socket, its last restart did not \
    fail and no listener's accept queue overflowed since it registered; 2 otherwise, with one \
    line per problem on stdout."
)]
pub struct StatusArgs {
    /// Only this group: IP:PORT or tcp://IP:PORT[@NETNS].
    #[arg(value_name = "GROUP")]
    pub group: Option<GroupAddr>,
    /// Print the groups as JSON (the protocol's GroupStatus list) for scripts; with
    /// --watch, one compact JSON line per refresh.
    #[arg(long)]
    pub json: bool,
    /// For monitoring: print one line per problem and exit 2 if there is any (see below).
    #[arg(long, conflicts_with_all = ["json", "watch"])]
    pub check: bool,
    /// Redraw the table in place every DUR (default 1s) until interrupted.
    #[arg(
        long,
        value_name = "DUR",
        num_args = 0..=1,
        default_missing_value = "1s",
        value_parser = parse_duration
    )]
    pub watch: Option<Duration>,
}

pub async fn run(global: &GlobalOpts, args: StatusArgs) -> anyhow::Result<ExitCode> {
    if let Some(every) = args.watch {
        return watch(global, &args, every).await;
    }
    let mut client = ControlClient::connect(&global.control).await?;
    let groups = client.status(args.group).await?;
    if args.check {
        let problems = check::problems(&groups);
        if problems.is_empty() {
            output::print(&format!(
                "ok: {} group(s), each with an active generation that listens\n",
                groups.len()
            ))?;
            return Ok(ExitCode::SUCCESS);
        }
        output::print(&format!("{}\n", problems.join("\n")))?;
        return Ok(ExitCode::from(check::PROBLEMS_EXIT));
    }
    if args.json {
        let json = serde_json::to_string_pretty(&groups).context("cannot encode the status")?;
        output::print(&format!("{json}\n"))?;
    } else {
        output::print(&output::status_table(&groups))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks again every `every`; the agent going away is shown, not fatal: the next refresh
/// reconnects.
async fn watch(
    global: &GlobalOpts,
    args: &StatusArgs,
    every: Duration,
) -> anyhow::Result<ExitCode> {
    let mut client: Option<ControlClient> = None;
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let answer = async {
            let c = match &mut client {
                Some(c) => c,
                None => client.insert(ControlClient::connect(&global.control).await?),
            };
            c.status(args.group).await
        }
        .await;
        if answer.is_err() {
            client = None;
        }
        let frame = match (&answer, args.json) {
            (Ok(groups), true) => {
                format!(
                    "{}\n",
                    serde_json::to_string(groups).context("cannot encode the status")?
                )
            }
            (Ok(groups), false) => redraw(&format!(
                "every {every:?}\n\n{}",
                output::status_table(groups)
            )),
            (Err(e), true) => {
                // Scripts read stdout; the reason goes where errors go.
                super::report(&e.to_string());
                continue;
            }
            (Err(e), false) => redraw(&format!("every {every:?}\n\nreuseportctl: {e}\n")),
        };
        output::print(&frame)?;
    }
}

/// `text` drawn over the previous frame: cursor home, each line cleared to its end, the rest
/// of the screen cleared.
fn redraw(text: &str) -> String {
    let mut out = String::from("\x1b[H");
    for line in text.lines() {
        out.push_str(line);
        out.push_str("\x1b[K\n");
    }
    out.push_str("\x1b[J");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_overwrites_the_previous_one() {
        let frame = redraw("a\nbb\n");
        assert_eq!(frame, "\x1b[Ha\x1b[K\nbb\x1b[K\n\x1b[J");
    }
}
