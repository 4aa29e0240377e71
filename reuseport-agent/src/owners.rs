//! Which generation holds which connection: by the processes that own the sockets.
//!
//! The kernel does not record which listener an accepted connection came from (sock_diag
//! reports none, and the socket keeps no link to it), but it does tell which socket inode
//! a connection has, and `/proc/PID/fd` tells which process holds that inode. A
//! generation's processes are its registered pids (the server, as its launcher registered
//! it) and their descendants (forked workers); a process belongs to its nearest registered
//! ancestor, itself included, so a new release started by the old one (nginx's binary
//! upgrade) counts for its own generation. A connection held by processes of two
//! generations counts for both: a generation is idle only once it holds nothing.
//!
//! NB: pids are those of the agent's pid namespace, as `SO_PEERCRED` reports them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    fs, io,
};

/// Generations by registered pid.
pub type Roots = BTreeMap<i32, BTreeSet<u32>>;

/// For each generation, how many of `inodes` its processes hold a descriptor of.
pub fn held_by(roots: &Roots, inodes: &HashSet<u32>) -> BTreeMap<u32, u64> {
    let mut held: BTreeMap<u32, HashSet<u32>> = BTreeMap::new();
    if !inodes.is_empty() {
        for (pid, gens) in processes(roots) {
            for inode in socket_inodes(pid)
                .into_iter()
                .filter(|i| inodes.contains(i))
            {
                for g in &gens {
                    held.entry(*g).or_default().insert(inode);
                }
            }
        }
    }
    held.into_iter()
        .map(|(g, set)| (g, set.len() as u64))
        .collect()
}

/// Every live process under `roots`, with the generations it belongs to.
fn processes(roots: &Roots) -> HashMap<i32, BTreeSet<u32>> {
    let mut owner: HashMap<i32, BTreeSet<u32>> = HashMap::new();
    let mut queue: VecDeque<(i32, BTreeSet<u32>)> =
        roots.iter().map(|(p, g)| (*p, g.clone())).collect();
    let mut parents = Parents::default();
    while let Some((pid, gens)) = queue.pop_front() {
        if owner.contains_key(&pid) {
            continue;
        }
        for child in parents.children(pid) {
            if !roots.contains_key(&child) {
                queue.push_back((child, gens.clone()));
            }
        }
        owner.insert(pid, gens);
    }
    owner
}

/// Children of a process: from `/proc/PID/task/TID/children` (CONFIG_PROC_CHILDREN), or, on
/// kernels without it, from the parent pid of every process.
#[derive(Default)]
struct Parents {
    /// Built on first need: parent → children, from `/proc/*/stat`.
    scanned: Option<HashMap<i32, Vec<i32>>>,
}

impl Parents {
    fn children(&mut self, pid: i32) -> Vec<i32> {
        if self.scanned.is_none() {
            match children_files(pid) {
                Ok(c) => return c,
                Err(e) if e.kind() == io::ErrorKind::NotFound && process_exists(pid) => {
                    self.scanned = Some(scan_parents());
                }
                Err(_) => return Vec::new(),
            }
        }
        self.scanned
            .as_ref()
            .and_then(|m| m.get(&pid).cloned())
            .unwrap_or_default()
    }
}

fn process_exists(pid: i32) -> bool {
    fs::metadata(format!("/proc/{pid}")).is_ok()
}

fn children_files(pid: i32) -> io::Result<Vec<i32>> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("children");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            // A thread that exited meanwhile; any other error means no such file.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    && !path.parent().is_some_and(|p| p.exists()) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    Ok(out)
}

fn scan_parents() -> HashMap<i32, Vec<i32>> {
    let mut map: HashMap<i32, Vec<i32>> = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(ppid) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parent_in_stat(&s))
        {
            map.entry(ppid).or_default().push(pid);
        }
    }
    map
}

/// The 4th field of `/proc/PID/stat`; the 2nd, `(comm)`, may hold spaces and parentheses.
fn parent_in_stat(stat: &str) -> Option<i32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Inodes of the sockets process `pid` has descriptors of.
///
/// NB: one open of the `fd` directory, links read relative to it: a full `/proc/PID/fd/N`
/// path looks the process up again for every descriptor.
fn socket_inodes(pid: i32) -> Vec<u32> {
    use nix::{dir::Dir, fcntl::OFlag, sys::stat::Mode};
    let Ok(mut dir) = Dir::open(
        format!("/proc/{pid}/fd").as_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return Vec::new();
    };
    let names: Vec<std::ffi::CString> = dir
        .iter()
        .flatten()
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    names
        .iter()
        .filter_map(|name| {
            let target = nix::fcntl::readlinkat(&dir, name.as_c_str()).ok()?;
            socket_inode(target.to_str()?)
        })
        .collect()
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &str) -> Option<u32> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, TcpStream},
        os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
        process::{Command, Stdio},
    };

    use super::*;

    #[test]
    fn links_and_stat_lines_are_read_exactly() {
        assert_eq!(socket_inode("socket:[4026]"), Some(4026));
        assert_eq!(socket_inode("pipe:[4026]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(
            parent_in_stat("42 (a (weird) name) S 7 42 42 0 -1"),
            Some(7)
        );
    }

    fn inode(fd: i32) -> u32 {
        fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino() as u32
    }

    /// A socket this process holds counts for the generation registered with our pid, and
    /// for no other; a child process inherits its parent's generation.
    #[test]
    fn sockets_count_for_the_generation_of_their_process() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (held, _) = listener.accept().unwrap();
        let me = std::process::id() as i32;
        let inodes: HashSet<u32> = [inode(held.as_raw_fd()), 1].into();
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let roots: Roots = [(me, BTreeSet::from([3])), (child.id() as i32, [4].into())].into();
        let counts = held_by(&roots, &inodes);
        assert_eq!(counts.get(&3), Some(&1), "{counts:?}");
        assert_eq!(
            counts.get(&4),
            None,
            "the child holds no socket: {counts:?}"
        );
        let all = processes(&[(me, BTreeSet::from([3]))].into());
        assert_eq!(
            all.get(&(child.id() as i32)),
            Some(&BTreeSet::from([3])),
            "a child belongs to its parent's generation"
        );
        let _ = child.kill();
        let _ = child.wait();
        drop(client);
    }
}
