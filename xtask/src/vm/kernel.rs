//! Guest kernels from Debian 12's package sources: resolve a spec to a package name at run
//! time, fetch and unpack it once into `target/vm/`, and hand back a bootable image.
//!
//! NB: versioned package names change with every Debian update, so nothing here names one;
//! the meta package (6.1) or the newest match in the index (6.12) decides.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, anyhow, bail};

use super::cmd::{output_of, run_quiet};

/// Flavour used for every series: the cloud kernels boot fastest under TCG (no xz, fewer
/// drivers probing for hardware that is not there).
const FLAVOUR: &str = "cloud-amd64";

/// A kernel package unpacked under `target/vm/kernels/<package>/`.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub package: String,
    /// What QEMU's `-kernel` gets: the decompressed ELF when extraction worked, else the bzImage.
    pub image: PathBuf,
    pub modules: GuestModules,
}

/// A kernel's `uname -r` and the modules its guest loads at boot ([`GUEST_MODULES`]), in load
/// order, uncompressed: (file name, bytes).
#[derive(Debug, Clone, Default)]
pub struct GuestModules {
    pub release: String,
    pub files: Vec<(String, Vec<u8>)>,
}

/// Modules the tests need that the cloud kernels build as modules: TCP sock_diag, which the
/// agent's live figures (and `ss`) query. The guest has no modprobe and no module index.
const GUEST_MODULES: [&str; 2] = ["net/ipv4/inet_diag", "net/ipv4/tcp_diag"];

/// Turns `6.1`, `6.12` or an exact package name into a package name with an install candidate.
/// Runs `apt-get update` at most once, and only when the index does not know the answer yet.
pub fn resolve(spec: &str, apt_updated: &mut bool) -> anyhow::Result<String> {
    if let Some(package) = try_resolve(spec)? {
        return Ok(package);
    }
    if !*apt_updated {
        ensure_security_suite()?;
        apt_update()?;
        *apt_updated = true;
        if let Some(package) = try_resolve(spec)? {
            return Ok(package);
        }
    }
    bail!(
        "no Debian package found for kernel spec {spec:?} (expected 6.1, 6.12 or an exact \
         linux-image-… name; 6.12 comes from the bookworm-security suite)"
    )
}

fn try_resolve(spec: &str) -> anyhow::Result<Option<String>> {
    let package = match spec {
        // NB: the unversioned meta package follows Debian 12's own kernel, 6.1.
        "6.1" => meta_dependency(&format!("linux-image-{FLAVOUR}"))?,
        series if is_series(series) => newest_in_series(series)?,
        exact => Some(exact.to_owned()),
    };
    Ok(package.filter(|p| has_candidate(p)))
}

fn is_series(spec: &str) -> bool {
    let mut parts = spec.split('.');
    let numeric =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    numeric(parts.next()) && numeric(parts.next()) && parts.next().is_none()
}

/// The versioned image a meta package depends on (`apt-cache depends`).
fn meta_dependency(meta: &str) -> anyhow::Result<Option<String>> {
    let out = output_of(Command::new("apt-cache").args(["depends", meta]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|dep| dep.starts_with("linux-image-"))
        .map(str::to_owned))
}

/// The newest `linux-image-<series>.<patch>+deb12-<flavour>` in the index. Compared by the
/// numeric patch level: `6.12.100` is newer than `6.12.99`.
fn newest_in_series(series: &str) -> anyhow::Result<Option<String>> {
    let pattern = format!(
        "^linux-image-{}\\.[0-9]+\\+deb12-{FLAVOUR}$",
        series.replace('.', "\\.")
    );
    let out = output_of(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
    let prefix = format!("linux-image-{series}.");
    let suffix = format!("+deb12-{FLAVOUR}");
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let patch = name.strip_prefix(&prefix)?.strip_suffix(&suffix)?;
            Some((patch.parse::<u32>().ok()?, name))
        })
        .max()
        .map(|(_, name)| name.to_owned()))
}

fn has_candidate(package: &str) -> bool {
    output_of(Command::new("apt-cache").args(["policy", package])).is_ok_and(|out| {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("Candidate:"))
            .any(|c| c.trim() != "(none)")
    })
}

