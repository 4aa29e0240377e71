//! A private apt configuration per Debian release: its own sources list, package lists and
//! cache under [`super::kernel::CACHE_ROOT`], so the guest kernels can come from other Debian
//! releases (bullseye, sid) than the host's without the host's sources ever changing.
//!
//! NB: `Dir::Etc::sourceparts=/dev/null` keeps the host's `sources.list.d` out and
//! `Dir::State::status=/dev/null` its installed packages; the rest of the host's apt
//! configuration (proxies, mirrors) still applies.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;

use super::cmd::{output_of, run_quiet};

/// Package lists older than this are fetched again before a kernel is resolved.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

const DEBIAN: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A Debian release and the archive suites its kernels come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    pub name: &'static str,
    /// (archive URL, suite), each with `main`.
    suites: &'static [(&'static str, &'static str)],
}

pub const BULLSEYE: Release = Release {
    name: "bullseye",
    suites: &[(DEBIAN, "bullseye"), (SECURITY, "bullseye-security")],
};

pub const BOOKWORM: Release = Release {
    name: "bookworm",
    suites: &[
        (DEBIAN, "bookworm"),
        (DEBIAN, "bookworm-updates"),
        (SECURITY, "bookworm-security"),
    ],
};

pub const SID: Release = Release {
    name: "sid",
    suites: &[(DEBIAN, "sid")],
};

/// apt-get and apt-cache for one [`Release`], with lists and cache of their own.
pub struct PrivateApt {
    release: Release,
    dir: PathBuf,
    /// The lists were fetched by this process (a second update would not help).
    updated: bool,
}

impl PrivateApt {
    /// The configuration for `release` under `root` (created on first use).
    pub fn new(release: Release, root: &Path) -> anyhow::Result<Self> {
        let dir = root.join(release.name);
        for sub in ["lists/partial", "cache/archives/partial"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating {}", path.display()))?;
        }
        let sources: String = release
            .suites
            .iter()
            .map(|(url, suite)| format!("deb [signed-by={KEYRING}] {url} {suite} main\n"))
            .collect();
        std::fs::write(dir.join("sources.list"), sources)
            .with_context(|| format!("writing {}", dir.join("sources.list").display()))?;
        Ok(Self {
            release,
            dir,
            updated: false,
        })
    }

    pub fn release(&self) -> Release {
        self.release
    }

    fn options(&self) -> Vec<String> {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        let mut options = vec![
            format!("Dir::Etc::sourcelist={}", d("sources.list")),
            "Dir::Etc::sourceparts=/dev/null".to_owned(),
            format!("Dir::State::lists={}", d("lists")),
            format!("Dir::Cache={}", d("cache")),
            "Dir::State::status=/dev/null".to_owned(),
            "Acquire::Languages=none".to_owned(),
            // NB: apt drops to `_apt` for downloads, which cannot write under the cache
            // root; it falls back to root with a warning. Ask for root outright.
            "APT::Sandbox::User=root".to_owned(),
        ];
        // Only the package lists: appstream's metadata (enabled on many hosts) is 10 MB per
        // suite that nothing here reads.
        for target in [
            "DEP-11",
            "DEP-11-icons",
            "DEP-11-icons-small",
            "DEP-11-icons-hidpi",
        ] {
            options.push(format!(
                "Acquire::IndexTargets::deb::{target}::DefaultEnabled=false"
            ));
        }
        options
            .into_iter()
            .flat_map(|o| ["-o".to_owned(), o])
            .collect()
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(self.options());
        cmd
    }

    /// Fetches the package lists unless a fetch younger than [`LISTS_MAX_AGE`] left them.
    pub fn ensure_lists(&mut self) -> anyhow::Result<()> {
        let stamp = self.dir.join("lists/.updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| {
                SystemTime::now()
                    .duration_since(t)
                    .is_ok_and(|age| age < LISTS_MAX_AGE)
            });
        if fresh {
            return Ok(());
        }
        self.update()
    }

    /// Fetches the package lists now; false if this process already did (nothing new then).
    pub fn update_again(&mut self) -> anyhow::Result<bool> {
        if self.updated {
            return Ok(false);
        }
        self.update()?;
        Ok(true)
    }

    fn update(&mut self) -> anyhow::Result<()> {
        eprintln!(
            "vm: apt-get update for {} (private lists)",
            self.release.name
        );
        run_quiet(self.command("apt-get").args(["update", "-q"]))
            .with_context(|| format!("fetching the package lists of {}", self.release.name))?;
        std::fs::write(self.dir.join("lists/.updated"), "")?;
        self.updated = true;
        Ok(())
    }

    /// `apt-cache ARGS…` with this configuration; its stdout.
    pub fn cache(&self, args: &[&str]) -> anyhow::Result<String> {
        output_of(self.command("apt-cache").args(args))
    }

    /// The version apt would install of `package`, if the lists know it.
    pub fn candidate(&self, package: &str) -> Option<String> {
        self.cache(&["policy", package])
            .ok()?
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Candidate:"))
            .map(str::trim)
            .find(|c| *c != "(none)")
            .map(str::to_owned)
    }

    /// The packages `package` depends on (its candidate's `Depends:`, names only).
    pub fn depends(&self, package: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .cache(&["depends", package])?
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .map(|d| d.trim().to_owned())
            .collect())
    }

    /// Downloads `package` at `version` into `dir`.
    pub fn download(&self, package: &str, version: &str, dir: &Path) -> anyhow::Result<()> {
        run_quiet(
            self.command("apt-get")
                .args(["download", "-q", &format!("{package}={version}")])
                .current_dir(dir),
        )
        .with_context(|| format!("downloading {package} {version} from {}", self.release.name))
    }
}
