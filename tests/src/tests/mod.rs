//! The integration tests, one module per topic. Run with `--test-threads=1` (see the crate doc).

mod access;
mod agent_restart;
mod bad_input;
mod bpffs_trust;
mod child_process;
mod drain;
mod examples;
mod exec;
mod failed_changes;
mod flips;
mod group_creation;
mod groups;
mod harness_clients;
mod hostile;
mod limits;
mod live;
mod migration;
mod netns_launchers;
mod policy;
mod process_death;
mod reregister;
mod reregistration;
mod steering;
mod supervise;
