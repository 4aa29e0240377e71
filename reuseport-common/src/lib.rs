//! The ABI between the kernel program (`reuseport-ebpf`) and the agent.
//!
//! Every type here is the value layout of a BPF map. Maps are pinned in bpffs and outlive the
//! agent binary that created them, so these layouts are a contract with *older and newer
//! binaries*, not just with the program compiled next to them.
//!
//! # How this ABI may change
//! - Never change the size, order or meaning of an existing field. The size asserts below
//!   turn an accidental change into a compile error.
//! - Any change to a map's layout, a map's size or the program's policy bumps [`ABI_VERSION`].
//!   The agent records that version in the header of each group's pinned `STATE` map
//!   ([`StateHeader`]).
//! - A restarted (or upgraded) agent adopts pinned objects whose version is in
//!   [`ADOPTABLE_ABI`]: their maps are laid out exactly as today's, so it reuses them and
//!   replaces only the program (atomically for the kernel, at the next registration into the
//!   group). A version outside that range is refused with an error that says what to do;
//!   the group keeps running on its old program meanwhile.
//! - So: a change that only touches the program's policy bumps [`ABI_VERSION`] and leaves
//!   the start of [`ADOPTABLE_ABI`] alone; a change to any map layout or size bumps both.
//! - No `bool`, `Option`, enums or implicit padding in map values: use `u32` flags and explicit
//!   `_pad` fields, so every byte is defined on both sides.
#![no_std]

/// Version of the layouts and the steering policy below. Bump on any change (see module doc).
///
/// History: 1 = no `STATE` map (pinned state could not be adopted); 2 = `STATE` map;
/// 3 = 1,024 slots, `u16` tables, 8 config buffers, a binary slot table in `STATE`, and
/// [`SteeringConfig::probe`] (probe connections, [`PROBE_PORTS`]).
pub const ABI_VERSION: u32 = 3;

/// The first version that pins a `STATE` map.
pub const FIRST_ABI_WITH_RECORD: u32 = 2;

/// Pinned objects of these versions share today's map layouts and are adopted.
pub const ADOPTABLE_ABI: core::ops::RangeInclusive<u32> = 3..=ABI_VERSION;

/// Slots in a group's `REUSEPORT_SOCKARRAY`: the most listening sockets one group can hold.
/// NB: must stay a power of two; the program masks indices with `MAX_SLOTS - 1` so the
/// verifier can bound them (a `%` alone is not enough, see `docs/toolchain.md`).
/// NB: at most 65,536: the tables hold slots as `u16`.
pub const MAX_SLOTS: u32 = 1024;

/// Generations one group holds at once. Not a kernel limit: the generations (names, states,
/// retired counters) are pinned in the `STATE` record ([`PinnedState::data`]), which is
/// sized to hold this many with the longest names.
pub const MAX_GENERATIONS: u32 = 128;

/// Local source ports of **probe connections**: a connection from one of these TCP source
/// ports *and* a loopback source address (127.0.0.0/8, ::1) goes to
/// [`SteeringConfig::probe`], whatever that generation's state, so that a generation is
/// checked through the real port and program before it gets traffic. Below 1024, so that
/// only a privileged local process can bind them (`net.ipv4.ip_unprivileged_port_start`,
/// 1024 by default); a remote client cannot send from a loopback address (the kernel drops
/// such packets as martians).
pub const PROBE_PORTS: core::ops::RangeInclusive<u16> = 1000..=1015;

/// [`SteeringConfig::probe`] when probe connections are steered as any other connection.
pub const NO_PROBE: u32 = u32::MAX;

/// Number of [`SteeringConfig`] buffers per group. A flip writes a buffer no reader can be
/// looking at and then switches the `CURRENT` map to it with one 4-byte
/// write; a retired buffer is rewritten only after an RCU grace period (see the agent's
/// `grace` module). More buffers mean more flips in a row without waiting for one.
/// Eight buffers of 6,164 bytes: 48 KiB per group, and seven flips of one group within one
/// grace period (≈8 ms) before a writer waits; the agent spreads a burst of registrations
/// over many groups, each with buffers of its own.
/// NB: power of two, for the same masking reason as [`MAX_SLOTS`].
pub const CONFIG_BUFFERS: u32 = 8;

