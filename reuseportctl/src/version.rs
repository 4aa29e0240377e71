//! `reuseportctl version`: this CLI's version and protocol, and those of the agent that
//! answers (its version, the ABI of the maps it pins, its mode and kernel).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use serde_json::json;

use super::{GlobalOpts, output};
use reuseport_client::{ControlClient, proto::PROTOCOL_VERSION};

/// Show the versions of this CLI and of the agent.
#[derive(Debug, Args)]
#[command(long_about = "Show the versions of this CLI and of the agent.\n\n\
    The CLI's version and control protocol, then the agent's version, the ABI version of the \
    eBPF maps it pins, its program mode and the kernel it runs on. Without an agent the CLI's \
    line is printed all the same and the exit status is 3.")]
pub struct VersionArgs {
    /// Print one JSON object: `cli` and `agent` (null from an agent too old to say).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(global: &GlobalOpts, args: VersionArgs) -> anyhow::Result<ExitCode> {
    let cli = env!("CARGO_PKG_VERSION");
    if !args.json {
        output::print(&format!(
            "reuseportctl {cli} (protocol {PROTOCOL_VERSION})\n"
        ))?;
    }
    let agent = async {
        let mut client = ControlClient::connect(&global.control).await?;
        client.agent_info().await
    }
    .await
    .context("cannot ask the agent for its version")?;
    if args.json {
        let out = json!({
            "cli": { "version": cli, "protocol": PROTOCOL_VERSION },
            "agent": agent,
        });
        output::print(&format!("{out:#}\n"))?;
    } else {
        output::print(&match agent {
            Some(a) => format!(
                "reuseport-agent {} (ABI {}, {}, kernel {})\n",
                a.version, a.abi, a.mode, a.kernel
            ),
            None => "reuseport-agent: too old to tell its version\n".to_owned(),
        })?;
    }
    Ok(ExitCode::SUCCESS)
}
