//! `cargo xtask fuzz`: runs the libFuzzer targets of `fuzz/` for a bounded time each, with
//! cargo-fuzz on the nightly toolchain, and fails on the first crashing input.
//!
//! The committed seeds (`fuzz/corpus/<target>`) are only read; what a run discovers goes to
//! `target/fuzz/corpus/<target>`, which later runs start from. Crashing inputs are written
//! to `target/fuzz/artifacts/<target>/`.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Instant, SystemTime},
};

use anyhow::{Context as _, bail};

use crate::setup;

/// Every target in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &["control_frame", "group_addr"];

/// Installed when `cargo fuzz` is missing (builds with the stable toolchain).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

#[derive(clap::Args, Debug)]
pub struct FuzzOpts {
    /// Run only this target (default: all of them, one after the other).
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
    /// How long each target runs.
    #[arg(long, value_name = "N", default_value_t = 60)]
    pub seconds: u64,
}

pub fn fuzz(opts: &FuzzOpts) -> anyhow::Result<()> {
    let targets: Vec<&str> = match &opts.target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    run(&targets, opts.seconds)
}

/// Builds the targets, then runs each for `seconds`; errors name the crashing input.
pub fn run(targets: &[&str], seconds: u64) -> anyhow::Result<()> {
    setup::nightly()?;
    setup::step("cargo-fuzz", cargo_fuzz_present, || {
        setup::run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]))
    })?;
    let root = crate::workspace();
    let out = root.join("target/fuzz");
    let t = Instant::now();
    let mut build = cargo_fuzz(&root, "build");
    // `cargo fuzz build` takes one target, or none for all of them.
    if let [one] = targets {
        build.arg(one);
    }
    setup::run(&mut build).context("building the fuzz targets")?;
    println!("fuzz: built in {:.1}s", t.elapsed().as_secs_f64());
    for target in targets {
        run_one(&root, &out, target, seconds)?;
    }
    Ok(())
}

/// Clippy for the fuzz crate, which `clippy --workspace` does not see (its own workspace).
pub fn clippy() -> anyhow::Result<()> {
    let root = crate::workspace();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .arg("clippy")
        .arg("--manifest-path")
        .arg(root.join("fuzz/Cargo.toml"))
        .arg("--target-dir")
        .arg(root.join("target/fuzz/clippy"))
        .args(["--", "-D", "warnings"]);
    setup::run(&mut cmd)
}

fn cargo_fuzz_present() -> bool {
    setup::output(Command::new("rustup").args(["run", "nightly", "cargo", "fuzz", "--version"]))
        .is_some()
}

/// `cargo fuzz SUBCOMMAND` on nightly, with the flags `build` and `run` must share (a
/// difference would rebuild everything).
fn cargo_fuzz(root: &Path, subcommand: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root)
        .args(["run", "nightly", "cargo", "fuzz", subcommand])
        .arg("--fuzz-dir")
        .arg(root.join("fuzz"))
        .arg("--target-dir")
        .arg(root.join("target/fuzz/build"))
        // Integer overflow and other debug assertions are bugs worth finding too.
        .arg("--debug-assertions")
        // NB: `cargo xtask` runs under the stable toolchain, whose cargo this would name.
        .env_remove("CARGO");
    cmd
}

fn run_one(root: &Path, out: &Path, target: &str, seconds: u64) -> anyhow::Result<()> {
    let corpus = out.join("corpus").join(target);
    let artifacts = out.join("artifacts").join(target);
    for dir in [&corpus, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_path = out.join(format!("{target}.log"));
    let log = File::create(&log_path)
        .with_context(|| format!("creating the fuzz log {}", log_path.display()))?;
    println!(
        "fuzz: {target}: running for {seconds}s (log: {})",
        log_path.display()
    );
    let started = SystemTime::now();
    let mut cmd = cargo_fuzz(root, "run");
    cmd.arg(target)
        // The first corpus directory receives new inputs; the committed seeds stay as they are.
        .arg(&corpus)
        .arg(root.join("fuzz/corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // One input taking this long is a hang in a parser, not a slow machine.
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .stdout(log.try_clone()?)
        .stderr(log);
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        for line in crash_summary(&text) {
            println!("  {line}");
        }
        let found = new_files(&artifacts, started);
        if found.is_empty() {
            bail!(
                "fuzz target {target} failed ({status}) without a crashing input: see {}",
                log_path.display()
            );
        }
        let list: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "fuzz target {target} crashed on {}\n  reproduce: cargo +nightly fuzz run --fuzz-dir fuzz {target} {}\n  \
             after fixing, copy the input into fuzz/corpus/{target}/ so it stays covered",
            list.join(", "),
            list[0]
        );
    }
    let stat = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| "?".into())
    };
    let corpus_size = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
    println!(
        "fuzz: {target}: no crash; {} runs, {} exec/s, {} new inputs, corpus {corpus_size} inputs, peak RSS {} MB",
        stat("number_of_executed_units"),
        stat("average_exec_per_sec"),
        stat("new_units_added"),
        stat("peak_rss_mb"),
    );
    Ok(())
}

/// The lines of a fuzzer log that say what failed (a panic message, or a sanitizer's
/// report), and on which input; the rest is stack traces.
fn crash_summary(log: &str) -> Vec<&str> {
    let lines: Vec<&str> = log.lines().collect();
    let mut keep = Vec::new();
    let mut take_from = |start: Option<usize>, count: usize| {
        if let Some(i) = start {
            keep.extend(
                lines[i..]
                    .iter()
                    .take(count)
                    .take_while(|l| !l.trim().is_empty() && !l.starts_with("note:")),
            );
        }
    };
    let find = |pat: &str| lines.iter().position(|l| l.contains(pat));
    match find("panicked at") {
        Some(i) => take_from(Some(i), 6),
        None => take_from(find("ERROR:"), 3),
    }
    // SUMMARY, the mutation line, then the input as bytes and as text.
    take_from(find("SUMMARY:"), 4);
    keep
}

/// Files written to `dir` since `since` (the inputs of this run's crash).
fn new_files(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m >= since)
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_summary_keeps_the_panic_and_the_input() {
        let log = "INFO: Seed: 1\n\
            thread '<unnamed>' panicked at fuzz_targets/group_addr.rs:24:9:\n\
            assertion `left == right` failed: two groups should never share\n\
            note: run with `RUST_BACKTRACE=1`\n\
            ==1== ERROR: libFuzzer: deadly signal\n\
            \x20   #0 0x1 in __sanitizer_print_stack_trace\n\
            SUMMARY: libFuzzer: deadly signal\n\
            MS: 0 ; base unit: 0000\n\
            0x5b,0x3a,\n\
            [::0%2]:80\n\
            artifact_prefix='a/'; Test unit written to a/crash-1\n";
        assert_eq!(
            crash_summary(log),
            [
                "thread '<unnamed>' panicked at fuzz_targets/group_addr.rs:24:9:",
                "assertion `left == right` failed: two groups should never share",
                "SUMMARY: libFuzzer: deadly signal",
                "MS: 0 ; base unit: 0000",
                "0x5b,0x3a,",
                "[::0%2]:80",
            ],
            "the summary should hold the panic message and the crashing input, no stack trace"
        );
    }
}
