//! `reuseportctl drain`: stop sending new connections to a generation.

use std::process::ExitCode;

use clap::Args;

use super::{GlobalOpts, output};
use reuseport_client::{ControlClient, proto::GroupAddr};

/// Stop sending new connections to a generation.
#[derive(Debug, Args)]
#[command(long_about = "Stop sending new connections to a generation.\n\n\
    The generation keeps its listeners and established connections; servers started with \
    `reuseportctl exec --on-drain SIGNAL` get SIGNAL. To replace the active generation, \
    `activate` the new one instead: it drains the old one in the same step.")]
pub struct DrainArgs {
    /// The group: IP:PORT or tcp://IP:PORT[@NETNS].
    #[arg(value_name = "GROUP")]
    pub group: GroupAddr,
    /// The generation to drain.
    #[arg(value_name = "GEN")]
    pub generation: u32,
    /// Print the group after the change as JSON (the protocol's GroupStatus).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(global: &GlobalOpts, args: DrainArgs) -> anyhow::Result<ExitCode> {
    let mut client = ControlClient::connect(&global.control).await?;
    let groups = client.drain_all(args.group, args.generation).await?;
    output::print_changes(&groups, args.generation, args.json)?;
    Ok(ExitCode::SUCCESS)
}
