//! The kernel side of one group: the loaded program, its maps, their pins, and the two
//! writes that change steering (a slot, and a published [`SteeringConfig`]).

use std::{
    fs, io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, PerCpuArray, PerCpuValues},
    programs::{SkReuseport, SkReuseportAttachType},
    util::nr_cpus,
};
use reuseport_common::{
    CONFIG_BUFFERS, COUNTER_ENTRIES, GROUP_COUNTER_INDEX, MapNames, PinnedState, ProgramNames,
    SlotCounters, SteeringConfig,
};

use super::{
    grace::{Grace, Ticket},
    sys,
};

mod by_pin;
mod record;
use by_pin::ByPin;
pub use record::{PinnedRecord, pinned_sockets_live, read_pinned};

/// The object built from `reuseport-ebpf` by this crate's build script.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reuseport"));

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` (5.14+): the program also places the queued
    /// connections of a closing listener.
    SelectOrMigrate,
    /// `BPF_SK_REUSEPORT_SELECT` (4.19+): new connections only.
    SelectOnly,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SelectOrMigrate => "select-or-migrate",
            Self::SelectOnly => "select-only",
        }
    }

    fn attach_type(self) -> SkReuseportAttachType {
        match self {
            Self::SelectOrMigrate => SkReuseportAttachType::SelectOrMigrate,
            Self::SelectOnly => SkReuseportAttachType::Select,
        }
    }

    fn program(self) -> &'static str {
        match self {
            Self::SelectOrMigrate => ProgramNames::SELECT_OR_MIGRATE,
            Self::SelectOnly => ProgramNames::SELECT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("loading the reuseport program ({mode}): {source}")]
    Load {
        mode: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn kernel(what: impl Into<String>) -> impl FnOnce(io::Error) -> KernelError {
    let what = what.into();
    move |source| KernelError::Kernel { what, source }
}

/// A failure [`super::fault::fail`] injected at `what`, as the kernel's own would read.
pub fn injected(what: &str, source: io::Error) -> KernelError {
    KernelError::Kernel {
        what: what.into(),
        source,
    }
}

fn load_err(mode: Mode) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> KernelError {
    move |source| KernelError::Load {
        mode: mode.as_str(),
        source,
    }
}

/// Every map of a group, each pinned in the group's directory under its own name.
const PINNED_MAPS: [&str; 5] = [
    MapNames::SOCKETS,
    MapNames::CONFIG,
    MapNames::CURRENT,
    MapNames::COUNTERS,
    MapNames::STATE,
];

/// Loads the object and the program for `mode`. With `pin_dir`, every map is taken from
/// its pin there, or created and pinned there if it has none yet; without, nothing is
/// pinned (mode detection).
fn load(mode: Mode, pin_dir: Option<&Path>) -> Result<Ebpf, KernelError> {
    let mut loader = EbpfLoader::new();
    if let Some(dir) = pin_dir {
        for name in PINNED_MAPS {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    let mut ebpf = loader.load(PROGRAM).map_err(|e| load_err(mode)(e.into()))?;
    let prog: &mut SkReuseport = ebpf
        .program_mut(mode.program())
        .ok_or_else(|| load_err(mode)(format!("program {} missing", mode.program()).into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| load_err(mode)(e.into()))?;
    prog.load().map_err(|e| load_err(mode)(e.into()))?;
    // What the verifier walked (5.16+): the figure docs/design.md keeps under the 1M limit.
    let verified = prog
        .info()
        .ok()
        .and_then(|i| i.verified_instruction_count());
    tracing::debug!(program = mode.program(), ?verified, "program loaded");
    Ok(ebpf)
}

/// Identifies the program this agent build loads in `mode`: an adopted group whose pinned
/// program has the same id is reused as it is (no new load: verification takes seconds on
/// some kernels), any other is replaced.
pub fn program_id(mode: Mode) -> String {
    // NB: computed once: hashing the whole object took ~50 µs, on every flip.
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let hash = HASH.get_or_init(|| {
        use std::hash::{DefaultHasher, Hash as _, Hasher as _};
        let mut h = DefaultHasher::new();
        PROGRAM.hash(&mut h);
        h.finish()
    });
    format!("{}-{hash:016x}", mode.as_str())
}

/// What loading, pinning and attaching the program takes; the unit and docs/operations.md
/// list the rest (live figures, the control group).
pub const CAPABILITIES: &str = "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (CAP_SYS_ADMIN for \
    the first two before Linux 5.8)";

/// Picks the best mode this kernel supports (or select-only if forced). Fails with a
/// message naming the kernel requirement when not even select-only loads.
pub fn detect_mode(force_select_only: bool) -> anyhow::Result<Mode> {
    if !force_select_only {
        match load(Mode::SelectOrMigrate, None) {
            Ok(_) => return Ok(Mode::SelectOrMigrate),
            Err(e) => tracing::warn!(
                error = %e,
                "select-or-migrate is not available (needs Linux 5.14+): falling back to \
                 select-only; queued connections of a closing listener are then not steered \
                 (old generations must keep accepting until they have drained)"
            ),
        }
    }
    load(Mode::SelectOnly, None)
        .map(|_| Mode::SelectOnly)
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}: reuseport needs Linux 4.19+ with BPF (REUSEPORT_SOCKARRAY, SK_REUSEPORT \
                 programs) and the capabilities {CAPABILITIES} (kernel here: {})",
                kernel_release()
            )
        })
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// One group's program and maps.
///
/// NB: only `SOCKETS` and `COUNTERS` are held open (every `status` and scan reads them);
/// the program and the maps written by a change are opened from their pins when used (see
/// [`by_pin`]): two descriptors per group instead of six.
pub struct GroupKernel {
    /// The program: the parsed object it was loaded from is dropped at once (aya keeps the
    /// whole ELF, BTF included, per object).
    program: ByPin,
    /// Whether the program was taken from its pin as it was (see [`program_id`]).
    reused: bool,
    sockets: MapData,
    config: ByPin,
    current: ByPin,
    counters: PerCpuArray<MapData, SlotCounters>,
    state: ByPin,
    mode: Mode,
    pin_dir: PathBuf,
    /// Buffer the program reads now.
    live: u32,
    /// For each buffer that was live once: when it stopped being live.
    retired: [Option<Ticket>; CONFIG_BUFFERS as usize],
}

impl GroupKernel {
    /// Loads a fresh program and maps for a group and pins them in `pin_dir` (replacing
    /// stale pins a previous agent left there).
    pub fn create(mode: Mode, pin_dir: &Path) -> Result<Self, KernelError> {
        remove_pins(pin_dir);
        Self::open(mode, pin_dir, None)
    }

    /// Takes over the maps pinned in `pin_dir` by an earlier agent. If the pinned program is
    /// the one this build would load (`pinned_program_id`), it is reused from its pin;
    /// otherwise a fresh program is loaded on the same maps, and the kernel keeps running
    /// the old one until [`GroupKernel::attach`].
    ///
    /// NB: the crashed agent may have retired buffers less than a grace period ago, so
    /// every buffer starts out retired at `retired`, taken before adoption began.
    pub fn adopt(
        mode: Mode,
        pin_dir: &Path,
        pinned_program_id: &str,
        retired: Ticket,
    ) -> Result<Self, KernelError> {
        let retired = Some(retired);
        if pinned_program_id == program_id(mode) {
            match Self::from_pins(mode, pin_dir, retired) {
                Ok(k) => return Ok(k),
                Err(e) => {
                    tracing::warn!(error = %e, "reusing the pinned program failed; loading it again")
                }
            }
        }
        Self::open(mode, pin_dir, retired)
    }

    /// Everything from its pin, nothing loaded.
    fn from_pins(mode: Mode, pin_dir: &Path, retired: Option<Ticket>) -> Result<Self, KernelError> {
        let map = |name: &'static str| {
            MapData::from_pin(pin_dir.join(name)).map_err(|e| KernelError::Kernel {
                what: format!("opening the pinned map {name}"),
                source: io::Error::other(e),
            })
        };
        let by_pin = |name: &'static str| ByPin::map(pin_dir.join(name), &map(name)?);
        let prog_pin = pin_dir.join(mode.program());
        let program = SkReuseport::from_pin(&prog_pin, mode.attach_type()).map_err(|e| {
            KernelError::Kernel {
                what: format!("opening the pinned program {}", mode.program()),
                source: io::Error::other(e),
            }
        })?;
        let counters =
            PerCpuArray::try_from(Map::PerCpuArray(map(MapNames::COUNTERS)?)).map_err(|e| {
                KernelError::Kernel {
                    what: "pinned map COUNTERS".into(),
                    source: io::Error::other(e),
                }
            })?;
        Self::assemble(
            mode,
            pin_dir,
            retired,
            ByPin::program(prog_pin, &program)?,
            true,
            map(MapNames::SOCKETS)?,
            counters,
            [
                by_pin(MapNames::CONFIG)?,
                by_pin(MapNames::CURRENT)?,
                by_pin(MapNames::STATE)?,
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        mode: Mode,
        pin_dir: &Path,
        retired: Option<Ticket>,
        program: ByPin,
        reused: bool,
        sockets: MapData,
        counters: PerCpuArray<MapData, SlotCounters>,
        [config, current, state]: [ByPin; 3],
    ) -> Result<Self, KernelError> {
        let live = current.array::<u32>()?.get(&0, 0).unwrap_or(0) % CONFIG_BUFFERS;
        Ok(Self {
            program,
            reused,
            sockets,
            config,
            current,
            counters,
            state,
            mode,
            pin_dir: pin_dir.to_owned(),
            live,
            retired: [retired; CONFIG_BUFFERS as usize],
        })
    }

    fn open(mode: Mode, pin_dir: &Path, retired: Option<Ticket>) -> Result<Self, KernelError> {
        fs::create_dir_all(pin_dir).map_err(kernel(format!("creating {}", pin_dir.display())))?;
        let mut ebpf = load(mode, Some(pin_dir))?;
        let mut take = |name: &str| {
            ebpf.take_map(name).ok_or_else(|| KernelError::Kernel {
                what: format!("map {name} missing from the program object"),
                source: io::ErrorKind::NotFound.into(),
            })
        };
        let sockets = match take(MapNames::SOCKETS)? {
            Map::ReusePortSockArray(data) => data,
            other => {
                return Err(KernelError::Kernel {
                    what: format!("map SOCKETS has an unexpected type: {other:?}"),
                    source: io::ErrorKind::InvalidData.into(),
                });
            }
        };
        let counters =
            PerCpuArray::try_from(take(MapNames::COUNTERS)?).map_err(|e| KernelError::Kernel {
                what: "map COUNTERS".into(),
                source: io::Error::other(e),
            })?;
        let mut by_pin = |name: &'static str| match take(name)? {
            Map::Array(data) => ByPin::map(pin_dir.join(name), &data),
            other => Err(KernelError::Kernel {
                what: format!("map {name} has an unexpected type: {other:?}"),
                source: io::ErrorKind::InvalidData.into(),
            }),
        };
        let maps = [
            by_pin(MapNames::CONFIG)?,
            by_pin(MapNames::CURRENT)?,
            by_pin(MapNames::STATE)?,
        ];
        let name = mode.program();
        let prog: &mut SkReuseport = ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("program was loaded by load()");
        // The pin only keeps the program findable; an adopted group's old program stays
        // attached (and alive) until the next attach replaces it.
        let prog_pin = pin_dir.join(name);
        let _ = fs::remove_file(&prog_pin);
        prog.pin(&prog_pin).map_err(|e| KernelError::Kernel {
            what: format!("pinning {name} in {}", pin_dir.display()),
            source: io::Error::other(e),
        })?;
        let program = ByPin::program(prog_pin, prog)?;
        drop(ebpf);
        trim_heap();
        Self::assemble(
            mode, pin_dir, retired, program, false, sockets, counters, maps,
        )
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether the program was taken from its pin as it was (see [`GroupKernel::adopt`]).
    pub fn program_reused(&self) -> bool {
        self.reused
    }

    /// [`program_id`] of this agent's program, which a publish records.
    pub fn program_id(&self) -> String {
        program_id(self.mode)
    }

    /// Removes the pins (the program stays attached to the kernel group while sockets use it).
    pub fn unpin(&self) {
        remove_pins(&self.pin_dir);
    }

    /// Attaches the program to the kernel's reuseport group that `socket` belongs to.
    /// Idempotent: attaching again replaces the group's program with the same one.
    pub fn attach(&self, socket: BorrowedFd<'_>) -> Result<(), KernelError> {
        self.program
            .program_of(self.mode.attach_type())?
            .attach(socket)
            .map_err(|e| {
                KernelError::Kernel {
            what:
                "attaching the program to the socket's reuseport group (SO_ATTACH_REUSEPORT_EBPF)"
                    .into(),
            source: io::Error::other(e),
        }
            })
    }

    fn sockets_fd(&self) -> BorrowedFd<'_> {
        self.sockets.fd().as_fd()
    }

    pub fn set_slot(&self, slot: u32, socket: BorrowedFd<'_>) -> Result<(), KernelError> {
        sys::sockarray_set(self.sockets_fd(), slot, socket).map_err(kernel(format!(
            "adding the socket to the sockarray at slot {slot}"
        )))
    }

    pub fn clear_slot(&self, slot: u32) -> Result<(), KernelError> {
        sys::sockarray_clear(self.sockets_fd(), slot)
            .map_err(kernel(format!("clearing sockarray slot {slot}")))
    }

    /// Cookie of the socket in `slot`, `None` once that socket closed.
    pub fn slot_cookie(&self, slot: u32) -> Option<u64> {
        sys::sockarray_cookie(self.sockets_fd(), slot)
            .ok()
            .flatten()
    }

    /// The first half of making `cfg` the table the program follows, atomically: writes it
    /// into a buffer no program invocation can be reading (waiting for an RCU grace period
    /// only if every buffer retired too recently) and returns it; the program follows it
    /// once [`GroupKernel::switch`] is called. Until then the live table is untouched, and
    /// staging again overwrites the same buffer.
    pub fn stage(&mut self, cfg: &SteeringConfig, grace: &Grace) -> Result<u32, KernelError> {
        let next = (self.live + 1) % CONFIG_BUFFERS;
        if let Some(t) = self.retired[next as usize] {
            grace.wait(t);
        }
        self.config
            .array::<SteeringConfig>()?
            .set(next, cfg, 0)
            .map_err(|e| KernelError::Kernel {
                what: format!("writing steering table {next}"),
                source: io::Error::other(e),
            })?;
        Ok(next)
    }

    /// Makes the staged buffer `next` the live one: one 4-byte write of `CURRENT`.
    pub fn switch(&mut self, next: u32, grace: &Grace) -> Result<(), KernelError> {
        // NB: buffer indices are < 256, so consecutive values differ only in their low byte:
        // even a byte-wise copy in the kernel's map update cannot expose a torn index.
        self.current
            .array::<u32>()?
            .set(0, next, 0)
            .map_err(|e| KernelError::Kernel {
                what: "switching the live steering table".into(),
                source: io::Error::other(e),
            })?;
        self.retired[self.live as usize] = Some(grace.retire());
        self.live = next;
        Ok(())
    }

    /// Pins `record`, the agent's description of the group (see the `pinned` module).
    pub fn write_record(&mut self, record: &PinnedState) -> Result<(), KernelError> {
        self.state
            .array::<PinnedState>()?
            .set(0, record, 0)
            .map_err(|e| KernelError::Kernel {
                what: "writing the pinned group record".into(),
                source: io::Error::other(e),
            })
    }

    /// Unpins the record map (the map itself lives on while the agent holds it).
    pub fn remove_record_pin(&self) {
        let _ = fs::remove_file(self.pin_dir.join(MapNames::STATE));
    }

    /// Counters of `slot` summed over CPUs.
    ///
    /// NB: read into a buffer per thread with one `bpf()` call: aya's per-CPU lookup
    /// allocates twice per call, and `status` of thousands of groups reads thousands.
    pub fn counters(&self, slot: u32) -> SlotCounters {
        thread_local! {
            static PER_CPU: std::cell::RefCell<Vec<SlotCounters>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        let Ok(cpus) = nr_cpus() else {
            return SlotCounters::default();
        };
        let fd = aya::maps::IterableMap::map(&self.counters).fd().as_fd();
        PER_CPU.with_borrow_mut(|values| {
            values.resize(cpus, SlotCounters::default());
            // SAFETY: SlotCounters is plain u64s (Pod): any bytes the kernel writes are
            // valid, and the slice covers exactly the vector's values, one per possible CPU,
            // as a per-CPU lookup of 32-byte values fills.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(
                    values.as_mut_ptr().cast::<u8>(),
                    size_of_val(values.as_slice()),
                )
            };
            let mut total = SlotCounters::default();
            if sys::array_lookup(fd, slot, bytes).is_ok() {
                for v in values.iter() {
                    total.add(v);
                }
            }
            total
        })
    }

    pub fn group_counters(&self) -> SlotCounters {
        self.counters(GROUP_COUNTER_INDEX)
    }

    /// Zeroes a slot's counters before the slot is handed to another socket.
    pub fn reset_counters(&mut self, slot: u32) -> Result<(), KernelError> {
        debug_assert!(slot < COUNTER_ENTRIES);
        let n = nr_cpus().map_err(|(what, e)| KernelError::Kernel {
            what: what.into(),
            source: e,
        })?;
        let zeros = PerCpuValues::try_from(vec![SlotCounters::default(); n])
            .expect("one value per possible CPU");
        self.counters
            .set(slot, zeros, 0)
            .map_err(|e| KernelError::Kernel {
                what: format!("resetting counters of slot {slot}"),
                source: io::Error::other(e),
            })
    }
}

pub use super::bpffs::remove_pins;

/// Returns the memory the allocator keeps free to the system.
///
/// NB: loading a group's object allocates megabytes (its BTF, relocations, instructions),
/// freed right after on whichever blocking thread created the group. glibc keeps freed
/// memory in that thread's arena: with a dozen blocking threads, about 20 MiB each stayed
/// resident, most of the agent's RSS.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only hands free pages back; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
