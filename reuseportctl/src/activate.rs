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
    error names the group that refused); one line per group is printed.\n\n    --weight P (1-99) sends P % of new connections to GEN and the rest to the active     generation, which stays active: a canary. Both show as active with their weights in     `status`. A later `activate GEN` (or --weight 100) gives GEN everything and drains the     other; `activate` of the other one, or `rollback`, takes the canary back. The share is     P % rounded to whole entries of the steering table (README, \"Steering policy\")."
)]
pub struct ActivateArgs {
    /// The group: IP:PORT or tcp://IP:PORT[@NETNS].
    #[arg(value_name = "GROUP")]
    pub group: GroupAddr,
    /// The generation to activate; it must have a registered socket.
    #[arg(value_name = "GEN")]
    pub generation: u32,
    /// Percent of new connections for GEN (1-100); below 100 the active generation keeps
    /// the rest.
    #[arg(long, value_name = "P", default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub weight: u8,
    /// Print the group after the change as JSON (the protocol's GroupStatus).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(global: &GlobalOpts, args: ActivateArgs) -> anyhow::Result<ExitCode> {
    let mut client = ControlClient::connect(&global.control).await?;
    let groups = if args.weight == 100 {
        client.activate_all(args.group, args.generation).await?
    } else {
        client
            .split_all(args.group, args.generation, args.weight)
            .await?
    };
    output::print_changes(&groups, args.generation, args.json)?;
    Ok(ExitCode::SUCCESS)
}
