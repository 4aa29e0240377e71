//! Boots one guest under QEMU/TCG and follows its serial console until the result marker,
//! a kernel failure, or the deadline.
//!
//! NB: TCG, never KVM: /dev/kvm opens here but the host has no hardware virtualisation, and
//! KVM's instruction emulator crashes on ordinary guest code (docs/vm.md).

use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::initramfs::RESULT_MARKER;

/// Serial lines that mean the kernel itself failed: the run is a failure whatever the tests
/// said. (`---[ end trace` closes every WARN and oops report.)
const CRASH_MARKERS: &[&str] = &[
    "Kernel panic",
    "BUG:",
    "Oops",
    "soft lockup",
    "hung_task",
    "---[ end trace",
];

/// After a crash marker, how long to keep reading for the rest of the report before QEMU is
/// killed: the trace is what makes the log worth keeping.
const CRASH_GRACE: Duration = Duration::from_secs(5);

/// How the boot ended, before the test lines are looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootEnd {
    /// `/init` printed the result marker with this exit status.
    Result(i32),
    /// A crash marker: the first such line.
    Crash(String),
    TimedOut,
    /// QEMU exited without a marker (bad image, init died, …).
    NoMarker,
}

pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// `NAME=value` words: passed to `/init` as environment by the kernel.
    pub env: &'a [(String, String)],
    pub cpus: u32,
    pub timeout: Duration,
    pub log: &'a Path,
}

enum Event {
    Line(String),
    Eof,
}

/// What the guest printed, and how the boot ended.
pub struct Console {
    pub end: BootEnd,
    /// Each serial line with its arrival time since QEMU started: tells how long each test
    /// took, which libtest itself reports only on nightly.
    pub lines: Vec<(Duration, String)>,
}

/// Boots and returns how it ended; the serial console is copied to `boot.log` line by line.
pub fn boot(boot: &Boot<'_>) -> anyhow::Result<Console> {
    let mut log =
        File::create(boot.log).with_context(|| format!("creating {}", boot.log.display()))?;
    let mut child = spawn(boot)?;
    let lines = follow_stdout(&mut child);
    let end = watch(&lines, &mut log, boot.timeout);
    // NB: QEMU exits on its own after `poweroff -f` or a panic (-no-reboot); kill() covers the
    // deadline and crash cases and is harmless on a process that already exited.
    let _ = child.kill();
    child.wait().context("waiting for qemu")?;
    let console = end?;
    writeln!(log, "\n[xtask] boot ended: {:?}", console.end).context("writing the serial log")?;
    Ok(console)
}

fn spawn(boot: &Boot<'_>) -> anyhow::Result<Child> {
    // NB: printk.time=1 gives kernel lines a `[ seconds]` prefix, which is how they are told
    // apart from test output that happens to contain "BUG:" or "Oops".
    let mut append =
        String::from("console=ttyS0 panic=-1 oops=panic loglevel=4 quiet printk.time=1");
    for (name, value) in boot.env {
        append.push_str(&format!(" {name}={value}"));
    }
    Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1024"])
        .args(["-smp", &boot.cpus.to_string()])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(boot.kernel)
        .arg("-initrd")
        .arg(boot.initrd)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")
}

/// Serial output as a channel of lines, so the watcher can wait with a deadline.
fn follow_stdout(child: &mut Child) -> mpsc::Receiver<Event> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // NB: split on bytes: a guest can print anything, and one bad byte must not end the log.
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_owned();
            if tx.send(Event::Line(text)).is_err() {
                return;
            }
        }
        let _ = tx.send(Event::Eof);
    });
    rx
}

