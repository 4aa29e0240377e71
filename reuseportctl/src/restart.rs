//! `reuseportctl restart`: have the `reuseportctl supervise` of a group deploy its next
//! generation, as SIGHUP to it would, and wait until that generation is active.

use std::{process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::Args;

use super::{GlobalOpts, args::parse_duration, exit::TimedOut, output};
use reuseport_client::{
    ControlClient,
    proto::{GroupAddr, RestartOutcome},
};

/// Start the next generation of a supervised group (like SIGHUP to its supervisor) and
/// wait until it is active.
#[derive(Debug, Args)]
#[command(
    long_about = "Start the next generation of a supervised group and wait until it is \
    active.\n\n\
    The agent forwards the request to the `reuseportctl supervise` that manages GROUP, which \
    restarts exactly as on SIGHUP: COMMAND starts as a new standby generation, becomes active \
    once ready, and the previous generation drains. This command returns when the new \
    generation is active (exit 0), or prints why it did not take over (exit 1; the previous \
    generation then stays active); exit 124 if no outcome came within --timeout. A group \
    whose servers were started another way has no supervisor to ask: restart those by hand \
    (exec + activate)."
)]
pub struct RestartArgs {
    /// The group: IP:PORT or tcp://IP:PORT[@NETNS].
    #[arg(value_name = "GROUP")]
    pub group: GroupAddr,
    /// Give up waiting after this long (the restart itself goes on).
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print the outcome as JSON: `group`, `supervisor` (its pid) and `outcome` (the
    /// protocol's RestartOutcome); the exit status is the same as without.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(global: &GlobalOpts, args: RestartArgs) -> anyhow::Result<ExitCode> {
    let mut client = ControlClient::connect(&global.control).await?;
    let (id, supervisor) = client.restart(args.group).await?;
    let outcome = tokio::time::timeout(args.timeout, client.restart_outcome(id))
        .await
        .map_err(|_| {
            TimedOut(format!(
                "no outcome from the supervisor (pid {supervisor}) within {:?}: the restart may \
                 still finish; see the supervisor's log and `reuseportctl status {}`",
                args.timeout, args.group
            ))
        })?
        .context("waiting for the restart's outcome")?;
    if args.json {
        output::print_json(&serde_json::json!({
            "group": args.group.to_string(),
            "supervisor": supervisor,
            "outcome": outcome,
        }))?;
    }
    match outcome {
        RestartOutcome::Active { .. } if args.json => Ok(ExitCode::SUCCESS),
        RestartOutcome::Active { generation } => {
            output::print(&format!(
                "{}: generation {generation} is active (started by the supervisor, pid \
                 {supervisor})\n",
                args.group
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        RestartOutcome::Failed { error } => bail!("restart of {} failed: {error}", args.group),
    }
}
