//! `cargo xtask setup`: makes a fresh machine able to build and test the project.
//! Every step checks first and does nothing when its tool is present.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context as _, bail};

/// bpf-linker release known to build against rustc nightly's own LLVM 22
/// (`docs/toolchain.md`).
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> anyhow::Result<()> {
    let t = Instant::now();
    nightly()?;
    step("nightly rust-src", rust_src_present, || {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
    })?;
    step("bpf-linker", bpf_linker_present, install_bpf_linker)?;
    println!("setup: done in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}

/// The nightly toolchain alone (what `cargo xtask fuzz` needs).
pub fn nightly() -> anyhow::Result<()> {
    step("nightly toolchain", nightly_present, || {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
    })
}

pub fn step(
    name: &str,
    present: impl Fn() -> bool,
    install: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if present() {
        println!("setup: {name}: present");
        return Ok(());
    }
    let t = Instant::now();
    println!("setup: {name}: installing…");
    install().with_context(|| format!("setup step '{name}' failed"))?;
    if !present() {
        bail!("setup step '{name}': installed, but still not usable");
    }
    println!(
        "setup: {name}: installed in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} exited with {status}");
    }
    Ok(())
}

pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn nightly_sysroot() -> Option<PathBuf> {
    output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).map(PathBuf::from)
}

fn nightly_present() -> bool {
    nightly_sysroot().is_some()
}

fn rust_src_present() -> bool {
    nightly_sysroot().is_some_and(|s| s.join("lib/rustlib/src/rust/library/core").is_dir())
}

fn bpf_linker_present() -> bool {
    // NB: through `rustup run nightly`, which puts the nightly sysroot's lib directory (where
    // libLLVM lives) on LD_LIBRARY_PATH, exactly as aya-build calls it.
    output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
}

/// Builds bpf-linker against the LLVM that ships inside rustc nightly (Debian 12 has no
/// LLVM 22 development package).
fn install_bpf_linker() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot().context("nightly toolchain missing")?;
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let major = llvm
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libLLVM.so."))
        .and_then(|v| v.split('.').next())
        .context("cannot read the LLVM version from the library name")?
        .to_owned();
    let prefix = tempfile::Builder::new()
        .prefix("reuseport-llvm-prefix-")
        .tempdir()?;
    std::fs::create_dir_all(prefix.path().join("lib"))?;
    std::os::unix::fs::symlink(&llvm, prefix.path().join("lib/libLLVM.so"))?;
    let res = run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
        ])
        .arg("--features")
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", prefix.path()));
    drop(prefix);
    res
}
