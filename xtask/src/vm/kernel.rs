//! Guest kernels from Debian's package sources: a column's spec is resolved to a package at
//! run time through a private apt configuration per Debian release (see [`super::apt`]; the
//! host's sources are never changed), downloaded and reduced to a bootable image once per
//! package version, in a cache outside the clone: `CACHE_ROOT/kernels/<package>_<version>/`.
//! A second run, or a fresh clone on the same machine, boots from there.
//!
//! NB: versioned package names change with every Debian update, so nothing here names one;
//! a meta package or the newest match in the lists decides.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, anyhow, bail};

use super::apt::{BOOKWORM, BULLSEYE, PrivateApt, Release, SID};
use super::cmd::run_quiet;

/// Where kernels and the private apt lists are kept between runs.
pub const CACHE_ROOT: &str = "/var/cache/reuseport-tests";

/// Flavour used for every series: the cloud kernels boot fastest under TCG (no xz, fewer
/// drivers probing for hardware that is not there).
const FLAVOUR: &str = "cloud-amd64";

/// How a series finds its newest image package.
#[derive(Debug, Clone, Copy)]
enum Find {
    /// What `linux-image-<flavour>` depends on.
    Meta,
    /// The newest `linux-image-<series>.<patch><suffix>-<flavour>` in the lists.
    Newest(&'static str),
}

/// The specs a column may name, besides an exact package name.
const SERIES: &[(&str, Release, Find)] = &[
    // bullseye's kernel: the newest before 5.14, i.e. select-only for real.
    ("5.10", BULLSEYE, Find::Meta),
    // NB: bookworm's meta package follows its own kernel, 6.1.
    ("6.1", BOOKWORM, Find::Meta),
    ("6.12", BOOKWORM, Find::Newest("+deb12")),
    ("sid", SID, Find::Meta),
];

/// The releases an exact package name is looked up in, in order.
const RELEASES: &[Release] = &[BOOKWORM, BULLSEYE, SID];

/// A bootable kernel of one package version.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The package holding the kernel image (`linux-image-…`, from 7.x on `linux-binary-…`).
    pub package: String,
    pub version: String,
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

impl Kernel {
    /// `(major, minor)` of the kernel, from its package name (`linux-image-5.10.0-32-…`,
    /// `linux-binary-7.2.13+deb14-…`).
    pub fn series(&self) -> Option<(u32, u32)> {
        series_of(&self.package)
    }
}

fn series_of(package: &str) -> Option<(u32, u32)> {
    let rest = package
        .strip_prefix("linux-image-")
        .or_else(|| package.strip_prefix("linux-binary-"))?;
    let mut numbers = rest.split(|c: char| !c.is_ascii_digit());
    Some((numbers.next()?.parse().ok()?, numbers.next()?.parse().ok()?))
}

/// Resolves specs and fetches their kernels; one private apt configuration per release.
pub struct Kernels {
    root: PathBuf,
    apts: Vec<PrivateApt>,
}

impl Kernels {
    pub fn new() -> anyhow::Result<Self> {
        let root = PathBuf::from(CACHE_ROOT);
        fs::create_dir_all(root.join("kernels"))
            .with_context(|| format!("creating {}/kernels", root.display()))?;
        Ok(Self {
            root,
            apts: Vec::new(),
        })
    }

    fn apt(&mut self, release: Release) -> anyhow::Result<&mut PrivateApt> {
        let i = match self.apts.iter().position(|a| a.release() == release) {
            Some(i) => i,
            None => {
                let mut apt = PrivateApt::new(release, &self.root.join("apt"))?;
                apt.ensure_lists()?;
                self.apts.push(apt);
                self.apts.len() - 1
            }
        };
        Ok(&mut self.apts[i])
    }

    /// The kernel for `spec` (`5.10`, `6.1`, `6.12`, `sid` or an exact `linux-image-…` name).
    pub fn get(&mut self, spec: &str) -> anyhow::Result<Kernel> {
        let (release, find) = match SERIES.iter().find(|(s, _, _)| *s == spec) {
            Some((_, release, find)) => (*release, Some(*find)),
            None if spec.starts_with("linux-image-") || spec.starts_with("linux-binary-") => {
                (self.release_of(spec)?, None)
            }
            None => bail!(
                "unknown kernel spec {spec:?}: expected one of {} or an exact linux-image-… \
                 package name",
                SERIES.iter().map(|s| s.0).collect::<Vec<_>>().join(", ")
            ),
        };
        let root = self.root.clone();
        let apt = self.apt(release)?;
        let packages = match resolve(apt, spec, find)? {
            Some(found) => found,
            None if apt.update_again()? => resolve(apt, spec, find)?.ok_or_else(|| {
                anyhow!(
                    "no {} kernel package for {spec:?} in {}",
                    FLAVOUR,
                    release.name
                )
            })?,
            None => bail!(
                "no {FLAVOUR} kernel package for {spec:?} in {}",
                release.name
            ),
        };
        let (package, version) = packages.image.clone();
        fetch(apt, &packages, &root.join("kernels"))
            .with_context(|| format!("fetching {package} {version}"))
    }

