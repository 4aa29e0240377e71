//! Static guest binaries: the agent (a test build, with its fault-injection points), its CLI
//! and the integration test executables. The guest has no libc, so everything is built for
//! musl (or, failing that, static glibc).

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, anyhow, bail};

use super::tools::MUSL_TARGET;

const TESTS_PACKAGE: &str = "reuseport-tests";
const GNU_TARGET: &str = "x86_64-unknown-linux-gnu";

/// An executable for the guest, named for where it goes in the initramfs.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug)]
pub struct GuestBinaries {
    /// `reuseport-agent`, `reuseportctl`: go to /bin, where the tests look for them.
    pub bins: Vec<Artifact>,
    /// libtest executables: go to /tests.
    pub tests: Vec<Artifact>,
    /// The target they were built for (musl unless the fallback kicked in).
    pub target: &'static str,
}

pub fn build(workspace: &Path) -> anyhow::Result<GuestBinaries> {
    match build_for(workspace, Target::Musl) {
        Ok(binaries) => Ok(binaries),
        // NB: a compile error in our own code fails the same way for glibc, after a full
        // rebuild (other RUSTFLAGS): only toolchain/linker trouble is worth the fallback.
        Err(e) if e.downcast_ref::<SourceError>().is_some() => Err(e),
        Err(musl_error) => {
            eprintln!("vm: the musl build failed, trying static glibc: {musl_error:#}");
            build_for(workspace, Target::StaticGlibc)
                .with_context(|| format!("musl build failed too: {musl_error:#}"))
        }
    }
}

#[derive(Clone, Copy)]
enum Target {
    Musl,
    StaticGlibc,
}

impl Target {
    fn triple(self) -> &'static str {
        match self {
            Self::Musl => MUSL_TARGET,
            Self::StaticGlibc => GNU_TARGET,
        }
    }
}

fn build_for(workspace: &Path, target: Target) -> anyhow::Result<GuestBinaries> {
    // NB: with the fault-injection points the crash and upgrade tests use, as on the host.
    let build: Vec<&str> = ["build", "--release"]
        .into_iter()
        .chain(crate::BINARY_PACKAGES)
        .chain(crate::FAULT_INJECTION)
        .collect();
    let bins = cargo_artifacts(workspace, target, &build, |a| {
        a.kind.iter().any(|k| k == "bin")
    })
    .with_context(|| {
        format!(
            "building reuseport-agent and reuseportctl for {}",
            target.triple()
        )
    })?;
    let tests = cargo_artifacts(
        workspace,
        target,
        &["test", "--release", "-p", TESTS_PACKAGE, "--no-run"],
        |a| a.profile_test,
    )
    .with_context(|| {
        format!(
            "building the {TESTS_PACKAGE} executables for {}",
            target.triple()
        )
    })?;
    if tests.is_empty() {
        bail!("{TESTS_PACKAGE} built no test executable");
    }
    Ok(GuestBinaries {
        bins: bins.into_iter().map(Artifact::from).collect(),
        tests: unique_test_names(tests),
        target: target.triple(),
    })
}

/// What cargo says about one compiled target (`--message-format=json`, reason
/// `compiler-artifact`).
struct CargoArtifact {
    name: String,
    kind: Vec<String>,
    profile_test: bool,
    executable: Option<PathBuf>,
}

fn cargo_artifacts(
    workspace: &Path,
    target: Target,
    args: &[&str],
    wanted: impl Fn(&CargoArtifact) -> bool,
) -> anyhow::Result<Vec<(CargoArtifact, PathBuf)>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(args)
        .args(["--target", target.triple()])
        // NB: plain `json` would swallow compiler errors into the JSON stream; this one still
        // renders them on stderr for the person running the command.
        .arg("--message-format=json-render-diagnostics")
        // NB: stderr goes through a pipe (see echo_stderr); keep cargo's colours for a terminal.
        .arg(if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            "--color=always"
        } else {
            "--color=never"
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Target::StaticGlibc = target {
        // NB: with an explicit --target, RUSTFLAGS reach only target code, not build scripts.
        cmd.env("RUSTFLAGS", "-C target-feature=+crt-static");
    }
    let mut child = cmd.spawn().context("starting cargo")?;
    let stderr = echo_stderr(&mut child);
    let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut found = Vec::new();
    for line in stdout.lines() {
        let line = line.context("reading cargo's output")?;
        if let Some(artifact) = parse_artifact(&line)?
            && wanted(&artifact)
            && let Some(exe) = artifact.executable.clone()
        {
            found.push((artifact, exe));
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    let source_error = stderr.join().unwrap_or(false);
    if !status.success() {
        let error = anyhow!("cargo {} exited {status}", args.join(" "));
        return Err(if source_error {
            error.context(SourceError)
        } else {
            error
        });
    }
    Ok(found)
}

/// Our code (or a build script) failed to compile: rustc printed `error[E…]`, or a build
/// script failed. Retrying for another target cannot help.
#[derive(Debug)]
struct SourceError;

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the workspace does not compile (see the errors above)")
    }
}

impl std::error::Error for SourceError {}

/// Passes cargo's stderr through line by line; the thread returns whether it looked like a
/// compile error (as opposed to a missing target or linker trouble).
fn echo_stderr(child: &mut Child) -> std::thread::JoinHandle<bool> {
    let stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
    std::thread::spawn(move || {
        let mut source_error = false;
        for line in stderr.split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line);
            source_error |= strip_ansi(&line).starts_with("error[E")
                || line.contains("failed to run custom build command");
            eprintln!("{line}");
        }
        source_error
    })
}

fn parse_artifact(line: &str) -> anyhow::Result<Option<CargoArtifact>> {
    let msg: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("cargo printed a line that is not JSON: {line}"))?;
    if msg["reason"] != "compiler-artifact" {
        return Ok(None);
    }
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    Ok(Some(CargoArtifact {
        name: msg["target"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        kind: strings(&msg["target"]["kind"]),
        profile_test: msg["profile"]["test"].as_bool().unwrap_or(false),
        executable: msg["executable"].as_str().map(PathBuf::from),
    }))
}

/// `line` without ANSI colour sequences (ESC `[` … letter).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

/// Names for /tests/: the target name, plus its kind when two targets share a name (the
/// library's unit tests and an integration test file called like the crate).
fn unique_test_names(tests: Vec<(CargoArtifact, PathBuf)>) -> Vec<Artifact> {
    let names: Vec<&str> = tests.iter().map(|(a, _)| a.name.as_str()).collect();
    let shared = |name: &str| names.iter().filter(|&&n| n == name).count() > 1;
    tests
        .iter()
        .map(|(a, path)| {
            let name = match a.kind.first() {
                Some(kind) if shared(&a.name) => format!("{}-{kind}", a.name),
                _ => a.name.clone(),
            };
            Artifact {
                name,
                path: path.clone(),
            }
        })
        .collect()
}

impl From<(CargoArtifact, PathBuf)> for Artifact {
    fn from((artifact, path): (CargoArtifact, PathBuf)) -> Self {
        Self {
            name: artifact.name,
            path,
        }
    }
}