fn apt_update() -> anyhow::Result<()> {
    eprintln!("vm: apt-get update (the package index does not know the kernel yet)");
    run_quiet(Command::new("apt-get").args(["update", "-q"])).context("apt-get update")
}

/// 6.12 lives in bookworm-security. Debian 12 images list it; a trimmed one may not.
fn ensure_security_suite() -> anyhow::Result<()> {
    let mut sources = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        sources.extend(dir.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    let listed = sources
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .any(|text| text.contains("bookworm-security"));
    if listed {
        return Ok(());
    }
    let path = "/etc/apt/sources.list.d/bookworm-security.sources";
    eprintln!("vm: adding {path} (6.12 kernels come from bookworm-security)");
    fs::write(
        path,
        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\
         Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    )
    .with_context(|| format!("writing {path}"))
}

/// Downloads and unpacks `package` unless an earlier run did; returns the bootable image.
pub fn fetch(package: &str, vm_dir: &Path) -> anyhow::Result<Kernel> {
    let root = vm_dir.join("kernels").join(package);
    let stamp = root.join(".unpacked");
    if !stamp.exists() {
        let deb = download(package, &vm_dir.join("debs"))?;
        unpack(&deb, &root)?;
        fs::write(&stamp, "").with_context(|| format!("writing {}", stamp.display()))?;
    }
    let bz_image = find_vmlinuz(&root)?;
    let image = decompressed_image(&bz_image, &root).unwrap_or_else(|e| {
        eprintln!("vm: booting the bzImage of {package} (slower under TCG): {e:#}");
        bz_image
    });
    let modules = guest_modules(&root).unwrap_or_else(|e| {
        eprintln!("vm: {package}: no sock_diag modules for the guest (live figures fail): {e:#}");
        GuestModules::default()
    });
    Ok(Kernel {
        package: package.to_owned(),
        image,
        modules,
    })
}

/// [`GUEST_MODULES`] from the unpacked package: `[usr/]lib/modules/<release>/kernel/<name>.ko`,
/// possibly `.xz` or `.zst` compressed (busybox `insmod` loads only plain ones).
fn guest_modules(root: &Path) -> anyhow::Result<GuestModules> {
    // NB: the 7.x packages install under usr/lib/modules.
    let base = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|b| root.join(b))
        .find(|b| b.is_dir())
        .unwrap_or_else(|| root.join("lib/modules"));
    let release = fs::read_dir(&base)
        .with_context(|| format!("reading {}", base.display()))?
        .flatten()
        .find(|e| e.path().is_dir())
        .and_then(|e| e.file_name().into_string().ok())
        .ok_or_else(|| anyhow!("no release directory in {}", base.display()))?;
    let mut out = Vec::new();
    for module in GUEST_MODULES {
        let stem = base.join(&release).join("kernel").join(module);
        let name = format!("{}.ko", module.rsplit('/').next().unwrap_or(module));
        let plain = stem.with_extension("ko");
        let bytes = if plain.exists() {
            fs::read(&plain)?
        } else if let Ok(xz) = fs::read(stem.with_extension("ko.xz")) {
            pipe_through(&["xz", "-dc"], &xz)?
        } else if let Ok(zst) = fs::read(stem.with_extension("ko.zst")) {
            pipe_through(&["zstd", "-dc"], &zst)?
        } else {
            // Built in, or absent: either way nothing to load.
            continue;
        };
        out.push((name, bytes));
    }
    Ok(GuestModules {
        release,
        files: out,
    })
}

fn download(package: &str, debs: &Path) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(debs).with_context(|| format!("creating {}", debs.display()))?;
    if let Some(deb) = find_deb(package, debs)? {
        return Ok(deb);
    }
    eprintln!("vm: downloading {package}");
    // NB: apt drops to the `_apt` user for downloads, which cannot write into target/;
    // it falls back to root with a warning. Ask for root outright to keep the output clean.
    run_quiet(
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", package])
            .current_dir(debs),
    )
    .with_context(|| format!("downloading {package}"))?;
    find_deb(package, debs)?.ok_or_else(|| {
        anyhow!(
            "apt-get download {package} left no .deb in {}",
            debs.display()
        )
    })
}

