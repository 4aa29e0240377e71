//! What a group costs in memory: the kernel side from the group's own pinned maps and
//! programs (as `bpftool` reports them: key and value size times entries, times the CPUs for
//! per-CPU maps; the program's JITed size; and the kernel's own `memlock` charge), and the
//! agent's side from /proc (RSS, open descriptors).

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

#[derive(Serialize, Clone, Debug)]
pub struct MapMemory {
    pub pin: String,
    pub map_type: u32,
    pub key_size: u64,
    pub value_size: u64,
    pub max_entries: u64,
    /// (key + value) × entries, × CPUs for a per-CPU map.
    pub bytes: u64,
    /// What the kernel charges for it (fdinfo `memlock`).
    pub memlock: u64,
}

#[derive(Serialize, Clone, Debug)]
pub struct ProgMemory {
    pub pin: String,
    pub jited_bytes: u64,
    pub xlated_bytes: u64,
    pub memlock: u64,
}

/// One group's kernel objects.
#[derive(Serialize, Clone, Debug, Default)]
pub struct GroupMemory {
    pub maps: Vec<MapMemory>,
    pub programs: Vec<ProgMemory>,
    /// Maps' bytes plus programs' JITed bytes.
    pub bytes: u64,
    /// Everything's `memlock`.
    pub memlock: u64,
}

/// The pin directory of the group on `port` under `bpffs`.
pub fn group_dir(bpffs: &Path, port: u16) -> anyhow::Result<PathBuf> {
    let tag = format!("_{port}_");
    for e in std::fs::read_dir(bpffs)? {
        let dir = e?.path();
        if dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(&tag))
        {
            return Ok(dir);
        }
    }
    bail!("no pinned group for port {port} under {}", bpffs.display())
}

/// The kernel objects pinned in `dir`.
pub fn group_memory(dir: &Path) -> anyhow::Result<GroupMemory> {
    let cpus = possible_cpus();
    let mut m = GroupMemory::default();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        let pin = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let fd = obj_get(&path)?;
        let info = fdinfo(&fd)?;
        let field = |name: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        if info.contains("map_type:") {
            let map_type = field("map_type") as u32;
            // BPF_MAP_TYPE_PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH.
            let per_cpu = matches!(map_type, 5 | 6 | 10);
            let (key_size, value_size, max_entries) =
                (field("key_size"), field("value_size"), field("max_entries"));
            let bytes = (key_size + value_size) * max_entries * if per_cpu { cpus } else { 1 };
            m.maps.push(MapMemory {
                pin,
                map_type,
                key_size,
                value_size,
                max_entries,
                bytes,
                memlock: field("memlock"),
            });
        } else if info.contains("prog_type:") {
            let (jited, xlated) = prog_sizes(&fd)?;
            m.programs.push(ProgMemory {
                pin,
                jited_bytes: jited,
                xlated_bytes: xlated,
                memlock: field("memlock"),
            });
        }
    }
    m.maps.sort_by(|a, b| a.pin.cmp(&b.pin));
    m.programs.sort_by(|a, b| a.pin.cmp(&b.pin));
    m.bytes = m.maps.iter().map(|x| x.bytes).sum::<u64>()
        + m.programs.iter().map(|x| x.jited_bytes).sum::<u64>();
    m.memlock = m.maps.iter().map(|x| x.memlock).sum::<u64>()
        + m.programs.iter().map(|x| x.memlock).sum::<u64>();
    Ok(m)
}

/// Resident memory of process `pid`, in bytes.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kib * 1024)
}

/// Descriptors process `pid` holds open.
pub fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

fn possible_cpus() -> u64 {
    // "0-1" or "0,2-3": count the CPUs in every range.
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .map(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    Some(b.parse::<u64>().ok()? - a.parse::<u64>().ok()? + 1)
                })
                .sum()
        })
        .unwrap_or(1)
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid bpf_attr prefix for `cmd`, as large as we say.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

fn obj_get(pin: &Path) -> anyhow::Result<OwnedFd> {
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())?;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)
        .with_context(|| format!("opening the pin {}", pin.display()))?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn fdinfo(fd: &OwnedFd) -> anyhow::Result<String> {
    let raw = std::os::fd::AsRawFd::as_raw_fd(fd);
    Ok(std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}"))?)
}

/// (JITed, translated) sizes of the program behind `fd`.
fn prog_sizes(fd: &OwnedFd) -> anyhow::Result<(u64, u64)> {
    // The head of struct bpf_prog_info: the kernel fills as much as we give it room for.
    #[repr(C)]
    #[derive(Default)]
    struct ProgInfoHead {
        prog_type: u32,
        id: u32,
        tag: [u8; 8],
        jited_prog_len: u32,
        xlated_prog_len: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = ProgInfoHead::default();
    let mut attr = InfoByFd {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(fd) as u32,
        info_len: size_of::<ProgInfoHead>() as u32,
        info: &raw mut info as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("reading a pinned program's info")?;
    Ok((
        u64::from(info.jited_prog_len),
        u64::from(info.xlated_prog_len),
    ))
}
