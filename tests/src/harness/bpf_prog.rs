//! The kernel's view of a BPF program, by id: which program a pin holds, and whether a
//! program still exists. Upgrade tests use it to prove that the program an agent pinned was
//! replaced (it is freed once no group runs it and no pin holds it).

use std::{ffi::CString, io, os::fd::FromRawFd as _, os::fd::OwnedFd, path::Path};

// bpf(2) commands (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a bpf_attr prefix for `cmd`, valid for its size; the kernel copies it.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(attr), size_of::<T>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Id of the program pinned at `pin`.
pub fn pinned_program_id(pin: &Path) -> io::Result<u32> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let fd = bpf(
        BPF_OBJ_GET,
        &ObjGet {
            pathname: path.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        },
    )?;
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // NB: bpf_prog_info starts with `type` and `id` (u32 each); the rest stays zeroed, which
    // the kernel requires of fields it does not fill.
    let mut info = [0u32; 64];
    use std::os::fd::AsRawFd as _;
    let res = {
        let attr = GetInfo {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: size_of_val(&info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        // SAFETY: as in `bpf`; the kernel writes at most `info_len` bytes into `info`.
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                &raw const attr,
                size_of::<GetInfo>(),
            )
        }
    };
    if res < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[1])
}

/// Whether a program with this id is still loaded (attached, pinned or held open anywhere).
pub fn program_exists(id: u32) -> bool {
    #[repr(C)]
    struct GetFdById {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    match bpf(
        BPF_PROG_GET_FD_BY_ID,
        &GetFdById {
            prog_id: id,
            next_id: 0,
            open_flags: 0,
        },
    ) {
        Ok(_) => true,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => false,
        Err(e) => panic!("bpf(BPF_PROG_GET_FD_BY_ID, {id}): {e}"),
    }
}
