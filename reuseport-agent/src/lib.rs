//! reuseport: eBPF-steered SO_REUSEPORT groups for zero-downtime deploys.
//!
//! - [`agent`]: the daemon (`reuseport-agent`) that owns the kernel program of each group.
//! - [`protocol`] and [`frame`]: the control protocol both sides speak; [`text`]: the rules
//!   for the text it carries.

pub use reuseport_client as client;
pub use reuseport_proto::{DEFAULT_CONTROL_PATH, addr, frame, message as protocol, text};

/// Default bpffs directory where the agent pins each group's program and maps.
pub const DEFAULT_BPFFS_PATH: &str = "/sys/fs/bpf/reuseport";
pub mod agent;