    fn release_of(&mut self, package: &str) -> anyhow::Result<Release> {
        for release in RELEASES {
            if self.apt(*release)?.candidate(package).is_some() {
                return Ok(*release);
            }
        }
        bail!(
            "no Debian release offers {package} (looked in {})",
            RELEASES
                .iter()
                .map(|r| r.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// What to download for a kernel: the package holding its image and the one holding its
/// modules (the same one up to 6.x), each with its version.
struct Packages {
    image: (String, String),
    modules: Option<(String, String)>,
}

/// The packages for `spec`; `None` when the lists do not know them.
fn resolve(apt: &PrivateApt, spec: &str, find: Option<Find>) -> anyhow::Result<Option<Packages>> {
    let image = match find {
        Some(Find::Meta) => apt
            .depends(&format!("linux-image-{FLAVOUR}"))?
            .into_iter()
            .find(|d| d.starts_with("linux-image-")),
        Some(Find::Newest(suffix)) => newest_in_series(apt, spec, suffix)?,
        None => Some(spec.to_owned()),
    };
    let Some(image) = image else { return Ok(None) };
    // NB: from 7.x on, linux-image-VERSION-FLAVOUR is itself a meta package: the kernel is in
    // linux-binary-VERSION-FLAVOUR (at usr/lib/modules/VERSION/vmlinuz), the modules in
    // linux-modules-VERSION-FLAVOUR.
    let depends = apt.depends(&image)?;
    let with_version = |p: String| apt.candidate(&p).map(|v| (p, v));
    let binary = depends
        .iter()
        .find(|d| d.starts_with("linux-binary-"))
        .cloned();
    let modules = depends
        .iter()
        .find(|d| d.starts_with("linux-modules-"))
        .cloned()
        .and_then(with_version);
    let Some(image) = with_version(binary.unwrap_or(image)) else {
        return Ok(None);
    };
    Ok(Some(Packages { image, modules }))
}

/// The newest `linux-image-<series>.<patch><suffix>-<flavour>`. Compared by the numeric patch
/// level: `6.12.100` is newer than `6.12.99`.
fn newest_in_series(
    apt: &PrivateApt,
    series: &str,
    suffix: &str,
) -> anyhow::Result<Option<String>> {
    let pattern = format!(
        "^linux-image-{}\\.[0-9]+{}-{FLAVOUR}$",
        series.replace('.', "\\."),
        suffix.replace('+', "\\+")
    );
    let out = apt.cache(&["search", "--names-only", &pattern])?;
    let prefix = format!("linux-image-{series}.");
    let suffix = format!("{suffix}-{FLAVOUR}");
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

/// The bootable image and the guest's modules of a kernel, downloaded and unpacked unless an
/// earlier run left them in `kernels/<package>_<version>/` (`vmlinuz`, `vmlinux`,
/// `modules/<release>/<n>-<name>.ko`).
fn fetch(apt: &mut PrivateApt, packages: &Packages, kernels: &Path) -> anyhow::Result<Kernel> {
    let (package, version) = &packages.image;
    let dir = kernels.join(format!("{package}_{}", version.replace(':', "%3a")));
    let done = dir.join(".complete");
    // NB: runs on one machine (two checkouts, two agents) share the cache: one unpacks a
    // kernel and decompresses its image, the others wait and then find them done.
    let lock = fs::File::create(kernels.join(".lock"))
        .with_context(|| format!("creating {}/.lock", kernels.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}/.lock", kernels.display()))?;
    if !done.exists() {
        let work = kernels.join(format!(".unpacking-{}-{package}", std::process::id()));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let res = unpack(apt, packages, &work, &dir);
        let _ = fs::remove_dir_all(&work);
        res?;
        fs::write(&done, "").with_context(|| format!("writing {}", done.display()))?;
    }
    let bz_image = dir.join("vmlinuz");
    let image = decompressed_image(&bz_image, &dir).unwrap_or_else(|e| {
        eprintln!("vm: booting the bzImage of {package} (slower under TCG): {e:#}");
        bz_image
    });
    let modules = cached_modules(&dir.join("modules")).unwrap_or_else(|e| {
        eprintln!("vm: {package}: no sock_diag modules for the guest (live figures fail): {e:#}");
        GuestModules::default()
    });
    Ok(Kernel {
        package: package.clone(),
        version: version.clone(),
        image,
        modules,
    })
}

/// Downloads the packages into `work`, unpacks them there and keeps only what the guest
/// needs in `dir`: the kernel (`vmlinuz`) and [`GUEST_MODULES`] (`modules/`).
fn unpack(
    apt: &mut PrivateApt,
    packages: &Packages,
    work: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let root = work.join("root");
    for (package, version) in std::iter::once(&packages.image).chain(&packages.modules) {
        eprintln!(
            "vm: downloading {package} {version} ({})",
            apt.release().name
        );
        let debs = work.join(package);
        fs::create_dir_all(&debs)?;
        if let Err(e) = apt.download(package, version, &debs) {
            // NB: a version the mirror dropped since the lists were fetched.
            if !apt.update_again()? {
                return Err(e);
            }
            apt.download(package, version, &debs)?;
        }
        let deb = fs::read_dir(&debs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| anyhow!("apt-get download left no .deb in {}", debs.display()))?;
        run_quiet(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))
            .with_context(|| format!("unpacking {}", deb.display()))?;
    }
    let vmlinuz = find_vmlinuz(&root)?;
    // NB: a half-written directory from an interrupted run has no `.complete`: replace it.
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::copy(&vmlinuz, dir.join("vmlinuz"))
        .with_context(|| format!("copying {}", vmlinuz.display()))?;
    match guest_modules(&root) {
        Ok(GuestModules { release, files }) => {
            let out = dir.join("modules").join(&release);
            fs::create_dir_all(&out)?;
            for (i, (name, bytes)) in files.iter().enumerate() {
                fs::write(out.join(format!("{i}-{name}")), bytes)?;
            }
        }
        Err(e) => eprintln!("vm: no guest modules in the package: {e:#}"),
    }
    Ok(())
}

/// The modules [`unpack`] kept: `modules/<release>/<n>-<name>`, in load order.
fn cached_modules(modules: &Path) -> anyhow::Result<GuestModules> {
    let release_dir = fs::read_dir(modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .flatten()
        .find(|e| e.path().is_dir())
        .ok_or_else(|| anyhow!("no release directory in {}", modules.display()))?;
    let release = release_dir
        .file_name()
        .into_string()
        .map_err(|_| anyhow!("a release that is not UTF-8"))?;
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(release_dir.path())?
        .flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .map(|(name, path)| Ok((name, fs::read(path)?)))
        .collect::<anyhow::Result<_>>()?;
    files.sort_by_key(|(name, _)| {
        name.split('-')
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(u32::MAX)
    });
    let files = files
        .into_iter()
        .map(|(name, bytes)| {
            let plain = name
                .split_once('-')
                .map_or(name.clone(), |(_, n)| n.to_owned());
            (plain, bytes)
        })
        .collect();
    Ok(GuestModules { release, files })
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

/// `boot/vmlinuz-*` (up to 6.x) or `usr/lib/modules/*/vmlinuz` (7.x) in an unpacked package.
fn find_vmlinuz(root: &Path) -> anyhow::Result<PathBuf> {
    let in_boot = fs::read_dir(root.join("boot")).ok().and_then(|entries| {
        entries.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
    });
    let in_modules = || {
        fs::read_dir(root.join("usr/lib/modules"))
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("vmlinuz")))
            .find(|p| p.is_file())
    };
    in_boot
        .or_else(in_modules)
        .ok_or_else(|| anyhow!("no boot/vmlinuz-* or usr/lib/modules/*/vmlinuz in the package"))
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
    use super::series_of;

    #[test]
    fn series_comes_from_the_package_name() {
        assert_eq!(
            series_of("linux-image-5.10.0-32-cloud-amd64"),
            Some((5, 10))
        );
        assert_eq!(
            series_of("linux-image-6.12.57+deb12-cloud-amd64"),
            Some((6, 12))
        );
        assert_eq!(
            series_of("linux-binary-7.2.13+deb14-cloud-amd64"),
            Some((7, 2))
        );
        assert_eq!(series_of("linux-image-cloud-amd64"), None);
    }
}
