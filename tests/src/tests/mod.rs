//! The integration tests, one module per topic. Run with `--test-threads=1` (see the crate doc).

mod access;
mod agent_restart;
mod bad_input;
mod bpffs_trust;
mod child_process;
mod devices;
mod drain;
mod examples;
mod exec;
mod failed_changes;
mod flips;
mod group_creation;
mod groups;
mod hostile;
mod limits;
mod live;
mod migration;
mod netns_launchers;
mod process_death;
mod quotas;
mod reaping;
mod reregistration;
mod server_pid;
mod slow_clients;
mod steering;
mod supervise;
