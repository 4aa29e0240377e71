//! The first step of `cargo xtask test`: the client library builds and passes its tests with
//! the stable toolchain alone, as a server author's machine has it. Its cargo runs with a
//! PATH that holds no bpf-linker (nor the rustup proxies next to it), nothing of nightly
//! (`rust-src` is never looked for), and a target directory of its own, so nothing the eBPF
//! build left behind can help; its dependency tree must not contain aya.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::setup;

/// The toolchain the client must build with.
const TOOLCHAIN: &str = "stable";
const PACKAGE: &str = "reuseport-client";

pub fn check(root: &Path) -> anyhow::Result<()> {
    let cargo =
        setup::output(Command::new("rustup").args(["which", "cargo", "--toolchain", TOOLCHAIN]))
            .map(PathBuf::from)
            .with_context(|| {
                format!("no {TOOLCHAIN} toolchain: `rustup which cargo` found no cargo")
            })?;
    let toolchain_bin = cargo.parent().context("cargo has no directory")?.to_owned();
    let path = stripped_path(&toolchain_bin)?;
    if let Some(dir) = std::env::split_paths(&path).find(|d| d.join("bpf-linker").exists()) {
        bail!(
            "bpf-linker is still on the stripped PATH, in {}",
            dir.display()
        );
    }
    println!(
        "stable client: {} with PATH={} (no bpf-linker), target dir target/stable-client",
        cargo.display(),
        path.to_string_lossy()
    );
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(root)
            .args(args)
            .args(["--locked", "-p", PACKAGE])
            .env("PATH", &path)
            .env("RUSTUP_TOOLCHAIN", TOOLCHAIN)
            .env("CARGO_TARGET_DIR", root.join("target/stable-client"))
            // NB: what the outer `cargo xtask` put in the environment names its own
            // toolchain's tools.
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .env_remove("RUSTDOC")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTFLAGS");
        println!(
            "stable client: cargo {} --locked -p {PACKAGE}",
            args.join(" ")
        );
        let out = cmd
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {cmd:?}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{stdout}");
        if !out.status.success() {
            bail!(
                "cargo {} -p {PACKAGE} failed on {TOOLCHAIN} alone",
                args.join(" ")
            );
        }
        Ok(stdout)
    };
    run(&["build"])?;
    run(&["test"])?;
    let tree = run(&["tree", "--edges", "normal,build"])?;
    if let Some(line) = tree.lines().find(|l| l.contains("aya")) {
        bail!("{PACKAGE} depends on aya: {}", line.trim());
    }
    println!("stable client: builds and passes its tests on {TOOLCHAIN} alone; no aya in its tree");
    Ok(())
}

/// PATH with `toolchain_bin` first and without any directory that holds bpf-linker.
fn stripped_path(toolchain_bin: &Path) -> anyhow::Result<OsString> {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(toolchain_bin.to_owned())
        .chain(std::env::split_paths(&current).filter(|d| !d.join("bpf-linker").exists()));
    std::env::join_paths(dirs).context("building the stripped PATH")
}
