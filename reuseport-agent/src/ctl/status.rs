//! `reuseportctl status`: the groups, their generations and counters.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use super::{GlobalOpts, output};
use crate::{addr::GroupAddr, client::ControlClient};

/// Show groups, their generations, sockets and connection counters.
#[derive(Debug, Args)]
#[command(
    long_about = "Show groups, their generations, sockets and connection counters.\n\n\
    Per group: its address, the program mode (select-or-migrate on 5.14+ kernels), the active \
    generation, a FALLING BACK marker when no active socket is left, and the connections no \
    registered socket could take (unsteered). Per generation: its state, sockets (with the \
    ones their process already closed), owning pids, socket-array slots, and the connections \
    it received as the active generation (SELECTED), as a fallback (FALLBACK) and from a \
    closing listener's queue (MIGRATED)."
)]
pub struct StatusArgs {
    /// Only this group: IP:PORT or tcp://IP:PORT[@NETNS].
    #[arg(value_name = "GROUP")]
    pub group: Option<GroupAddr>,
    /// Print the groups as JSON (the protocol's GroupStatus list) for scripts.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(global: &GlobalOpts, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut client = ControlClient::connect(&global.control).await?;
    let groups = client.status(args.group).await?;
    if args.json {
        let json = serde_json::to_string_pretty(&groups).context("cannot encode the status")?;
        output::print(&format!("{json}\n"))?;
    } else {
        output::print(&output::status_table(&groups))?;
    }
    Ok(ExitCode::SUCCESS)
}
