//! Project tasks: `cargo xtask setup | test | ci-fresh | fuzz | vm-test | bench | demo |
//! lint-docs | package`.
mod bench;
mod ci_fresh;
mod demo;
mod demo_server;
mod deploy;
mod fuzz;
mod lint_docs;
mod load;
mod namespaces;
mod package;
mod packages;
mod page_bridge;
mod setup;
mod stable_client;
mod stack;
mod test;
mod vm;

use std::path::{Path, PathBuf};

use clap::Parser as _;

#[derive(clap::Parser)]
#[command(about = "reuseport project tasks")]
enum Cli {
    /// Install what building needs: nightly rust-src and bpf-linker (idempotent).
    Setup,
    /// Everything CI checks: setup, clippy, unit tests, integration tests on this kernel,
    /// then the integration tests inside QEMU guests (the kernel matrix).
    Test(test::TestOpts),
    /// The fresh-machine check: `.ci/run` on a fresh clone of HEAD, in a private mount
    /// namespace without bpffs, then a check that the host kept nothing of the run.
    CiFresh(ci_fresh::CiFreshOpts),
    /// Run the libFuzzer targets (fuzz/) for a bounded time each; fails on a crash.
    Fuzz(fuzz::FuzzOpts),
    /// Only the integration tests inside QEMU guests, one per kernel.
    VmTest(vm::VmOpts),
    /// Benchmarks that print figures (needs root).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Live demo: generations of a server replace each other under load (needs root).
    Demo(demo::DemoOpts),
    /// Check the container examples in docs/containers/ with hadolint, yamllint,
    /// docker-compose and kubernetes-validate (installed on first use).
    LintDocs,
    /// The Debian package and a tarball of static binaries, units, man pages and
    /// completions, in target/package/ (installs cargo-deb on first use).
    Package,
    /// The demo's LISTEN_FDS server (started by the demo through `reuseportctl exec`).
    #[command(hide = true)]
    DemoServer(demo_server::ServerOpts),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse() {
        Cli::Setup => setup::setup(),
        Cli::Test(opts) => test::test(&opts),
        Cli::CiFresh(opts) => ci_fresh::ci_fresh(&opts),
        Cli::Fuzz(opts) => fuzz::fuzz(&opts),
        Cli::VmTest(opts) => vm::vm_test(&opts),
        Cli::Bench(b) => bench::bench(&b),
        Cli::Demo(opts) => demo::demo(&opts),
        Cli::DemoServer(opts) => demo_server::serve(&opts),
        Cli::LintDocs => lint_docs::lint_docs(),
        Cli::Package => package::package().map(drop),
    }
}

/// `cargo build` arguments naming the packages of the two binaries (`reuseport-agent`,
/// `reuseportctl`) that the tests, the demo and the benchmarks run.
pub const BINARY_PACKAGES: [&str; 5] = ["-p", "reuseport-agent", "-p", "reuseportctl", "--bins"];
/// `cargo build` arguments for the agent's test build: with the fault-injection points the
/// crash and upgrade tests use (never in a release).
pub const FAULT_INJECTION: [&str; 2] = ["--features", "reuseport-agent/fault-injection"];

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
