//! A cgroup of its own for each container a test boots.
//!
//! NB: `systemd-nspawn --keep-unit` makes the caller's cgroup the container's root: it creates
//! `payload/` and `supervisor/` there, and the container's systemd builds `system.slice/…`
//! below them. Two containers booted from the same cgroup (two test runs on one machine) then
//! share those directories: one's systemd removes the other's unit cgroups ("Failed at step
//! CGROUP … No such file or directory") and the directories outlive both. Each container
//! therefore starts in a fresh child of the test's cgroup, in every hierarchy a systemd
//! manages (the v2 one, and the v1 `name=systemd` one on hybrid hosts), removed when it is
//! shut down.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::{fd::AsFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
};

/// What names the cgroups: `<PREFIX><pid of the test process>-<n>`.
const PREFIX: &str = "reuseport-rig-";

/// The container's cgroups, one per hierarchy; removed on drop.
#[derive(Debug)]
pub struct ContainerCgroup {
    dirs: Vec<PathBuf>,
}

impl ContainerCgroup {
    /// Creates `<PREFIX><pid>-<n>` below the calling process's cgroup in each managed
    /// hierarchy, after removing those an earlier, dead test process left.
    pub fn create(n: u32) -> io::Result<Self> {
        let name = format!("{PREFIX}{}-{n}", std::process::id());
        let mut dirs = Vec::new();
        for parent in own_cgroups()? {
            remove_stale(&parent);
            let dir = parent.join(&name);
            fs::create_dir(&dir)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
            dirs.push(dir);
        }
        if dirs.is_empty() {
            return Err(io::Error::other(
                "no cgroup hierarchy with a systemd controller is mounted under /sys/fs/cgroup",
            ));
        }
        Ok(Self { dirs })
    }

    /// Makes `cmd`'s process join these cgroups before it executes.
    pub fn enter_on_exec(&self, cmd: &mut Command) -> io::Result<()> {
        let procs: Vec<File> = self
            .dirs
            .iter()
            .map(|d| OpenOptions::new().write(true).open(d.join("cgroup.procs")))
            .collect::<io::Result<_>>()?;
        // SAFETY: write(2) is async-signal-safe; runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for file in &procs {
                    // "0": the writing process itself.
                    nix::unistd::write(file.as_fd(), b"0").map_err(io::Error::from)?;
                }
                Ok(())
            });
        }
        Ok(())
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            if let Err(e) = remove_tree(dir) {
                eprintln!(
                    "cannot remove the container's cgroup {}: {e}",
                    dir.display()
                );
            }
        }
    }
}

/// The directories of the calling process's cgroup in the v2 hierarchy and in the v1
/// `name=systemd` one, where mounted.
fn own_cgroups() -> io::Result<Vec<PathBuf>> {
    let membership = fs::read_to_string("/proc/self/cgroup")?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let mut dirs = Vec::new();
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let mount = if id == "0" && controllers.is_empty() {
            mount_point(&mountinfo, |fstype, _| fstype == "cgroup2")
        } else if controllers == "name=systemd" {
            mount_point(&mountinfo, |fstype, options| {
                fstype == "cgroup" && options.split(',').any(|o| o == "name=systemd")
            })
        } else {
            None
        };
        if let Some(mount) = mount {
            dirs.push(mount.join(path.trim_start_matches('/')));
        }
    }
    Ok(dirs)
}

/// The mount point of the first mount whose file system type and super options match.
fn mount_point(mountinfo: &str, matches: impl Fn(&str, &str) -> bool) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // NB: the optional fields end at " - "; then fstype, source, super options.
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        let fstype = right.next()?;
        let options = right.nth(1).unwrap_or("");
        let mut left = left.split_whitespace();
        // NB: a mount of a cgroup namespace's root elsewhere than "/" would need the path
        // translated; the hosts and guests here mount the whole hierarchy.
        let (root, mount) = (left.nth(3)?, left.next()?);
        (root == "/" && matches(fstype, options)).then(|| PathBuf::from(mount))
    })
}

/// Removes the cgroups of test processes that are gone (killed before their drop ran).
fn remove_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = remove_tree(&entry.path());
        }
    }
}

/// Removes a cgroup and its descendants, deepest first (a cgroup's directory goes with
/// rmdir(2) once it has no children and no processes).
fn remove_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir)
}