/// Index of the group-wide entry in the counters map (after the per-slot entries): events
/// that no slot can be charged with.
pub const GROUP_COUNTER_INDEX: u32 = MAX_SLOTS;

/// Entries in the counters map: one per slot plus the group-wide one.
pub const COUNTER_ENTRIES: u32 = MAX_SLOTS + 1;

/// Names of the maps and programs in the object, as the agent looks them up and pins them.
pub struct MapNames;

impl MapNames {
    pub const SOCKETS: &'static str = "SOCKETS";
    pub const CONFIG: &'static str = "CONFIG";
    pub const CURRENT: &'static str = "CURRENT";
    pub const COUNTERS: &'static str = "COUNTERS";
    pub const STATE: &'static str = "STATE";
}

/// Program names in the object.
pub struct ProgramNames;

impl ProgramNames {
    /// `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` (kernel 5.14+).
    pub const SELECT_OR_MIGRATE: &'static str = "select_or_migrate";
    /// `BPF_SK_REUSEPORT_SELECT` (kernel 4.19+): no say over migration.
    pub const SELECT: &'static str = "select";
}

/// One complete steering decision table. The program reads exactly one of these per
/// connection, chosen by the value in the `CURRENT` map.
///
/// A probe connection (see [`PROBE_PORTS`]) tries `probe` first. Then, in order until a slot
/// still holds a socket:
/// 1. `active[hash & (MAX_SLOTS - 1)]`: the active generation, spread by the packet hash;
/// 2. `active[..]` in order: the other active sockets, if that one closed;
/// 3. `preferred[hash & (MAX_SLOTS - 1)]`: the preferred fallback generation (the newest
///    draining one, or the newest standby one if none drains);
/// 4. `fallback[..]` in order: every non-active registered slot, draining generations
///    newest first, then standby generations newest first.
///
/// Each array holds its `n_*` distinct slots, in order, repeated cyclically over all
/// `MAX_SLOTS` entries; a tier whose count is 0 is skipped.
///
/// Only when no listed slot holds a socket does the program hand the choice back to the
/// kernel (which then hashes over whatever sockets remain in the group).
///
/// NB: the repetition lets the program pick with a masked hash instead of `% n` and walk
/// with a constant trip count: a modulo by, or a loop exit on, a count read from a map
/// makes verifiers either explore every possible count (1M-instruction limit) or, on 6.1,
/// lose the loop bound. Repetition over 1,024 entries skews the hash spread by at most
/// 1/1,024. Slots are `u16` so that a buffer stays at 6 KiB.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SteeringConfig {
    pub n_active: u32,
    pub n_preferred: u32,
    pub n_fallback: u32,
    /// Increases with every published config; lets tests and the agent tell tables apart.
    pub serial: u32,
    /// The slot that probe connections ([`PROBE_PORTS`]) go to, or [`NO_PROBE`]. If its
    /// socket has closed, a probe connection is steered as any other.
    pub probe: u32,
    pub active: [u16; MAX_SLOTS as usize],
    pub preferred: [u16; MAX_SLOTS as usize],
    pub fallback: [u16; MAX_SLOTS as usize],
}

const _: () = assert!(core::mem::size_of::<SteeringConfig>() == 20 + 6 * MAX_SLOTS as usize);
const _: () = assert!(MAX_SLOTS <= 1 << 16);

impl SteeringConfig {
    pub const EMPTY: Self = Self {
        n_active: 0,
        n_preferred: 0,
        n_fallback: 0,
        serial: 0,
        probe: NO_PROBE,
        active: [0; MAX_SLOTS as usize],
        preferred: [0; MAX_SLOTS as usize],
        fallback: [0; MAX_SLOTS as usize],
    };

