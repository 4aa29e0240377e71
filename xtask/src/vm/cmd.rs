//! Running host commands with errors that say which command failed and what it printed.

use std::process::{Command, Output};

use anyhow::{Context as _, bail};

/// Runs `cmd` and returns its stdout; a non-zero exit is an error carrying its stderr.
pub fn output_of(cmd: &mut Command) -> anyhow::Result<String> {
    let out = checked(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with its output captured: shown only when it fails.
pub fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    checked(cmd).map(drop)
}

fn checked(cmd: &mut Command) -> anyhow::Result<Output> {
    let name = describe(cmd);
    let out = cmd.output().with_context(|| format!("starting `{name}`"))?;
    if !out.status.success() {
        let code = out
            .status
            .code()
            .map_or_else(|| out.status.to_string(), |c| c.to_string());
        bail!("`{name}` exited {code}:\n{}", tail(&out));
    }
    Ok(out)
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last lines of stderr (or of stdout when stderr is empty): enough to see why, short
/// enough to read.
fn tail(out: &Output) -> String {
    const LINES: usize = 20;
    let stream = if out.stderr.iter().all(u8::is_ascii_whitespace) {
        &out.stdout
    } else {
        &out.stderr
    };
    let text = String::from_utf8_lossy(stream);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(LINES)..].join("\n")
}
