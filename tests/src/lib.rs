//! Integration tests for reuseport: the real agent binary, the real kernel program, real
//! sockets and real clients.
//!
//! Layout (as in aya's integration tests): the [`harness`] is a library module and every test
//! lives in `src/tests/<topic>.rs`, compiled into this crate under `#[cfg(test)]`, so there is
//! exactly ONE test executable. The VM runner boots that one binary inside QEMU.
//!
//! # Running
//! ```text
//! cargo build -p reuseport-agent                       # the binaries under test
//! cargo test -p reuseport-tests -- --test-threads=1
//! ```
//! The tests need root (network namespaces, bpffs, BPF programs). The agent and reuseportctl
//! are found in `REUSEPORT_BIN_DIR`, or else next to the test executable's `deps/` directory
//! (`target/<profile>/`, where `cargo build` puts them). Set `REUSEPORT_SELECT_ONLY=1` to run
//! the agent in select-only mode; tests that need migration then print `SKIP: …`; set
//! `REUSEPORT_EXPECT_MODE=select-only` on a kernel older than 5.14.
//!
//! # Why one test thread
//! Every test unshares its own network namespace (see [`harness::TestEnv`]), so ports never
//! collide. They still share kernel state that no namespace isolates: bpffs, BPF program and
//! map memory, the RCU grace periods the agent waits for, and the build machines' two cores.
//! Running tests in parallel would make timing figures meaningless and turn "the agent was
//! slow" into flaky failures, so run them with `--test-threads=1`.
//!
//! # Conventions
//! - No sleep is ever used as readiness: wait for a socket, a status change or a marker, with a
//!   bounded deadline.
//! - Servers count only connections that carry a request: the agent may make one short
//!   "wake-up" connection to a group that sends nothing (see `docs/kernel.md`).
//! - A test that cannot run on this kernel or in this mode prints `SKIP: <test>: <reason>` on
//!   stdout and returns; `cargo xtask test` collects these lines, and fails the run for any
//!   skip that the column does not expect (see `xtask/src/vm/expect.rs`).
//! - Every group's mode is checked against the one the column expects (`REUSEPORT_EXPECT_MODE`,
//!   see [`harness::expected_mode`]).
//! - Helper processes are the test executable itself, run with a filter that selects an
//!   ignored "test" whose reason starts with `helper:`; the matrix leaves those out.
//! - A client request that retransmitted a segment, or was slower than [`harness::slow_bound`],
//!   counts as failed: a dropped SYN is retransmitted after 1 s and must not pass for a success.

pub mod harness;

#[cfg(test)]
mod tests;
