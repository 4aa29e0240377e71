//! Reference `SK_REUSEPORT` programs for `bench overhead`: what a run costs with nothing
//! of ours in it, under the same run statistics (`kernel.bpf_stats_enabled`).
//!
//! - [`Reference::Empty`] returns `SK_PASS` and selects nothing (the kernel hashes): the
//!   floor the statistics themselves put on every run (two clock reads around it).
//! - [`Reference::OneSelect`] calls `bpf_sk_select_reuseport` once on slot 0 of a
//!   one-entry sockarray: the least any steering program must do.
//!
//! Both are a handful of instructions assembled here and loaded with bpf(2) directly, so
//! they need no second eBPF object in the build.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use anyhow::Context as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reference {
    Empty,
    OneSelect,
}

impl Reference {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Empty => "empty program (returns SK_PASS)",
            Self::OneSelect => "one-select program (one bpf_sk_select_reuseport)",
        }
    }
}

/// A loaded reference program (and its sockarray). Attach it with [`Loaded::attach`] to a
/// listener that is bound and listening but not serving yet.
pub struct Loaded {
    kind: Reference,
    prog: OwnedFd,
    map: Option<OwnedFd>,
}

// From include/uapi/linux/bpf.h.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
const BPF_SK_REUSEPORT_SELECT: u32 = 39;
const BPF_FUNC_SK_SELECT_REUSEPORT: i32 = 82;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const SK_PASS: i32 = 1;
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Opcodes used below (BPF_CLASS | BPF_OP | BPF_SRC).
const MOV64_IMM: u8 = 0xb7;
const MOV64_REG: u8 = 0xbf;
const ADD64_IMM: u8 = 0x07;
const STORE_W_IMM: u8 = 0x62;
const LD_IMM64: u8 = 0x18;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

fn sys_bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, fully initialised prefix of `union bpf_attr` for `cmd`;
    // the kernel copies at most size_of::<T>() bytes.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(attr), size_of::<T>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: bpf(2) just returned this descriptor; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

fn create_sockarray() -> io::Result<OwnedFd> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    sys_bpf(
        BPF_MAP_CREATE,
        &MapCreate {
            map_type: BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            map_flags: 0,
        },
    )
    .map(owned)
}

fn load(insns: &[Insn]) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    prog_name[..9].copy_from_slice(b"reference");
    sys_bpf(
        BPF_PROG_LOAD,
        &ProgLoad {
            prog_type: BPF_PROG_TYPE_SK_REUSEPORT,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name,
            prog_ifindex: 0,
            expected_attach_type: BPF_SK_REUSEPORT_SELECT,
        },
    )
    .map(owned)
}

impl Loaded {
    pub fn load(kind: Reference) -> anyhow::Result<Self> {
        let (insns, map) = match kind {
            Reference::Empty => (
                vec![insn(MOV64_IMM, 0, 0, 0, SK_PASS), insn(EXIT, 0, 0, 0, 0)],
                None,
            ),
            Reference::OneSelect => {
                let map = create_sockarray().context("creating a REUSEPORT_SOCKARRAY")?;
                let insns = vec![
                    // key = 0 on the stack; r1 is still the context.
                    insn(STORE_W_IMM, 10, 0, -4, 0),
                    insn(LD_IMM64, 2, BPF_PSEUDO_MAP_FD, 0, map.as_raw_fd()),
                    insn(0, 0, 0, 0, 0),
                    insn(MOV64_REG, 3, 10, 0, 0),
                    insn(ADD64_IMM, 3, 0, 0, -4),
                    insn(MOV64_IMM, 4, 0, 0, 0),
                    insn(CALL, 0, 0, 0, BPF_FUNC_SK_SELECT_REUSEPORT),
                    insn(MOV64_IMM, 0, 0, 0, SK_PASS),
                    insn(EXIT, 0, 0, 0, 0),
                ];
                (insns, Some(map))
            }
        };
        let prog = load(&insns).with_context(|| format!("loading the {}", kind.describe()))?;
        Ok(Self { kind, prog, map })
    }

    /// Puts `listener` (bound, listening, SO_REUSEPORT) in the sockarray, if the program
    /// has one, and attaches the program to the listener's reuseport group.
    pub fn attach(&self, listener: RawFd) -> anyhow::Result<()> {
        if let Some(map) = &self.map {
            #[repr(C)]
            struct MapUpdate {
                map_fd: u32,
                _pad: u32,
                key: u64,
                value: u64,
                flags: u64,
            }
            let (key, value) = (0u32, listener as u32);
            sys_bpf(
                BPF_MAP_UPDATE_ELEM,
                &MapUpdate {
                    map_fd: map.as_raw_fd() as u32,
                    _pad: 0,
                    key: (&raw const key) as u64,
                    value: (&raw const value) as u64,
                    flags: 0,
                },
            )
            .context("putting the listener in the reference sockarray")?;
        }
        let prog = self.prog.as_raw_fd();
        // SAFETY: setsockopt with a pointer to an int of the size given.
        let ret = unsafe {
            libc::setsockopt(
                listener,
                libc::SOL_SOCKET,
                SO_ATTACH_REUSEPORT_EBPF,
                (&raw const prog).cast(),
                size_of::<RawFd>() as libc::socklen_t,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("attaching the {}", self.kind.describe()));
        }
        Ok(())
    }

    /// (run_time_ns, run_cnt) so far.
    pub fn stats(&self) -> anyhow::Result<(u64, u64)> {
        super::overhead::fd_stats(self.prog.as_raw_fd())
    }
}