    /// Fills `dst` with `slots` repeated cyclically (see the type's note).
    /// Every slot must be below [`MAX_SLOTS`] (so it fits a `u16`).
    pub fn fill_cyclic(dst: &mut [u16; MAX_SLOTS as usize], slots: &[u32]) -> u32 {
        if !slots.is_empty() {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = (slots[i % slots.len()] & (MAX_SLOTS - 1)) as u16;
            }
        }
        slots.len() as u32
    }
}

/// Per-CPU counters, one entry per slot (what reached that socket) plus a group-wide entry
/// at [`GROUP_COUNTER_INDEX`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCounters {
    /// New connections that reached this socket as a member of the active generation.
    pub selected: u64,
    /// New connections that reached this socket as a fallback (no active socket left).
    pub fallback: u64,
    /// Connections migrated to this socket from a closing listener.
    pub migrated: u64,
    /// Group-wide entry only: connections the program could not place on any registered
    /// socket and handed back to the kernel's hash.
    pub unsteered: u64,
}

const _: () = assert!(core::mem::size_of::<SlotCounters>() == 32);

impl SlotCounters {
    pub fn add(&mut self, other: &Self) {
        self.selected += other.selected;
        self.fallback += other.fallback;
        self.migrated += other.migrated;
        self.unsteered += other.unsteered;
    }
}

/// Marks a [`PinnedState`] written by this project's agent.
pub const STATE_MAGIC: u32 = u32::from_be_bytes(*b"RPST");

/// Bytes available for the agent's encoding of a group's generations in [`PinnedState`].
pub const STATE_CAPACITY: usize = 32 * 1024 - core::mem::size_of::<StateHeader>();

/// Header of the group record kept in the one-entry `STATE` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateHeader {
    /// [`STATE_MAGIC`].
    pub magic: u32,
    /// [`ABI_VERSION`] of the agent that wrote the record and created the maps.
    pub abi_version: u32,
    /// Bytes of `data` in use.
    pub len: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<StateHeader>() == 16);

/// [`SlotRecord::flags`]: the slot holds a registered socket.
pub const SLOT_USED: u32 = 1;
/// [`SlotRecord::flags`]: the socket's pid is the server its registrant named.
pub const SLOT_SERVER: u32 = 2;

/// Which registered socket sits in one slot, as pinned in [`PinnedState::slots`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotRecord {
    /// Socket cookie (`SO_COOKIE`): whether the slot still holds this very socket.
    pub cookie: u64,
    /// The writing agent's id of the registration that added it.
    pub reg: u64,
    pub generation: u32,
    pub pid: i32,
    pub uid: u32,
    /// The listener's `sk_drops` when it registered.
    pub drops_base: u32,
    /// [`SLOT_USED`], [`SLOT_SERVER`].
    pub flags: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<SlotRecord>() == 40);

/// The agent's record of a group, so that a restarted agent can adopt it: which socket
/// (by cookie) sits in which slot, fixed-size and binary (`slots`, 40 KiB for 1,024 slots),
/// and the rest (address, owner, generations with their states, names and retired
/// counters) in the agent's own encoding (JSON) in `data`, versioned by the header. Only
/// userspace reads it; the program never touches this map.
///
/// NB: the agent writes it *before* the table flip it describes, so after a crash it holds
/// the newest state that may have reached the kernel; an adopting agent republishes from it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PinnedState {
    pub header: StateHeader,
    pub slots: [SlotRecord; MAX_SLOTS as usize],
    pub data: [u8; STATE_CAPACITY],
}

const _: () = assert!(core::mem::size_of::<PinnedState>() == 32 * 1024 + 40 * MAX_SLOTS as usize);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and a byte array, no padding (size asserts above).
    unsafe impl aya::Pod for super::PinnedState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StateHeader {}
    // SAFETY: repr(C), only integers, no padding (checked by the size asserts above).
    unsafe impl aya::Pod for super::SteeringConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotCounters {}
}
