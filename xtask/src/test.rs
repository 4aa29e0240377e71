//! `cargo xtask test`: the one command CI runs (see `.ci/run`).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{fuzz, lint_docs, package, setup, stable_client, vm};

#[derive(clap::Args, Debug)]
pub struct TestOpts {
    /// Skip the QEMU kernel matrix (host kernel only).
    #[arg(long)]
    pub no_vm: bool,
    /// Skip clippy (for quick local iterations; CI runs it).
    #[arg(long)]
    pub no_lint: bool,
    /// Seconds each fuzz target runs (0 skips fuzzing).
    #[arg(long, value_name = "N", default_value_t = 60)]
    pub fuzz_seconds: u64,
    #[command(flatten)]
    pub vm: vm::VmOpts,
}

fn cargo(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).args(args);
    cmd
}

fn timed(name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let t = Instant::now();
    println!("==> {name}");
    let res = f().with_context(|| format!("xtask test: {name}"));
    println!(
        "==> {name}: {} in {:.1}s",
        if res.is_ok() { "ok" } else { "FAILED" },
        t.elapsed().as_secs_f64()
    );
    res
}

pub fn test(opts: &TestOpts) -> anyhow::Result<()> {
    let root = crate::workspace();
    let started = Instant::now();
    if !crate::is_root() {
        bail!(
            "cargo xtask test needs root: the integration tests load BPF programs and create network namespaces"
        );
    }
    // NB: first, before setup installs nightly's rust-src and bpf-linker: what a server
    // author's machine has is enough for the client library.
    timed("client library on stable Rust alone", || {
        stable_client::check(&root)
    })?;
    timed("setup", setup::setup)?;
    timed("test tools (Debian packages)", || {
        crate::packages::ensure("test", crate::packages::TEST_TOOLS)
    })?;
    if !opts.no_lint {
        timed("clippy (userspace)", || {
            setup::run(&mut cargo(
                &root,
                &[
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "reuseport-ebpf",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            ))
        })?;
        timed("clippy (fuzz targets)", fuzz::clippy)?;
        timed("container examples (docs/containers)", lint_docs::lint_docs)?;
        timed("clippy (eBPF)", || {
            // NB: separately and for the BPF target: in one run, feature unification would
            // pull std into the eBPF crate.
            let mut cmd = Command::new("rustup");
            cmd.current_dir(root.join("reuseport-ebpf")).args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "-Z",
                "build-std=core",
                "--target",
                "bpfel-unknown-none",
                "--release",
                "--",
                "-D",
                "warnings",
            ]);
            setup::run(&mut cmd)
        })?;
    }
    timed("unit tests", || {
        setup::run(&mut cargo(
            &root,
            &[
                "test",
                "--workspace",
                "--exclude",
                "reuseport-ebpf",
                "--exclude",
                "reuseport-tests",
            ],
        ))
    })?;
    if opts.fuzz_seconds > 0 {
        timed("fuzz", || fuzz::run(fuzz::TARGETS, opts.fuzz_seconds))?;
    }
    // NB: before the host's integration tests: the systemd test installs the .deb.
    let mut deb = None;
    timed("package (.deb and tarball, static musl binaries)", || {
        deb = Some(package::package()?.deb);
        Ok(())
    })?;
    let mut host = None;
    timed("integration tests (host kernel)", || {
        setup::run(
            cargo(&root, &["build"])
                .args(crate::BINARY_PACKAGES)
                .args(crate::FAULT_INJECTION),
        )?;
        let mut cmd = cargo(
            &root,
            &[
                "test",
                "-p",
                "reuseport-tests",
                "--",
                "--test-threads=1",
                "--show-output",
            ],
        );
        let release = kernel_release();
        let mode = vm::Mode::for_kernel(vm::expect::series_of_release(&release), false);
        cmd.env("REUSEPORT_BIN_DIR", root.join("target/debug"))
            .env(
                "REUSEPORT_DEB",
                deb.as_ref().expect("set by the package step"),
            )
            .env(vm::EXPECT_MODE_ENV, mode.as_str());
        let out = run_tee(cmd)?;
        host = Some(vm::Column::from_output(
            format!("host {release}"),
            mode,
            false,
            &out.text,
        ));
        if !out.success {
            bail!("integration tests failed on the host kernel");
        }
        Ok(())
    })?;
    let host = host.expect("set by the host run");
    timed(
        "flip check (reuseportctl supervise, 50 deploys under load)",
        || crate::bench::short_flip_check(&root.join("target/debug")),
    )?;
    let mut columns = vec![host];
    let mut vm_failure = None;
    if opts.no_vm {
        vm::print_matrix(&columns);
    } else {
        let mut report = None;
        timed("integration tests (QEMU kernel matrix)", || {
            report = Some(vm::run(&opts.vm)?);
            Ok(())
        })?;
        let report = report.expect("set by the VM run");
        report.print(&columns);
        columns = report.columns(&columns);
        if !report.success() {
            vm_failure = Some(format!(
                "{} of {} kernel runs failed",
                report.failures().count(),
                report.kernels.len()
            ));
        }
    }
    // Each column must skip exactly what its mode expects (see vm::expect).
    let problems: Vec<String> = columns.iter().flat_map(vm::expect::problems).collect();
    for p in &problems {
        println!("xtask: {p}");
    }
    // The closing line CI reads: every test of every column (host and guests).
    let count = |f: fn(&vm::TestOutcome) -> bool| {
        columns
            .iter()
            .flat_map(|c| &c.tests)
            .filter(|(_, o)| f(o))
            .count()
    };
    println!(
        "xtask: {} passed, {} failed, {} skipped",
        count(|o| *o == vm::TestOutcome::Pass),
        count(|o| *o == vm::TestOutcome::Fail),
        count(|o| matches!(o, vm::TestOutcome::Skip(_) | vm::TestOutcome::Ignored(_)))
    );
    if let Some(failure) = vm_failure {
        bail!(failure);
    }
    if !problems.is_empty() {
        bail!(
            "{} tests skipped or ran against what their column expects (see above)",
            problems.len()
        );
    }
    println!(
        "xtask test: all passed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

struct Output {
    text: String,
    success: bool,
}

/// Runs `cmd`, streaming its stdout while keeping a copy to parse.
fn run_tee(mut cmd: Command) -> anyhow::Result<Output> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let mut text = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait()?;
    Ok(Output {
        text,
        success: status.success(),
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
