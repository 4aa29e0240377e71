//! `reuseportctl activate`: switch a group's active generation.

use std::process::ExitCode;

use clap::Args;

use super::{GlobalOpts, output};
use reuseport_client::{ControlClient, proto::GroupAddr};

/// Make a generation the active one; the previously active generation drains.
#[derive(Debug, Args)]
#[command(
    long_about = "Make a generation the active one; the previously active generation \
    drains.\n\n\
    From the moment the agent answers, every new connection goes to GEN's sockets. The \
    draining generation keeps its listeners and established connections; with a 5.14+ kernel \
    (select-or-migrate), connections still queued on a listener it closes move to GEN.\n\n\
    A generation of a server with several listeners (exec or supervise with several \
    --listen) spans their groups: it is activated in all of them at once, or in none (the \
    error names the group that refused); one line per group is printed."
)]
pub struct ActivateArgs {
    /// The group: IP:PORT or tcp://IP:PORT[@NETNS].
    #[arg(value_name = "GROUP")]
    pub group: GroupAddr,
    /// The generation to activate; it must have a registered socket.
    #[arg(value_name = "GEN")]
    pub generation: u32,
    /// Print the group after the change as JSON (the protocol's GroupStatus).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(global: &GlobalOpts, args: ActivateArgs) -> anyhow::Result<ExitCode> {
    let mut client = ControlClient::connect(&global.control).await?;
    let groups = client.activate_all(args.group, args.generation).await?;
    output::print_changes(&groups, args.generation, args.json)?;
    Ok(ExitCode::SUCCESS)
}
