//! Documentation generated from the CLI definition, so it cannot drift from it: shell
//! completions (`reuseportctl completions SHELL`) and the man pages the package installs
//! (`reuseportctl man-pages DIR`, hidden: `cargo xtask package` runs it).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};
use clap_complete::Shell;

use crate::{Cli, output};

/// Print a shell completion script.
#[derive(Debug, Args)]
#[command(long_about = "Print a shell completion script.\n\n\
    The package installs them; by hand: `reuseportctl completions bash > \
    /etc/bash_completion.d/reuseportctl`, `reuseportctl completions zsh > \
    \"${fpath[1]}/_reuseportctl\"`, `reuseportctl completions fish > \
    ~/.config/fish/completions/reuseportctl.fish`.")]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// Write the man pages: reuseportctl(1) and one reuseportctl-VERB(1) per verb.
#[derive(Debug, Args)]
pub struct ManPagesArgs {
    /// The directory to write them into (created if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

pub fn completions(args: &CompletionsArgs) -> anyhow::Result<ExitCode> {
    let shell = match args.shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "reuseportctl", &mut script);
    output::print(&String::from_utf8(script).context("a completion script that is not UTF-8")?)?;
    Ok(ExitCode::SUCCESS)
}

pub fn man_pages(args: &ManPagesArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    // `reuseportctl help VERB` is the VERB page again: no pages of its own.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    // NB: clap_mangen names a subcommand's page `reuseportctl-VERB`, as the units'
    // Documentation= lines refer to them.
    clap_mangen::generate_to(cmd, &args.dir)
        .with_context(|| format!("cannot write the man pages into {}", args.dir.display()))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_visible_verb_has_a_man_page() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        man_pages(&ManPagesArgs {
            dir: dir.path().to_owned(),
        })
        .expect("write the man pages");
        let mut pages: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list the pages")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        pages.sort();
        let mut wanted: Vec<String> = Cli::command()
            .get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| format!("reuseportctl-{}.1", c.get_name()))
            .chain(["reuseportctl.1".to_owned()])
            .collect();
        wanted.sort();
        assert_eq!(pages, wanted);
    }

    #[test]
    fn completions_know_every_verb() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "reuseportctl", &mut script);
            let script = String::from_utf8(script).expect("UTF-8");
            for verb in ["status", "activate", "supervise", "version"] {
                assert!(script.contains(verb), "{shell}: no {verb}");
            }
        }
    }
}
