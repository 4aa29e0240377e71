//! The guest's whole userspace: busybox, the static binaries, the test executables and an
//! `/init` that runs the tests and reports on the serial console.
//!
//! The archive is written here in Rust (newc cpio) rather than with `cpio` from a staging
//! directory: `/dev/console` is a plain archive entry, so no `mknod` (and no root) is needed,
//! and a file's bytes go straight from `target/` into the archive.

use std::fs::{self, File};
use std::io::{BufWriter, Write as _};
use std::path::Path;

use anyhow::Context as _;

use super::binaries::{Artifact, GuestBinaries};
use super::kernel::GuestModules;
use super::tools::BUSYBOX;

/// Printed by `/init` once every test executable ran; the only source of the verdict.
pub const RESULT_MARKER: &str = "REUSEPORT-VM-RESULT: exit=";
/// Printed by `/init` before the tests: the guest's `uname -r`.
pub const RELEASE_MARKER: &str = "REUSEPORT-VM-UNAME: ";
/// Printed by `/init` before each test executable.
pub const EXEC_MARKER: &str = "REUSEPORT-VM-EXEC: ";

/// Writes `out` (uncompressed newc). `test_args` go to every test executable (filters…).
///
/// NB: left uncompressed on purpose: QEMU loads it from the host page cache in no time,
/// while inflating even `gzip -1` runs as emulated code under TCG (timings: `vm` module docs).
/// `modules`: per kernel release, the modules its guest loads at boot; one initramfs serves
/// every kernel, `/init` loads those of the release it booted.
pub fn write(
    out: &Path,
    binaries: &GuestBinaries,
    modules: &[GuestModules],
    test_args: &[String],
) -> anyhow::Result<()> {
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut cpio = Cpio::new(BufWriter::new(file));
    for dir in ["bin", "dev", "proc", "sys", "tmp", "run", "root", "tests"] {
        cpio.dir(dir)?;
    }
    cpio.char_device("dev/console", 5, 1)?;
    cpio.file(
        "init",
        0o755,
        init_script(&binaries.tests, test_args).as_bytes(),
    )?;
    cpio.file_from("bin/busybox", Path::new(BUSYBOX))?;
    for bin in &binaries.bins {
        cpio.file_from(&format!("bin/{}", bin.name), &bin.path)?;
    }
    for test in &binaries.tests {
        cpio.file_from(&format!("tests/{}", test.name), &test.path)?;
    }
    cpio.dir("lib")?;
    cpio.dir("lib/modules")?;
    let mut written = std::collections::HashSet::new();
    for GuestModules { release, files } in modules.iter().filter(|m| !m.release.is_empty()) {
        if !written.insert(release) {
            continue;
        }
        cpio.dir(&format!("lib/modules/{release}"))?;
        for (i, (name, bytes)) in files.iter().enumerate() {
            // NB: numbered, so that the shell's glob loads them in dependency order.
            cpio.file(&format!("lib/modules/{release}/{i}-{name}"), 0o644, bytes)?;
        }
    }
    cpio.finish()?
        .flush()
        .with_context(|| format!("writing {}", out.display()))
}

/// The guest's PID 1. Extra environment (`REUSEPORT_SELECT_ONLY=1`, …) comes from the kernel
/// command line: the kernel hands `NAME=value` words it does not know to init as environment,
/// so one initramfs serves every matrix column.
fn init_script(tests: &[Artifact], test_args: &[String]) -> String {
    let args: String = test_args
        .iter()
        .map(|a| format!(" {}", shell_quote(a)))
        .collect();
    let runs: String = tests
        .iter()
        .map(|t| {
            format!(
                "echo '{EXEC_MARKER}{name}'\n/tests/{name} --test-threads=1 --show-output{args} || rc=$?\n",
                name = t.name
            )
        })
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
# REUSEPORT_VM=1 lets a test scale its load down: everything here runs emulated (TCG).
export PATH=/bin HOME=/root REUSEPORT_BIN_DIR=/bin REUSEPORT_VM=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# NB: no bpffs at /sys/fs/bpf, as on a fresh host: each test mounts one of its own, and an
# agent that finds none mounts it (tests check how).
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ip link set lo up
for m in /lib/modules/$(uname -r)/*.ko; do [ -e "$m" ] && insmod "$m"; done
echo "{RELEASE_MARKER}$(uname -r)"
rc=0
# NB: --show-output, not --nocapture: a passing test's stdout (its SKIP: line) is printed
# after the run instead of being cut into the middle of its `test NAME ... ok` line.
{runs}echo "{RESULT_MARKER}$rc"
poweroff -f
"#
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A newc ("070701") cpio writer: a fixed ASCII header per entry, name and data each padded
/// to 4 bytes, closed by a `TRAILER!!!` entry (Documentation/driver-api/early-userspace/
/// buffer-format.rst).
struct Cpio<W: std::io::Write> {
    out: W,
    ino: u32,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

impl<W: std::io::Write> Cpio<W> {
    fn new(out: W) -> Self {
        Self { out, ino: 0 }
    }

    fn dir(&mut self, name: &str) -> anyhow::Result<()> {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[])
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) -> anyhow::Result<()> {
        self.entry(name, S_IFCHR | 0o600, (major, minor), &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> anyhow::Result<()> {
        self.entry(name, S_IFREG | perm, (0, 0), data)
    }

    fn file_from(&mut self, name: &str, src: &Path) -> anyhow::Result<()> {
        let data = fs::read(src)
            .with_context(|| format!("reading {} for the initramfs", src.display()))?;
        self.file(name, 0o755, &data)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> anyhow::Result<()> {
        self.ino += 1;
        let size = u32::try_from(data.len()).context("file too large for newc cpio")?;
        let name_size = u32::try_from(name.len() + 1).context("name too long")?;
        let fields = [
            self.ino, mode, 0, 0, 1, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0,
        ];
        let mut header = String::from("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(header.len() + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())?;
        Ok(())
    }

    fn pad(&mut self, len: usize) -> anyhow::Result<()> {
        self.out.write_all(&[0; 3][..(4 - len % 4) % 4])?;
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::Cpio;

    #[test]
    fn newc_entries_are_aligned() {
        let mut cpio = Cpio::new(Vec::new());
        cpio.file("init", 0o755, b"hello").expect("in-memory write");
        let out = cpio.finish().expect("in-memory write");
        assert!(out.starts_with(b"070701"), "newc magic first");
        assert_eq!(out.len() % 4, 0, "archive should end on a 4-byte boundary");
        let trailer = out
            .windows(10)
            .position(|w| w == b"TRAILER!!!")
            .expect("trailer present");
        assert_eq!(
            (trailer - 110) % 4,
            0,
            "trailer header should start 4-byte aligned"
        );
    }
}