fn find_deb(package: &str, debs: &Path) -> anyhow::Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    let found = fs::read_dir(debs)
        .with_context(|| format!("listing {}", debs.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        });
    Ok(found)
}

fn unpack(deb: &Path, root: &Path) -> anyhow::Result<()> {
    // NB: a half-unpacked tree from an interrupted run has no stamp; start it over.
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("removing stale {}", root.display()))?;
    }
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    run_quiet(Command::new("dpkg").arg("-x").arg(deb).arg(root))
        .with_context(|| format!("unpacking {}", deb.display()))
}

fn find_vmlinuz(root: &Path) -> anyhow::Result<PathBuf> {
    let boot = root.join("boot");
    fs::read_dir(&boot)
        .with_context(|| format!("listing {}", boot.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| anyhow!("no vmlinuz-* in {}", boot.display()))
}

/// The ELF inside the bzImage, cached as `<root>/vmlinux`. QEMU boots it through the PVH
/// entry point, which skips the in-guest decompressor: 0.5–1.3 s less per boot under TCG.
fn decompressed_image(bz_image: &Path, root: &Path) -> anyhow::Result<PathBuf> {
    let out = root.join("vmlinux");
    if out.exists() {
        return Ok(out);
    }
    let data = fs::read(bz_image).with_context(|| format!("reading {}", bz_image.display()))?;
    let payload = bz_payload(&data)?;
    let elf = decompress(payload)?;
    if !elf.starts_with(b"\x7fELF") {
        bail!(
            "decompressed payload of {} is not an ELF file",
            bz_image.display()
        );
    }
    let tmp = root.join("vmlinux.tmp");
    fs::write(&tmp, &elf).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(out)
}

/// The compressed kernel inside a bzImage, per the x86 boot protocol ≥ 2.08
/// (Documentation/arch/x86/boot.rst: setup_sects at 0x1f1, payload_offset/length at 0x248).
fn bz_payload(data: &[u8]) -> anyhow::Result<&[u8]> {
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(off..off + 4)?.try_into().ok()?))
    };
    if data.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not a bzImage (no HdrS signature)");
    }
    let setup_sects = match data[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let (Some(offset), Some(length)) = (u32_at(0x248), u32_at(0x24c)) else {
        bail!("bzImage header is truncated");
    };
    let start = (setup_sects + 1) * 512 + offset as usize;
    data.get(start..start + length as usize)
        .ok_or_else(|| anyhow!("bzImage payload lies outside the file"))
}

/// Decompresses with the matching command-line tool. NB: the kernel build appends the
/// uncompressed size (4 bytes, little endian) after lz4/zstd/xz/lzma streams; the tools
/// reject that as trailing garbage, so it is cut off and used to check the result instead.
fn decompress(payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let tool: &[&str] = match payload {
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dcq"],
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dcq"],
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => &["xz", "-dc"],
        _ => bail!(
            "unknown compression (magic {:02x?})",
            &payload[..payload.len().min(6)]
        ),
    };
    let (stream, size) = match payload.split_last_chunk::<4>() {
        Some((stream, size)) if tool[0] != "gzip" => {
            (stream, Some(u32::from_le_bytes(*size) as usize))
        }
        _ => (payload, None),
    };
    let elf = pipe_through(tool, stream)?;
    if let Some(size) = size.filter(|&s| s != elf.len()) {
        bail!(
            "{} produced {} bytes, the bzImage says {size}",
            tool[0],
            elf.len()
        );
    }
    Ok(elf)
}

fn pipe_through(tool: &[&str], input: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", tool[0]))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // NB: write from another thread: the tool fills its stdout pipe long before it has read
    // all its input, and nobody would drain it while this thread blocks writing.
    let out = std::thread::scope(|s| {
        s.spawn(move || stdin.write_all(input));
        child.wait_with_output()
    })
    .with_context(|| format!("running {}", tool[0]))?;
    if !out.status.success() {
        bail!(
            "{} exited with {}: {}",
            tool[0],
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::is_series;

    #[test]
    fn series_specs_are_two_numbers() {
        assert!(is_series("6.1"));
        assert!(is_series("6.12"));
        assert!(!is_series("6"));
        assert!(!is_series("6.12.1"));
        assert!(!is_series("linux-image-6.1.0-56-cloud-amd64"));
    }
}
