//! `cargo xtask vm-test`: the integration tests inside real kernels, one QEMU guest per
//! kernel, reported as a kernel × test matrix.
//!
//! Steps, each cached or skipped when already done: host tools (apt), the musl target
//! (rustup), kernel packages (Debian's package sources, resolved at run time through private
//! apt configurations and cached per package version under
//! `/var/cache/reuseport-tests/kernels/`, see [`kernel`]), static guest binaries (cargo), one
//! initramfs shared by every column (`target/vm/initramfs.cpio`), then the boots
//! (`target/vm/logs/<column>.log`).
//!
//! A column is a kernel spec, optionally with `:select-only`, which boots the same kernel
//! with `REUSEPORT_SELECT_ONLY=1` so the agent takes its select-only path. Each column states
//! the mode it expects (from the kernel version and that option, see [`expect`]); the tests
//! check every group against it, and the run fails on any skip the column does not expect.
//!
//! Measured here (2 host cores, TCG, cached builds and kernels): a bare boot + trivial test +
//! power-off takes 4–5 s; the current suite takes ≈190 s per 6.12 column, ≈130 s of it in the
//! 10 000-flip test. Hence the defaults: one vCPU per guest (`--cpus 2` made a 6.12 column take
//! 368 s instead of 198 s: TCG vCPU threads only fight over the two cores) and every column at
//! once (`--jobs 3`: 253 s for the matrix, against ≈340 s when the third column waits for a
//! free core). The initramfs stays uncompressed: `gzip -1` added 1.2 s per boot (inflating
//! runs emulated). Fetching both kernels from scratch: ≈12 s.
//!
//! The verdict of a boot comes only from the `REUSEPORT-VM-RESULT` line that `/init` prints:
//! QEMU exits 0 on power-off whatever happened inside.

mod apt;
mod binaries;
pub mod cmd;
pub mod expect;
mod initramfs;
mod kernel;
mod qemu;
mod results;
pub mod tools;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

pub use expect::Mode;
pub use results::{Column, TestOutcome, print_matrix};

/// Columns run when no `--kernel` is given: bullseye's 5.10 (before select-or-migrate: the
/// agent must pick select-only by itself), each Debian 12 series, select-only forced on the
/// newest of those, and sid's kernel (7.x).
pub const DEFAULT_KERNELS: &[&str] = &["5.10", "6.1", "6.12", "6.12:select-only", "sid"];

const SELECT_ONLY_SUFFIX: &str = ":select-only";
const SELECT_ONLY_ENV: (&str, &str) = ("REUSEPORT_SELECT_ONLY", "1");
/// Read by the tests: the mode every group must run in (see [`expect`]).
pub const EXPECT_MODE_ENV: &str = "REUSEPORT_EXPECT_MODE";

#[derive(clap::Args, Debug, Clone)]
pub struct VmOpts {
    /// Kernel column: `5.10` (bullseye), `6.1`, `6.12` (bookworm), `sid` or an exact
    /// `linux-image-…` package name, optionally followed by `:select-only` (runs with
    /// REUSEPORT_SELECT_ONLY=1). Repeatable. Default: 5.10, 6.1, 6.12, 6.12:select-only, sid.
    #[arg(long = "kernel", value_name = "SPEC")]
    pub kernels: Vec<String>,
    /// Hard limit for one guest, boot to power-off.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub timeout: u64,
    /// Guests running at once (see the module docs).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub jobs: usize,
    /// Virtual CPUs per guest.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
    /// Arguments for every test executable, e.g. a test name filter.
    #[arg(last = true, value_name = "TEST_ARGS")]
    pub test_args: Vec<String>,
}