fn watch(
    lines: &mpsc::Receiver<Event>,
    log: &mut File,
    timeout: Duration,
) -> anyhow::Result<Console> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut seen = Vec::new();
    let mut crash: Option<(String, Instant)> = None;
    let mut result = None;
    let mut timed_out = false;
    loop {
        let until = crash
            .as_ref()
            .map_or(deadline, |(_, grace)| (*grace).min(deadline));
        let event = lines.recv_timeout(until.saturating_duration_since(Instant::now()));
        let line = match event {
            Ok(Event::Line(line)) => line,
            Ok(Event::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if crash.is_some() => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
        };
        writeln!(log, "{line}").context("writing the serial log")?;
        if let Some(code) = line.trim().strip_prefix(RESULT_MARKER) {
            result = Some(code.trim().parse().unwrap_or(-1));
        }
        if crash.is_none() && is_kernel_crash(&line) {
            crash = Some((line.trim().to_owned(), Instant::now() + CRASH_GRACE));
        }
        let report_done =
            crash.is_some() && kernel_message(&line).is_some_and(|m| m.starts_with("---[ end "));
        seen.push((started.elapsed(), line));
        if report_done {
            break;
        }
    }
    let end = match (crash, result) {
        (Some((line, _)), _) => BootEnd::Crash(line),
        (None, Some(code)) => BootEnd::Result(code),
        (None, None) if timed_out => BootEnd::TimedOut,
        (None, None) => BootEnd::NoMarker,
    };
    Ok(Console { end, lines: seen })
}

fn is_kernel_crash(line: &str) -> bool {
    kernel_message(line).is_some_and(|m| CRASH_MARKERS.iter().any(|marker| m.contains(marker)))
}

/// The text of a kernel log line (`[    1.234567] text`), or None for anything else.
fn kernel_message(line: &str) -> Option<&str> {
    let (stamp, text) = line.trim_start().strip_prefix('[')?.split_once(']')?;
    let stamp = stamp.trim();
    let is_time = !stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    is_time.then(|| text.trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch_lines(lines: &[&str], eof: bool) -> Console {
        let (tx, rx) = mpsc::channel();
        for line in lines {
            tx.send(Event::Line((*line).to_owned()))
                .expect("receiver alive");
        }
        if eof {
            tx.send(Event::Eof).expect("receiver alive");
        }
        let mut log = tempfile::tempfile().expect("temp log");
        let console = watch(&rx, &mut log, Duration::from_millis(200)).expect("watch");
        drop(tx);
        console
    }

    #[test]
    fn verdict_comes_from_the_marker() {
        let console = watch_lines(&["test a ... ok", "REUSEPORT-VM-RESULT: exit=101"], true);
        assert_eq!(console.end, BootEnd::Result(101));
        assert_eq!(watch_lines(&["booting"], true).end, BootEnd::NoMarker);
    }

    #[test]
    fn kernel_panic_ends_the_boot_after_its_report() {
        let console = watch_lines(
            &[
                "[    2.1] Kernel panic - not syncing: Attempted to kill init!",
                "[    2.2] ---[ end Kernel panic - not syncing: Attempted to kill init! ]---",
                "never read",
            ],
            false,
        );
        assert!(matches!(console.end, BootEnd::Crash(ref l) if l.contains("Kernel panic")));
        assert_eq!(
            console.lines.len(),
            2,
            "reading should stop at the end of the report"
        );
    }

    #[test]
    fn silence_past_the_deadline_is_a_timeout() {
        assert_eq!(watch_lines(&["booting"], false).end, BootEnd::TimedOut);
    }

    #[test]
    fn crash_markers_count_only_on_kernel_lines() {
        assert!(is_kernel_crash(
            "[    2.104521] Kernel panic - not syncing: Attempted to kill init!"
        ));
        assert!(is_kernel_crash(
            "[   12.000001] BUG: kernel NULL pointer dereference, address: 0"
        ));
        assert!(is_kernel_crash(
            "[    3.5] ---[ end trace 0000000000000000 ]---"
        ));
        assert!(!is_kernel_crash(
            "thread 'main' panicked: Oops, listener A missing"
        ));
        assert!(!is_kernel_crash("[ok] BUG: not a kernel line"));
    }
}
