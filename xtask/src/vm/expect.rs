//! What each column of the matrix must show besides passing tests: the mode the agent runs
//! groups in (the tests check every status against it, through `REUSEPORT_EXPECT_MODE`), and
//! exactly which tests skip: those that need migration where the mode has none, and in the
//! guests those that need the host's tools. `#[ignore]`d tests never count. A skip the column does not expect fails the run, and so does an
//! expected skip that ran: either means the column proves something else than it claims.

use std::fmt;

use super::results::{Column, TestOutcome};

/// The agent's mode for a column's groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Linux 5.14+: queued connections of a closing listener are migrated by the program.
    SelectOrMigrate,
    /// Linux 4.19–5.13, or forced with `REUSEPORT_SELECT_ONLY=1`.
    SelectOnly,
}

/// The first kernel with select-or-migrate programs.
const MIGRATION_SINCE: (u32, u32) = (5, 14);

impl Mode {
    /// The mode the agent must pick on kernel `series`, unless select-only is `forced`.
    pub fn for_kernel(series: Option<(u32, u32)>, forced: bool) -> Self {
        match series {
            _ if forced => Self::SelectOnly,
            Some(s) if s < MIGRATION_SINCE => Self::SelectOnly,
            _ => Self::SelectOrMigrate,
        }
    }

    /// The value of `REUSEPORT_EXPECT_MODE` (and of `mode` in `status`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SelectOrMigrate => "select-or-migrate",
            Self::SelectOnly => "select-only",
        }
    }

    /// Full libtest names of the tests that must skip in this mode.
    fn expected_skips(self) -> &'static [&'static str] {
        match self {
            Self::SelectOrMigrate => &[],
            Self::SelectOnly => NEED_MIGRATION,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The tests that need migration at close and skip without it.
const NEED_MIGRATION: &[&str] = &[
    "tests::migration::agent_wake_up_gets_a_deaf_epoll_server_to_accept_migrated_connections",
    "tests::migration::closing_draining_listener_migrates_half_open_connections",
    "tests::migration::closing_draining_listener_migrates_queue_to_blocking_server",
    "tests::migration::closing_draining_listener_migrates_queue_to_tokio_server",
    "tests::migration::one_new_connection_gets_every_migrated_connection_accepted",
];

/// The tests that drive real tools of the host which the guests do not have (ApacheBench,
/// `ss`, python3, a C compiler, debootstrap, systemd-nspawn, nginx, Prometheus and Chromium):
/// they run on the host and skip in every guest.
const NEED_HOST_TOOLS: &[&str] = &[
    "tests::drain::deploys_of_a_server_dying_on_sigterm_lose_nothing",
    "tests::examples::c_example_registers_serves_and_leaves_when_drained",
    "tests::examples::python_example_registers_serves_and_leaves_when_drained",
    "tests::live::status_live_counts_match_ss",
    "tests::multi_listener::supervise_deploys_a_two_port_server_under_load_on_both_ports",
    "tests::running_servers::nginx_workers_registered_by_pid_flip_and_stop_without_a_failed_request",
    "tests::metrics::chromium_renders_the_status_page_with_both_generations_during_a_flip",
    "tests::metrics::prometheus_sees_the_new_generations_counter_rise_and_the_old_ones_stop",
    "tests::systemd::systemd_notify_reload_unit_deploys_under_load_losing_nothing",
    "tests::systemd::systemd_reload_and_agent_restart_under_load_lose_nothing",
];

/// The `(major, minor)` of a kernel release string (`6.18.44`, `5.10.0-32-cloud-amd64`).
pub fn series_of_release(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release.split(|c: char| !c.is_ascii_digit());
    Some((numbers.next()?.parse().ok()?, numbers.next()?.parse().ok()?))
}

/// Where `column` differs from what its mode expects, one line each.
pub fn problems(column: &Column) -> Vec<String> {
    let host_tools: &[&str] = if column.guest { NEED_HOST_TOOLS } else { &[] };
    column
        .tests
        .iter()
        .filter_map(|(test, outcome)| {
            let test_name = test.as_str();
            let expected_skip = column.mode.expected_skips().contains(&test_name)
                || host_tools.contains(&test_name);
            match outcome {
                TestOutcome::Skip(reason) if !expected_skip => Some(format!(
                    "{}: {test} skipped, which a {} column does not expect: {reason}",
                    column.label, column.mode
                )),
                TestOutcome::Pass | TestOutcome::Fail if expected_skip => Some(format!(
                    "{}: {test} should skip in this column ({}{}), but ran",
                    column.label,
                    column.mode,
                    if column.guest { ", a guest" } else { "" }
                )),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(mode: Mode, tests: &[(&str, TestOutcome)]) -> Column {
        Column {
            label: "k".into(),
            mode,
            guest: false,
            tests: tests
                .iter()
                .map(|(n, o)| ((*n).to_owned(), o.clone()))
                .collect(),
            facts: Vec::new(),
        }
    }

    #[test]
    fn only_the_expected_skips_pass() {
        let migration = NEED_MIGRATION[0];
        let skip = || TestOutcome::Skip("select-only mode".into());
        assert!(problems(&column(Mode::SelectOnly, &[(migration, skip())])).is_empty());
        assert_eq!(
            problems(&column(Mode::SelectOrMigrate, &[(migration, skip())])).len(),
            1,
            "a migration test that skips in a select-or-migrate column is a problem"
        );
        assert_eq!(
            problems(&column(Mode::SelectOnly, &[(migration, TestOutcome::Pass)])).len(),
            1,
            "a migration test that runs in a select-only column is a problem"
        );
        assert_eq!(
            problems(&column(Mode::SelectOnly, &[("tests::x::y", skip())])).len(),
            1,
            "any other skip is a problem"
        );
    }

    #[test]
    fn kernels_before_5_14_expect_select_only() {
        assert_eq!(Mode::for_kernel(Some((5, 10)), false), Mode::SelectOnly);
        assert_eq!(
            Mode::for_kernel(Some((5, 14)), false),
            Mode::SelectOrMigrate
        );
        assert_eq!(Mode::for_kernel(Some((7, 2)), true), Mode::SelectOnly);
        assert_eq!(series_of_release("6.18.44"), Some((6, 18)));
        assert_eq!(series_of_release("5.10.0-32-cloud-amd64"), Some((5, 10)));
    }
}
