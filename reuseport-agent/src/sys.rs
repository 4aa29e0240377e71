//! The few raw `bpf(2)` calls aya 0.14 does not offer: for a sockarray with 8-byte values
//! (see `SOCKETS` in the kernel program for why the values are 8 bytes), and for a map
//! whose value size is not known at compile time (a record pinned by another ABI).

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_ANY: u64 = 0;

/// `union bpf_attr` as used by the map element commands.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut MapElemAttr) -> io::Result<()> {
    // SAFETY: attr is a valid, initialised bpf_attr prefix of the size we pass; the kernel
    // zero-extends the rest.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<MapElemAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Puts `socket` in `slot` (replacing whatever was there).
pub fn sockarray_set(map: BorrowedFd<'_>, slot: u32, socket: BorrowedFd<'_>) -> io::Result<()> {
    let key = slot;
    let value = socket.as_raw_fd() as u64;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(&key) as u64,
        value: std::ptr::from_ref(&value) as u64,
        flags: BPF_ANY,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
}

/// The cookie of the socket in `slot`, or `None` if the slot is empty (never set, cleared,
/// or its socket closed).
pub fn sockarray_cookie(map: BorrowedFd<'_>, slot: u32) -> io::Result<Option<u64>> {
    let key = slot;
    let mut value = 0u64;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(&key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads entry `key` of an array map into `value`: exactly the map's value size, or for a
/// per-CPU map that size (rounded up to 8 bytes) times the possible CPUs.
pub fn array_lookup(map: BorrowedFd<'_>, key: u32, value: &mut [u8]) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(&key) as u64,
        value: value.as_mut_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)
}

/// Empties `slot`; an already empty slot is fine.
pub fn sockarray_clear(map: BorrowedFd<'_>, slot: u32) -> io::Result<()> {
    let key = slot;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(&key) as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}
