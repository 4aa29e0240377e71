//! `reuseportctl rollback`: bring the previous generation back.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use super::{GlobalOpts, output};
use reuseport_client::{ControlClient, proto::GroupAddr};

/// Make the newest draining generation that still listens the active one again.
#[derive(Debug, Args)]
#[command(
    long_about = "Make the newest draining generation that still listens the active one \
    again; the active generation drains.\n\n\
    One flip, exactly as `activate GROUP GEN` of that generation: from the moment the agent \
    answers, every new connection goes to it. \"Newest\" is the highest generation number; \
    \"still listens\" means at least one of its listeners is open, in every group the \
    generation spans (all of them switch, or none).\n\n\
    Refused (exit status 6) when no draining generation listens any more: a generation whose \
    server closed its listener or exited cannot take connections again."
)]
pub struct RollbackArgs {
    /// The group: IP:PORT or tcp://IP:PORT[@NETNS].
    #[arg(value_name = "GROUP")]
    pub group: GroupAddr,
    /// Print the group after the change as JSON (the protocol's GroupStatus).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(global: &GlobalOpts, args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let mut client = ControlClient::connect(&global.control).await?;
    let groups = client.rollback_all(args.group).await?;
    let generation = groups[0]
        .active
        .context("the agent's answer to rollback names no active generation")?;
    output::print_changes(&groups, generation, args.json)?;
    Ok(ExitCode::SUCCESS)
}
