//! The integration tests, one module per topic. Run with `--test-threads=1` (see the crate doc).

mod access;
mod agent_restart;
mod bad_input;
mod child_process;
mod exec;
mod flips;
mod groups;
mod harness_clients;
mod limits;
mod migration;
mod policy;
mod process_death;
mod reregister;
mod steering;
mod supervise;