impl Default for VmOpts {
    fn default() -> Self {
        Self {
            kernels: Vec::new(),
            timeout: 600,
            jobs: 3,
            cpus: 1,
            test_args: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct VmReport {
    pub kernels: Vec<KernelResult>,
}

/// One matrix column: one boot of one kernel.
#[derive(Debug, Clone)]
pub struct KernelResult {
    /// The spec as given (`6.12 select-only`): the column header.
    pub name: String,
    /// The package and version the kernel came from.
    pub package: String,
    /// `uname -r` as printed by the guest's init; None if it never got that far.
    pub release: Option<String>,
    pub outcome: RunOutcome,
    pub mode: Mode,
    pub tests: Vec<(String, TestOutcome)>,
    pub facts: Vec<(String, String)>,
    /// Wall time of each test in the guest (TCG: far slower than on the host).
    pub durations: Vec<(String, Duration)>,
    /// The serial console log, kept for every run.
    pub log: PathBuf,
    /// Boot, tests and power-off.
    pub elapsed: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    Passed,
    /// `/init` reported this non-zero exit status of a test executable.
    TestsFailed(i32),
    /// A kernel panic, BUG, oops, lockup or warning: the first such console line.
    KernelCrash(String),
    TimedOut,
    /// QEMU exited without the result marker.
    NoResult,
}

/// Prepares everything and runs every column. Errors are setup failures (a download, a
/// build, QEMU missing); test and kernel failures are in the report.
pub fn run(opts: &VmOpts) -> anyhow::Result<VmReport> {
    let started = Instant::now();
    let columns = parse_columns(&opts.kernels)?;
    let paths = Paths::new()?;
    step("host tools", || {
        tools::ensure_host_tools()?;
        tools::ensure_musl_target()
    })?;
    let kernels = step("kernels", || fetch_kernels(&columns))?;
    let binaries = step("guest binaries", || binaries::build(&paths.workspace))?;
    let initrd = paths.vm.join("initramfs.cpio");
    step("initramfs", || {
        let modules: Vec<_> = kernels.values().map(|k| k.modules.clone()).collect();
        initramfs::write(&initrd, &binaries, &modules, &opts.test_args)
    })?;
    if binaries.target != tools::MUSL_TARGET {
        eprintln!(
            "vm: NB: guest binaries are static glibc ({}), the musl build failed",
            binaries.target
        );
    }
    let boots: Vec<Boot> = columns
        .iter()
        .map(|c| {
            let kernel = &kernels[&c.spec];
            let mode = Mode::for_kernel(kernel.series(), c.select_only);
            let mut env = Vec::new();
            if c.select_only {
                let (name, value) = SELECT_ONLY_ENV;
                env.push((name.to_owned(), value.to_owned()));
            }
            env.push((EXPECT_MODE_ENV.to_owned(), mode.as_str().to_owned()));
            Boot {
                column: c,
                kernel,
                mode,
                env,
                initrd: &initrd,
                logs: &paths.logs,
                opts,
            }
        })
        .collect();
    let results = step("boots", || run_boots(&boots, opts.jobs))?;
    eprintln!("vm: total {:.1}s", started.elapsed().as_secs_f64());
    Ok(VmReport { kernels: results })
}

/// `cargo xtask vm-test`: run, print the matrix, fail if any column failed or skipped other
/// tests than it expects.
pub fn vm_test(opts: &VmOpts) -> anyhow::Result<()> {
    let report = run(opts)?;
    report.print(&[]);
    if !report.success() {
        bail!(
            "{} of {} kernel runs failed",
            report.failures().count(),
            report.kernels.len()
        );
    }
    let problems: Vec<String> = report
        .columns(&[])
        .iter()
        .flat_map(expect::problems)
        .collect();
    for p in &problems {
        println!("vm: {p}");
    }
    if !problems.is_empty() {
        bail!(
            "{} tests skipped or ran against what their column expects",
            problems.len()
        );
    }
    Ok(())
}

impl VmReport {
    pub fn success(&self) -> bool {
        self.failures().next().is_none()
    }

    pub fn failures(&self) -> impl Iterator<Item = &KernelResult> {
        self.kernels
            .iter()
            .filter(|k| k.outcome != RunOutcome::Passed)
    }

    /// The VM columns, after `before` (e.g. the host run of `cargo xtask test`).
    pub fn columns(&self, before: &[Column]) -> Vec<Column> {
        let vms = self.kernels.iter().map(|k| Column {
            label: k.name.clone(),
            mode: k.mode,
            guest: true,
            tests: k.tests.clone(),
            facts: k.facts.clone(),
        });
        before.iter().cloned().chain(vms).collect()
    }

    /// The matrix, then one line per kernel: release, timing, outcome, and the log to read.
    pub fn print(&self, before: &[Column]) {
        print_matrix(&self.columns(before));
        println!();
        for k in &self.kernels {
            let release = k.release.as_deref().unwrap_or("?");
            let verdict = match &k.outcome {
                RunOutcome::Passed => "ok".to_owned(),
                RunOutcome::TestsFailed(code) => format!("FAILED: tests exited {code}"),
                RunOutcome::KernelCrash(line) => format!("FAILED: kernel: {line}"),
                RunOutcome::TimedOut => "FAILED: timed out".to_owned(),
                RunOutcome::NoResult => "FAILED: no result marker (init died?)".to_owned(),
            };
            println!(
                "{:<18} {release:<28} {:>6.1}s  {verdict}  ({})",
                k.name,
                k.elapsed.as_secs_f64(),
                k.package
            );
            if let Some(slowest) = k.slowest_tests(3) {
                println!("{:<18} slowest: {slowest}", "");
            }
            if k.outcome != RunOutcome::Passed {
                println!("{:<18} log: {}", "", k.log.display());
            }
        }
    }
}

impl KernelResult {
    /// `name 12.3s, name 4.5s`: where a column's time goes (only the last path segment).
    fn slowest_tests(&self, n: usize) -> Option<String> {
        let mut durations = self.durations.clone();
        durations.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
        let shown: Vec<String> = durations
            .iter()
            .take(n)
            .map(|(name, d)| {
                let short = name.rsplit("::").next().unwrap_or(name);
                format!("{short} {:.1}s", d.as_secs_f64())
            })
            .collect();
        (!shown.is_empty()).then(|| shown.join(", "))
    }
}

/// A parsed `--kernel` argument.
#[derive(Debug)]
struct ColumnSpec {
    /// What [`kernel::Kernels::get`] gets: `6.12` or a package name.
    spec: String,
    label: String,
    /// Boots with `REUSEPORT_SELECT_ONLY=1`.
    select_only: bool,
}

fn parse_columns(args: &[String]) -> anyhow::Result<Vec<ColumnSpec>> {
    let args: Vec<&str> = if args.is_empty() {
        DEFAULT_KERNELS.to_vec()
    } else {
        args.iter().map(String::as_str).collect()
    };
    let columns: Vec<ColumnSpec> = args
        .into_iter()
        .map(parse_column)
        .collect::<Result<_, _>>()?;
    // NB: the label names the log file: two equal columns would write the same log.
    for (i, column) in columns.iter().enumerate() {
        if columns[..i].iter().any(|c| c.label == column.label) {
            bail!("--kernel {} is given twice", column.label);
        }
    }
    Ok(columns)
}

fn parse_column(arg: &str) -> anyhow::Result<ColumnSpec> {
    let (spec, select_only, label) = match arg.strip_suffix(SELECT_ONLY_SUFFIX) {
        Some(spec) => (spec, true, format!("{spec} select-only")),
        None => (arg, false, arg.to_owned()),
    };
    if spec.is_empty() || spec.contains(':') {
        bail!(
            "bad --kernel {arg:?}: expected 5.10, 6.1, 6.12, sid or a package name, optionally \
             with {SELECT_ONLY_SUFFIX}"
        );
    }
    Ok(ColumnSpec {
        spec: spec.to_owned(),
        label,
        select_only,
    })
}

struct Paths {
    workspace: PathBuf,
    vm: PathBuf,
    logs: PathBuf,
}

impl Paths {
    fn new() -> anyhow::Result<Self> {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or_else(|| anyhow!("xtask has no parent directory"))?
            .to_owned();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| workspace.join("target"), PathBuf::from);
        let vm = target.join("vm");
        let logs = vm.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        Ok(Self {
            workspace,
            vm,
            logs,
        })
    }
}

/// Runs one preparation step, naming it in the error and timing it.
fn step<T>(name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let started = Instant::now();
    let value = f().with_context(|| format!("vm-test: {name}"))?;
    eprintln!(
        "vm: {name} ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(value)
}

/// One kernel per distinct spec (two columns may boot the same kernel).
fn fetch_kernels(columns: &[ColumnSpec]) -> anyhow::Result<BTreeMap<String, kernel::Kernel>> {
    let mut cache = kernel::Kernels::new()?;
    let mut kernels = BTreeMap::new();
    for column in columns {
        if kernels.contains_key(&column.spec) {
            continue;
        }
        let kernel = cache
            .get(&column.spec)
            .with_context(|| format!("kernel for --kernel {}", column.label))?;
        kernels.insert(column.spec.clone(), kernel);
    }
    Ok(kernels)
}

struct Boot<'a> {
    column: &'a ColumnSpec,
    kernel: &'a kernel::Kernel,
    mode: Mode,
    /// `NAME=value` words for the guest's init.
    env: Vec<(String, String)>,
    initrd: &'a Path,
    logs: &'a Path,
    opts: &'a VmOpts,
}

/// Runs the boots `jobs` at a time, results in column order.
fn run_boots(boots: &[Boot<'_>], jobs: usize) -> anyhow::Result<Vec<KernelResult>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<anyhow::Result<KernelResult>>>> =
        Mutex::new(boots.iter().map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, boots.len().max(1)) {
            s.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(boot) = boots.get(index) else { break };
                    let result = run_boot(boot);
                    results.lock().expect("no thread panics holding the lock")[index] =
                        Some(result);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("no thread panics holding the lock")
        .into_iter()
        .map(|r| r.expect("every boot ran"))
        .collect()
}

fn run_boot(boot: &Boot<'_>) -> anyhow::Result<KernelResult> {
    let label = &boot.column.label;
    let log = boot.logs.join(format!("{}.log", file_name(label)));
    eprintln!(
        "vm: booting {label} ({} {}, expecting {})",
        boot.kernel.package, boot.kernel.version, boot.mode
    );
    let started = Instant::now();
    let console = qemu::boot(&qemu::Boot {
        kernel: &boot.kernel.image,
        initrd: boot.initrd,
        env: &boot.env,
        cpus: boot.opts.cpus,
        timeout: Duration::from_secs(boot.opts.timeout),
        log: &log,
    })
    .with_context(|| format!("booting {label}"))?;
    let elapsed = started.elapsed();
    let text: String = console
        .lines
        .iter()
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let outcome = match console.end {
        qemu::BootEnd::Result(0) => RunOutcome::Passed,
        qemu::BootEnd::Result(code) => RunOutcome::TestsFailed(code),
        qemu::BootEnd::Crash(line) => RunOutcome::KernelCrash(line),
        qemu::BootEnd::TimedOut => RunOutcome::TimedOut,
        qemu::BootEnd::NoMarker => RunOutcome::NoResult,
    };
    eprintln!(
        "vm: {label} done in {:.1}s: {outcome:?}",
        elapsed.as_secs_f64()
    );
    Ok(KernelResult {
        name: label.clone(),
        package: format!("{} {}", boot.kernel.package, boot.kernel.version),
        release: text
            .lines()
            .find_map(|l| l.trim().strip_prefix(initramfs::RELEASE_MARKER))
            .map(str::to_owned),
        outcome,
        mode: boot.mode,
        tests: results::parse_test_output(&text),
        facts: results::parse_facts(&text),
        durations: test_durations(&console.lines),
        log,
        elapsed,
    })
}

/// How long each test ran, from when its result line arrived after the previous one (or
/// after its executable started).
fn test_durations(lines: &[(Duration, String)]) -> Vec<(String, Duration)> {
    let mut since = Duration::ZERO;
    let mut durations = Vec::new();
    for (at, line) in lines {
        if line.trim().starts_with(initramfs::EXEC_MARKER) {
            since = *at;
        } else if let Some((name, _)) = results::result_line(line) {
            durations.push((name, at.saturating_sub(since)));
            since = *at;
        }
    }
    durations
}

fn file_name(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_column;

    #[test]
    fn select_only_suffix_forces_select_only() {
        let column = parse_column("6.12:select-only").expect("valid spec");
        assert_eq!(column.spec, "6.12");
        assert_eq!(column.label, "6.12 select-only");
        assert!(column.select_only);
        assert!(!parse_column("sid").expect("valid spec").select_only);
        assert!(
            parse_column("6.12:bogus").is_err(),
            "unknown suffixes should be rejected"
        );
    }
}
