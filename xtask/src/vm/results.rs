//! Test outcomes read from libtest's human output, and the kernel × test matrix.

use std::collections::BTreeMap;
use std::fmt;

use super::expect::Mode;

/// One test in one column of the matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestOutcome {
    Pass,
    Fail,
    /// The test returned early because the kernel or the guest lacks something (its `SKIP:`
    /// line). Carries the reason.
    Skip(String),
    /// `#[ignore]`d in the source (a demonstration run by hand): never run by the suite.
    Ignored(String),
}

/// One column of the matrix: a guest kernel run, or the caller's host run.
#[derive(Debug, Clone)]
pub struct Column {
    pub label: String,
    /// The mode the column's groups must run in (the tests check it).
    pub mode: Mode,
    /// A QEMU guest (which has none of the host's tools), not the host.
    pub guest: bool,
    pub tests: Vec<(String, TestOutcome)>,
    /// What the tests measured about the kernel (`FACT: question: answer (details)` lines).
    pub facts: Vec<(String, String)>,
}

impl Column {
    /// A column from the output of its test run.
    pub fn from_output(label: String, mode: Mode, guest: bool, text: &str) -> Self {
        Self {
            label,
            mode,
            guest,
            tests: parse_test_output(text),
            facts: parse_facts(text),
        }
    }
}

const SKIP_PREFIX: &str = "SKIP: ";
const FACT_PREFIX: &str = "FACT: ";
/// The `#[ignore]` reason of helper entry points: processes the tests start, not tests.
const HELPER_PREFIX: &str = "helper:";

/// Reads test outcomes from the output of libtest executables run with `--show-output`
/// (human format; stable libtest has no JSON): `test NAME ... ok|FAILED|ignored` lines, and
/// `SKIP: NAME: reason` lines that a test prints when it skips itself. Works on a guest's
/// serial log and on a host run's captured stdout alike. Helper entry points (ignored with a
/// `helper:` reason) are not tests and are left out.
pub fn parse_test_output(text: &str) -> Vec<(String, TestOutcome)> {
    let mut tests: Vec<(String, TestOutcome)> = text
        .lines()
        .filter_map(result_line)
        .filter(|(_, o)| !matches!(o, TestOutcome::Ignored(r) if r.starts_with(HELPER_PREFIX)))
        .collect();
    for (name, reason) in text.lines().filter_map(skip_line) {
        for (test, outcome) in tests.iter_mut() {
            if *outcome == TestOutcome::Pass && same_test(test, name) {
                *outcome = TestOutcome::Skip(reason.to_owned());
            }
        }
    }
    tests
}

pub(super) fn result_line(line: &str) -> Option<(String, TestOutcome)> {
    let (name, verdict) = line.trim().strip_prefix("test ")?.split_once(" ... ")?;
    let outcome = match verdict.trim() {
        "ok" => TestOutcome::Pass,
        "FAILED" => TestOutcome::Fail,
        "ignored" => TestOutcome::Ignored("ignored".to_owned()),
        other => TestOutcome::Ignored(other.strip_prefix("ignored, ")?.to_owned()),
    };
    Some((name.trim().to_owned(), outcome))
}

/// `FACT: question: answer (details)` lines: (question, answer).
pub fn parse_facts(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            // NB: libtest may print a test's output after `test NAME ... ` on the same line.
            let (_, fact) = l.split_once(FACT_PREFIX)?;
            let (question, answer) = fact.split_once(": ")?;
            Some((question.trim().to_owned(), answer.trim().to_owned()))
        })
        .collect()
}

fn skip_line(line: &str) -> Option<(&str, &str)> {
    // NB: split on ": ", not ':': test paths contain "::".
    let (name, reason) = line.trim().strip_prefix(SKIP_PREFIX)?.split_once(": ")?;
    Some((name.trim(), reason.trim()))
}

/// A SKIP line may name a test by its full libtest path or by its last segments.
fn same_test(libtest_name: &str, skip_name: &str) -> bool {
    let ends_with_path = |long: &str, short: &str| {
        long.strip_suffix(short)
            .is_some_and(|rest| rest.ends_with("::"))
    };
    libtest_name == skip_name
        || ends_with_path(libtest_name, skip_name)
        || ends_with_path(skip_name, libtest_name)
}

/// Prints rows = tests, columns = runs; skip reasons as numbered notes below the table.
pub fn print_matrix(columns: &[Column]) {
    print!("{}", render_matrix(columns));
}

