//! The kernel side of one group: the loaded program, its maps, their pins, and the two
//! writes that change steering (a slot, and a published [`SteeringConfig`]).

use std::{
    fs, io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, PerCpuArray, PerCpuValues},
    programs::SkReuseport,
    util::nr_cpus,
};
use reuseport_common::{
    CONFIG_BUFFERS, COUNTER_ENTRIES, GROUP_COUNTER_INDEX, MapNames, ProgramNames, SlotCounters,
    SteeringConfig,
};

use super::{
    grace::{Grace, Ticket},
    sys,
};

/// The object built from `reuseport-ebpf` by this crate's build script.
#[cfg(not(fuzzing))]
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reuseport"));
/// Fuzz builds skip the eBPF build (see build.rs): loading fails, which they never do.
#[cfg(fuzzing)]
static PROGRAM: &[u8] = &[];

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

    fn program(self) -> &'static str {
        match self {
            Self::SelectOrMigrate => ProgramNames::SELECT_OR_MIGRATE,
            Self::SelectOnly => ProgramNames::SELECT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
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

fn kernel(what: impl Into<String>) -> impl FnOnce(io::Error) -> SteeringError {
    let what = what.into();
    move |source| SteeringError::Kernel { what, source }
}

fn load_err(mode: Mode) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> SteeringError {
    move |source| SteeringError::Load {
        mode: mode.as_str(),
        source,
    }
}

/// Loads the object and the program for `mode` (nothing is attached or pinned).
fn load(mode: Mode) -> Result<Ebpf, SteeringError> {
    let mut ebpf = EbpfLoader::new()
        .load(PROGRAM)
        .map_err(|e| load_err(mode)(e.into()))?;
    let prog: &mut SkReuseport = ebpf
        .program_mut(mode.program())
        .ok_or_else(|| load_err(mode)(format!("program {} missing", mode.program()).into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| load_err(mode)(e.into()))?;
    prog.load().map_err(|e| load_err(mode)(e.into()))?;
    Ok(ebpf)
}

/// Picks the best mode this kernel supports (or select-only if forced). Fails with a
/// message naming the kernel requirement when not even select-only loads.
pub fn detect_mode(force_select_only: bool) -> anyhow::Result<Mode> {
    if !force_select_only {
        match load(Mode::SelectOrMigrate) {
            Ok(_) => return Ok(Mode::SelectOrMigrate),
            Err(e) => tracing::warn!(
                error = %e,
                "select-or-migrate is not available (needs Linux 5.14+): falling back to \
                 select-only; queued connections of a closing listener are then not steered \
                 (old generations must keep accepting until they have drained)"
            ),
        }
    }
    load(Mode::SelectOnly)
        .map(|_| Mode::SelectOnly)
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}: reuseport needs Linux 4.19+ with BPF (REUSEPORT_SOCKARRAY, SK_REUSEPORT \
             programs) and CAP_BPF/CAP_NET_ADMIN (kernel here: {})",
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
pub struct GroupKernel {
    ebpf: Ebpf,
    sockets: MapData,
    config: Array<MapData, SteeringConfig>,
    current: Array<MapData, u32>,
    counters: PerCpuArray<MapData, SlotCounters>,
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
    pub fn create(mode: Mode, pin_dir: &Path) -> Result<Self, SteeringError> {
        let mut ebpf = load(mode)?;
        let mut take = |name: &str| {
            ebpf.take_map(name).ok_or_else(|| SteeringError::Kernel {
                what: format!("map {name} missing from the program object"),
                source: io::ErrorKind::NotFound.into(),
            })
        };
        let sockets = match take(MapNames::SOCKETS)? {
            Map::ReusePortSockArray(data) => data,
            other => {
                return Err(SteeringError::Kernel {
                    what: format!("map SOCKETS has an unexpected type: {other:?}"),
                    source: io::ErrorKind::InvalidData.into(),
                });
            }
        };
        let map_err = |name: &'static str| {
            move |e: aya::maps::MapError| SteeringError::Kernel {
                what: format!("map {name}"),
                source: io::Error::other(e),
            }
        };
        remove_pins(pin_dir);
        fs::create_dir_all(pin_dir).map_err(kernel(format!("creating {}", pin_dir.display())))?;
        let pin_err = |what: &str| {
            let what = format!("pinning {what} in {}", pin_dir.display());
            move |e: aya::pin::PinError| SteeringError::Kernel {
                what,
                source: io::Error::other(e),
            }
        };
        let mut take_pinned = |name: &'static str| {
            let map = take(name)?;
            map.pin(pin_dir.join(name)).map_err(pin_err(name))?;
            Ok::<_, SteeringError>(map)
        };
        let config = Array::try_from(take_pinned(MapNames::CONFIG)?).map_err(map_err("CONFIG"))?;
        let current =
            Array::try_from(take_pinned(MapNames::CURRENT)?).map_err(map_err("CURRENT"))?;
        let counters =
            PerCpuArray::try_from(take_pinned(MapNames::COUNTERS)?).map_err(map_err("COUNTERS"))?;
        sockets
            .pin(pin_dir.join(MapNames::SOCKETS))
            .map_err(pin_err(MapNames::SOCKETS))?;
        let name = mode.program();
        let prog: &mut SkReuseport = ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("program was loaded by load()");
        prog.pin(pin_dir.join(name)).map_err(pin_err(name))?;
        Ok(Self {
            ebpf,
            sockets,
            config,
            current,
            counters,
            mode,
            pin_dir: pin_dir.to_owned(),
            live: 0,
            retired: [None; CONFIG_BUFFERS as usize],
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Removes the pins (the program stays attached to the kernel group while sockets use it).
    pub fn unpin(&self) {
        remove_pins(&self.pin_dir);
    }

    /// Attaches the program to the kernel's reuseport group that `socket` belongs to.
    /// Idempotent: attaching again replaces the group's program with the same one.
    pub fn attach(&self, socket: BorrowedFd<'_>) -> Result<(), SteeringError> {
        let prog: &SkReuseport = self
            .ebpf
            .program(self.mode.program())
            .and_then(|p| p.try_into().ok())
            .expect("program was loaded in create()");
        prog.attach(socket).map_err(|e| SteeringError::Kernel {
            what:
                "attaching the program to the socket's reuseport group (SO_ATTACH_REUSEPORT_EBPF)"
                    .into(),
            source: io::Error::other(e),
        })
    }

    fn sockets_fd(&self) -> BorrowedFd<'_> {
        self.sockets.fd().as_fd()
    }

    pub fn set_slot(&self, slot: u32, socket: BorrowedFd<'_>) -> Result<(), SteeringError> {
        sys::sockarray_set(self.sockets_fd(), slot, socket).map_err(kernel(format!(
            "adding the socket to the sockarray at slot {slot}"
        )))
    }

    pub fn clear_slot(&self, slot: u32) -> Result<(), SteeringError> {
        sys::sockarray_clear(self.sockets_fd(), slot)
            .map_err(kernel(format!("clearing sockarray slot {slot}")))
    }

    /// Cookie of the socket in `slot`, `None` once that socket closed.
    pub fn slot_cookie(&self, slot: u32) -> Option<u64> {
        sys::sockarray_cookie(self.sockets_fd(), slot)
            .ok()
            .flatten()
    }

    /// Makes `cfg` the table the program follows, atomically: it is written into a buffer no
    /// program invocation can be reading (waiting for an RCU grace period only if every
    /// buffer retired too recently), then the 4-byte `CURRENT` word switches to it.
    pub fn publish(&mut self, cfg: &SteeringConfig, grace: &Grace) -> Result<(), SteeringError> {
        let next = (self.live + 1) % CONFIG_BUFFERS;
        if let Some(t) = self.retired[next as usize] {
            grace.wait(t);
        }
        self.config
            .set(next, cfg, 0)
            .map_err(|e| SteeringError::Kernel {
                what: format!("writing steering table {next}"),
                source: io::Error::other(e),
            })?;
        // NB: buffer indices are < 256, so consecutive values differ only in their low byte:
        // even a byte-wise copy in the kernel's map update cannot expose a torn index.
        self.current
            .set(0, next, 0)
            .map_err(|e| SteeringError::Kernel {
                what: "switching the live steering table".into(),
                source: io::Error::other(e),
            })?;
        self.retired[self.live as usize] = Some(grace.retire());
        self.live = next;
        Ok(())
    }

    /// Counters of `slot` summed over CPUs.
    pub fn counters(&self, slot: u32) -> SlotCounters {
        let mut total = SlotCounters::default();
        if let Ok(values) = self.counters.get(&slot, 0) {
            for v in values.iter() {
                total.add(v);
            }
        }
        total
    }

    pub fn group_counters(&self) -> SlotCounters {
        self.counters(GROUP_COUNTER_INDEX)
    }

    /// Zeroes a slot's counters before the slot is handed to another socket.
    pub fn reset_counters(&mut self, slot: u32) -> Result<(), SteeringError> {
        debug_assert!(slot < COUNTER_ENTRIES);
        let n = nr_cpus().map_err(|(what, e)| SteeringError::Kernel {
            what: what.into(),
            source: e,
        })?;
        let zeros = PerCpuValues::try_from(vec![SlotCounters::default(); n])
            .expect("one value per possible CPU");
        self.counters
            .set(slot, zeros, 0)
            .map_err(|e| SteeringError::Kernel {
                what: format!("resetting counters of slot {slot}"),
                source: io::Error::other(e),
            })
    }

    /// Sets up aya-log for the program's rare-event messages.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
            .inspect_err(|e| tracing::debug!(error = %e, "program logger unavailable"))
            .ok()
    }
}

fn remove_pins(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}
