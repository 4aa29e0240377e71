//! A generation's health, as its supervisor reports it (`health`) and `status` shows it.

use serde::{Deserialize, Serialize};

/// A generation's health as its supervisor's checks see it (tengine's rise/fall): `up` after
/// `rise` checks passed in a row, `down` after `fall` failed in a row, `checking` before
/// either.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationHealth {
    pub state: HealthState,
    /// Checks passed in a row, and the number that makes it up.
    pub successes: u32,
    pub rise: u32,
    /// Checks failed in a row, and the number that makes it down.
    pub failures: u32,
    pub fall: u32,
    /// When the last check ended, in milliseconds since the Unix epoch.
    pub last_check_ms: u64,
    /// Why the last failed check failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Checking,
    Up,
    Down,
}

impl std::fmt::Display for HealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Checking => "checking",
            Self::Up => "up",
            Self::Down => "down",
        })
    }
}