pub fn render_matrix(columns: &[Column]) -> String {
    let mut reasons: Vec<String> = Vec::new();
    let mut rows: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, column) in columns.iter().enumerate() {
        for (test, outcome) in &column.tests {
            let cells = rows
                .entry(test.clone())
                .or_insert_with(|| vec!["-".to_owned(); columns.len()]);
            cells[i] = cell(outcome, &mut reasons);
        }
    }
    let tests = rows.len();
    // Facts after the tests: the first word of each answer ("yes", "no").
    let mut facts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, column) in columns.iter().enumerate() {
        for (question, answer) in &column.facts {
            let cells = facts
                .entry(format!("fact: {question}"))
                .or_insert_with(|| vec!["-".to_owned(); columns.len()]);
            cells[i] = answer.split_whitespace().next().unwrap_or("?").to_owned();
        }
    }
    let modes: Vec<String> = columns.iter().map(|c| c.mode.to_string()).collect();
    let all_rows: Vec<(&str, &Vec<String>)> = std::iter::once(("mode (expected)", &modes))
        .chain(rows.iter().map(|(t, c)| (t.as_str(), c)))
        .chain(facts.iter().map(|(t, c)| (t.as_str(), c)))
        .collect();
    let name_width = all_rows
        .iter()
        .map(|(n, _)| n.len())
        .chain([4])
        .max()
        .unwrap_or(4);
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            all_rows
                .iter()
                .map(|(_, cells)| cells[i].len())
                .chain([c.label.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let header: Vec<&str> = columns.iter().map(|c| c.label.as_str()).collect();
    push_row(&mut out, "test", name_width, &header, &widths);
    for (name, cells) in &all_rows {
        let cells: Vec<&str> = cells.iter().map(String::as_str).collect();
        push_row(&mut out, name, name_width, &cells, &widths);
    }
    if tests == 0 {
        out.push_str("(no test results)\n");
    }
    for (i, reason) in reasons.iter().enumerate() {
        out.push_str(&format!("[{}] {reason}\n", i + 1));
    }
    out
}

fn cell(outcome: &TestOutcome, reasons: &mut Vec<String>) -> String {
    match outcome {
        TestOutcome::Pass => "pass".to_owned(),
        TestOutcome::Fail => "FAIL".to_owned(),
        TestOutcome::Skip(reason) | TestOutcome::Ignored(reason) => {
            let index = reasons.iter().position(|r| r == reason).unwrap_or_else(|| {
                reasons.push(reason.clone());
                reasons.len() - 1
            });
            format!("skip[{}]", index + 1)
        }
    }
}

fn push_row(out: &mut String, name: &str, name_width: usize, cells: &[&str], widths: &[usize]) {
    out.push_str(&format!("{name:<name_width$}"));
    for (cell, width) in cells.iter().zip(widths) {
        out.push_str(&format!("  {cell:<width$}"));
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
}

impl fmt::Display for TestOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pass => f.write_str("pass"),
            Self::Fail => f.write_str("FAIL"),
            Self::Skip(reason) => write!(f, "skip ({reason})"),
            Self::Ignored(reason) => write!(f, "ignored ({reason})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
running 3 tests
test steering::follows_generation ... ok
test steering::select_only ... ok
test agent::restart ... FAILED
test legacy ... ignored, needs 5.x
test helpers::child ... ignored, helper: entry point of child processes
[    3.2] random kernel line
FACT: kernel wakes epoll for migrated connections: yes (50/50 accepted within 1s)
successes:

---- steering::select_only stdout ----
SKIP: select_only: kernel lacks bpf_sk_select_reuseport on this path
test result: FAILED. 2 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out
";

    #[test]
    fn reads_results_and_skips() {
        let tests = parse_test_output(LOG);
        assert_eq!(
            tests,
            vec![
                ("steering::follows_generation".to_owned(), TestOutcome::Pass),
                (
                    "steering::select_only".to_owned(),
                    TestOutcome::Skip(
                        "kernel lacks bpf_sk_select_reuseport on this path".to_owned()
                    )
                ),
                ("agent::restart".to_owned(), TestOutcome::Fail),
                (
                    "legacy".to_owned(),
                    TestOutcome::Ignored("needs 5.x".to_owned())
                ),
            ],
            "every libtest line should be read, and a SKIP line should turn its pass into a skip"
        );
    }

    #[test]
    fn matrix_numbers_skip_reasons() {
        let column =
            |label: &str| Column::from_output(label.to_owned(), Mode::SelectOrMigrate, true, LOG);
        let text = render_matrix(&[column("6.1"), column("6.12")]);
        let row = text
            .lines()
            .find(|l| l.starts_with("steering::select_only"))
            .expect("a row per test");
        assert!(
            row.split_whitespace().skip(1).eq(["skip[1]", "skip[1]"]),
            "both columns should cite reason 1, got:\n{text}"
        );
        assert!(text.contains("[2] needs 5.x"), "got:\n{text}");
        assert!(
            !text.contains("helpers::child"),
            "helpers are not tests:\n{text}"
        );
        let fact = text
            .lines()
            .find(|l| l.starts_with("fact: kernel wakes epoll"))
            .expect("a row per fact");
        assert!(
            fact.split_whitespace().rev().take(2).eq(["yes", "yes"]),
            "got:\n{text}"
        );
    }
}
