//! `cargo xtask package`: the Debian package and a plain tarball, both with static musl
//! binaries (the eBPF object embedded) that run on any x86_64 Linux ≥ 4.19 without the build
//! toolchain, the systemd units, man pages and shell completions generated from the CLI
//! definitions, and the defaults file.
//!
//! The `.deb` is cargo-deb's (`[package.metadata.deb]` in reuseport-agent/Cargo.toml), run
//! with `--no-build` on the binaries built here; cargo-deb itself is installed on first use at
//! a pinned version. Everything lands in `target/package/`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::vm::{
    cmd::{output_of, run_quiet},
    tools::{MUSL_TARGET, ensure_musl_target},
};

/// The cargo-deb the package metadata is written for (docs/toolchain.md, "Packaging").
const CARGO_DEB_VERSION: &str = "3.8.0";
/// Where the package's generated assets go; the metadata's asset paths name it.
const ASSETS: &str = "target/package/assets";
const OUT: &str = "target/package";

/// What `package` built.
pub struct Built {
    pub deb: PathBuf,
}

pub fn package() -> anyhow::Result<Built> {
    let root = crate::workspace();
    ensure_cargo_deb()?;
    ensure_musl_target()?;
    eprintln!("package: building the static binaries ({MUSL_TARGET}, release)");
    crate::setup::run(
        cargo(&root)
            .args(["build", "--release", "--target", MUSL_TARGET])
            .args(crate::BINARY_PACKAGES),
    )?;
    let bins = root.join("target").join(MUSL_TARGET).join("release");
    let assets = root.join(ASSETS);
    generate_assets(&bins, &assets)?;

    eprintln!("package: cargo deb");
    let out = root.join(OUT);
    let printed = output_of(
        cargo(&root)
            .args(["deb", "--no-build", "--no-strip", "-p", "reuseport-agent"])
            .args(["--target", MUSL_TARGET, "--output"])
            .arg(&out),
    )?;
    let deb = root.join(
        printed
            .lines()
            .rev()
            .find(|l| l.trim_end().ends_with(".deb"))
            .context("cargo deb printed no .deb path")?
            .trim(),
    );
    let tarball = tarball(&root, &bins, &assets)?;
    println!("package: {}", deb.display());
    println!("package: {}", tarball.display());
    Ok(Built { deb })
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

/// Installs cargo-deb unless the pinned version is there already.
fn ensure_cargo_deb() -> anyhow::Result<()> {
    let installed = Command::new("cargo-deb")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if installed.split_whitespace().any(|w| w == CARGO_DEB_VERSION) {
        return Ok(());
    }
    eprintln!("package: cargo install cargo-deb --version {CARGO_DEB_VERSION} --locked");
    crate::setup::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
            "install",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
            "--locked",
        ]),
    )
}

/// Man pages (gzipped, as Debian installs them) and completion scripts, from the binaries
/// just built: what they print is what they parse.
fn generate_assets(bins: &Path, assets: &Path) -> anyhow::Result<()> {
    if assets.exists() {
        std::fs::remove_dir_all(assets)
            .with_context(|| format!("removing the old {}", assets.display()))?;
    }
    let (man1, man8, completions) = (
        assets.join("man/man1"),
        assets.join("man/man8"),
        assets.join("completions"),
    );
    std::fs::create_dir_all(&man8).with_context(|| format!("creating {}", man8.display()))?;
    let ctl = bins.join("reuseportctl");
    run_quiet(Command::new(&ctl).arg("man-pages").arg(&man1))?;
    let agent_page = output_of(Command::new(bins.join("reuseport-agent")).arg("--man-page"))?;
    write(&man8.join("reuseport-agent.8"), &agent_page)?;
    for dir in [&man1, &man8] {
        run_quiet(
            Command::new("sh")
                .arg("-c")
                .arg("gzip -9nf -- *")
                .current_dir(dir),
        )?;
    }
    // Named as each shell looks them up.
    for (shell, file) in [
        ("bash", "reuseportctl"),
        ("zsh", "_reuseportctl"),
        ("fish", "reuseportctl.fish"),
    ] {
        let script = output_of(Command::new(&ctl).args(["completions", shell]))?;
        let dir = completions.join(shell);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        write(&dir.join(file), &script)?;
    }
    Ok(())
}

/// `reuseport-VERSION-x86_64-linux-musl.tar.gz`: what the .deb installs, laid out as a
/// prefix (`bin/`, `sbin/`, `share/`, `lib/`) with `etc/default/` beside it.
fn tarball(root: &Path, bins: &Path, assets: &Path) -> anyhow::Result<PathBuf> {
    let name = format!("reuseport-{}-x86_64-linux-musl", env!("CARGO_PKG_VERSION"));
    let stage = root.join(OUT).join("stage");
    let top = stage.join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage).context("removing the old tarball stage")?;
    }
    let packaging = root.join("packaging");
    let completions = assets.join("completions");
    // (source, directory under the prefix): the .deb's layout without `usr/`; `DIR/.`
    // copies a directory's contents.
    let copies: [(PathBuf, &str); 12] = [
        (bins.join("reuseport-agent"), "sbin"),
        (bins.join("reuseportctl"), "bin"),
        (assets.join("man/."), "share/man"),
        (
            completions.join("bash/."),
            "share/bash-completion/completions",
        ),
        (completions.join("zsh/."), "share/zsh/vendor-completions"),
        (
            completions.join("fish/."),
            "share/fish/vendor_completions.d",
        ),
        (packaging.join("systemd/."), "lib/systemd/system"),
        (packaging.join("sysusers/."), "lib/sysusers.d"),
        (packaging.join("dropins/."), "share/reuseport"),
        (packaging.join("default/."), "etc/default"),
        (root.join("README.md"), "share/doc/reuseport"),
        (root.join("docs/operations.md"), "share/doc/reuseport"),
    ];
    for (from, dir) in &copies {
        let dir = top.join(dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        run_quiet(Command::new("cp").arg("-a").arg(from).arg(&dir))?;
    }
    let tarball = root.join(OUT).join(format!("{name}.tar.gz"));
    run_quiet(
        Command::new("tar")
            .arg("-C")
            .arg(&stage)
            .args(["--owner=0", "--group=0", "-czf"])
            .arg(&tarball)
            .arg(&name),
    )?;
    if !tarball.is_file() {
        bail!("tar made no {}", tarball.display());
    }
    Ok(tarball)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
