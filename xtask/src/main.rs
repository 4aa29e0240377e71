//! Project tasks: `cargo xtask setup | test | vm-test`.
mod setup;
mod test;
mod vm;

use clap::Parser as _;

#[derive(clap::Parser)]
#[command(about = "reuseport project tasks")]
enum Cli {
    /// Install what building needs: nightly rust-src and bpf-linker (idempotent).
    Setup,
    /// Everything CI checks: setup, clippy, unit tests, integration tests on this kernel,
    /// then the integration tests inside QEMU guests (the kernel matrix).
    Test(test::TestOpts),
    /// Only the integration tests inside QEMU guests, one per kernel.
    VmTest(vm::VmOpts),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse() {
        Cli::Setup => setup::setup(),
        Cli::Test(opts) => test::test(&opts),
        Cli::VmTest(opts) => vm::vm_test(&opts),
    }
}
