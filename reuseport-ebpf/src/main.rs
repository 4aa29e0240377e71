//! The `SK_REUSEPORT` program of a steered group.
//!
//! The kernel runs it for every new connection (SYN) that reaches the group and, with the
//! select-or-migrate attach type, for every queued connection of a listener that closes.
//! It only reads a decision table the agent prepared (`SteeringConfig`, see
//! `reuseport-common`) and asks the kernel for one socket; all policy lives in how the agent
//! fills the table. The exact policy is documented in the README ("Steering policy").
//!
//! Cost per connection on the normal path: two array lookups, one `sk_select_reuseport`
//! call, one per-CPU counter increment. Nothing is logged per connection.
#![no_std]
#![no_main]

use core::{cell::UnsafeCell, ffi::c_void};

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_hdr_start_off::BPF_HDR_START_NET,
    bindings::{bpf_map_def, bpf_map_type::BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, sk_action::SK_PASS},
    helpers::generated::{bpf_sk_select_reuseport, bpf_skb_load_bytes_relative},
    macros::{map, sk_reuseport},
    maps::{Array, PerCpuArray},
    programs::SkReuseportContext,
};
use reuseport_common::{
    CONFIG_BUFFERS, COUNTER_ENTRIES, GROUP_COUNTER_INDEX, MAX_SLOTS, NO_PROBE, PROBE_PORTS,
    PinnedState, SlotCounters, SteeringConfig,
};

/// The group's sockets, by slot.
///
/// NB: declared by hand instead of with aya-ebpf's `ReusePortSockArray`, which fixes the
/// value size at 4 bytes: the kernel only answers userspace lookups (which return the socket
/// cookie) on a sockarray with 8-byte values, and the agent needs those to tell whether a
/// slot still holds the socket it registered.
#[repr(transparent)]
struct SockArray(UnsafeCell<bpf_map_def>);

// SAFETY: the definition is only read by the loader; the program passes its address to a
// helper and never dereferences it.
unsafe impl Sync for SockArray {}

impl SockArray {
    #[inline(always)]
    fn select(&self, ctx: &SkReuseportContext, mut slot: u32) -> bool {
        // SAFETY: a valid map definition and a stack key, as the helper expects.
        let ret = unsafe {
            bpf_sk_select_reuseport(
                ctx.as_ptr().cast(),
                self.0.get().cast(),
                core::ptr::from_mut(&mut slot).cast::<c_void>(),
                0,
            )
        };
        ret == 0
    }
}

#[unsafe(link_section = "maps")]
#[unsafe(export_name = "SOCKETS")]
static SOCKETS: SockArray = SockArray(UnsafeCell::new(bpf_map_def {
    type_: BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
    key_size: 4,
    value_size: 8,
    max_entries: MAX_SLOTS,
    map_flags: 0,
    id: 0,
    pinning: 0,
}));

#[map]
static CONFIG: Array<SteeringConfig> = Array::with_max_entries(CONFIG_BUFFERS, 0);

/// Index of the live `CONFIG` buffer. One 4-byte word: the agent's flip is a single
/// atomic store, so a program never sees a half-written table.
#[map]
static CURRENT: Array<u32> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<SlotCounters> = PerCpuArray::with_max_entries(COUNTER_ENTRIES, 0);

/// The agent's record of the group, pinned with the other maps so that a restarted agent
/// can adopt it. Never read here: declared in the object only so that every map of a group
/// is created, pinned and adopted the same way.
#[map]
static STATE: Array<PinnedState> = Array::with_max_entries(1, 0);

const SLOT_MASK: u32 = MAX_SLOTS - 1;

#[derive(Clone, Copy)]
enum Tier {
    Active,
    Fallback,
}

/// Select-or-migrate (5.14+): the same policy for new and for migrating connections.
#[sk_reuseport(migrate)]
pub fn select_or_migrate(ctx: SkReuseportContext) -> u32 {
    let migrating = ctx.migrating_sk().is_some();
    steer(&ctx, migrating)
}

/// Select only (4.19+): migration, if enabled by sysctl, is left to the kernel's hash.
/// NB: must not touch `migrating_sk`: older verifiers reject the field access.
#[sk_reuseport]
pub fn select(ctx: SkReuseportContext) -> u32 {
    steer(&ctx, false)
}

#[inline(always)]
fn steer(ctx: &SkReuseportContext, migrating: bool) -> u32 {
    let Some(cfg) = current_config() else {
        // Unreachable with a loaded group (both maps are arrays and always have the entry).
        return SK_PASS;
    };
    if !migrating
        && cfg.probe != NO_PROBE
        && is_probe(ctx)
        && try_slot(ctx, cfg.probe, Tier::Active, false)
    {
        return SK_PASS;
    }
    let hash = ctx.hash();
    let pick = |slots: &[u16; MAX_SLOTS as usize], tier: Tier| {
        try_slot(
            ctx,
            slots[(hash & SLOT_MASK) as usize].into(),
            tier,
            migrating,
        )
    };
    let placed = (cfg.n_active != 0
        && (pick(&cfg.active, Tier::Active)
            || try_each(ctx, &cfg.active, Tier::Active, migrating)))
        || (cfg.n_preferred != 0 && pick(&cfg.preferred, Tier::Fallback))
        || (cfg.n_fallback != 0 && try_each(ctx, &cfg.fallback, Tier::Fallback, migrating));
    if placed {
        return SK_PASS;
    }
    // No registered socket is left: hand the choice back to the kernel's hash over whatever
    // sockets remain in the group. That is never worse than refusing the connection. Counted
    // (`unsteered` in status), not logged: a log ring buffer would cost every group 128 KiB
    // of kernel memory and the agent a reader per group.
    count(GROUP_COUNTER_INDEX, |c| c.unsteered += 1);
    SK_PASS
}

/// Whether the connection comes from a probe source: a TCP source port in [`PROBE_PORTS`]
/// and a loopback source address.
///
/// NB: only for a new connection (never a migrating one): a request migrated at close has
/// no skb (`data` and `data_end` are NULL, and the load helpers would read through it).
/// `data` starts at the TCP header at lookup time (`sk_reuseport_md`, uapi `bpf.h`); the IP
/// source is read with `bpf_skb_load_bytes_relative` from the network header, which the
/// kernel bounds itself.
#[inline(always)]
fn is_probe(ctx: &SkReuseportContext) -> bool {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 2 > end {
        return false;
    }
    // SAFETY: the two bytes were bounds-checked against `data_end` just above.
    let port = u16::from_be(unsafe { core::ptr::read_unaligned(data as *const u16) });
    if port < *PROBE_PORTS.start() || port > *PROBE_PORTS.end() {
        return false;
    }
    // The source address, at its offset in the IPv4 (12) or IPv6 (8) header.
    match u16::from_be(ctx.eth_protocol() as u16) {
        ETH_P_IP => {
            let mut addr = [0u8; 4];
            load_net(ctx, 12, &mut addr) && addr[0] == 127
        }
        ETH_P_IPV6 => {
            let mut addr = [0u8; 16];
            load_net(ctx, 8, &mut addr) && addr == LOOPBACK_V6
        }
        _ => false,
    }
}

/// Reads `N` bytes at `offset` from the network header; false if the packet has fewer.
/// NB: one call per constant `N`: the helper's size argument must be known to the verifier.
#[inline(always)]
fn load_net<const N: usize>(ctx: &SkReuseportContext, offset: u32, buf: &mut [u8; N]) -> bool {
    // SAFETY: a stack buffer of exactly `N` bytes, and the program's own context.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.as_ptr().cast(),
            offset,
            buf.as_mut_ptr().cast(),
            N as u32,
            BPF_HDR_START_NET,
        )
    };
    ret == 0
}

const LOOPBACK_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[inline(always)]
fn current_config() -> Option<&'static SteeringConfig> {
    let cur = *CURRENT.get(0)?;
    CONFIG.get(cur & (CONFIG_BUFFERS - 1))
}

/// Tries every entry of `slots` in order; true once a socket was selected.
///
/// NB: the loop has no exit that depends on map data (the tables repeat their slots to fill
/// all entries instead): with a count-dependent exit, LLVM merges the two exits into one
/// countdown of min(n, MAX_SLOTS) and the 6.1 verifier cannot bound it; opaque tricks
/// against that make newer verifiers explode. A constant trip count with an early return
/// verifies everywhere. Only the rare "picked socket has closed" path runs the loop.
#[inline(always)]
fn try_each(
    ctx: &SkReuseportContext,
    slots: &[u16; MAX_SLOTS as usize],
    tier: Tier,
    migrating: bool,
) -> bool {
    for slot in slots {
        if try_slot(ctx, (*slot).into(), tier, migrating) {
            return true;
        }
    }
    false
}

/// Selects the socket in `slot` and counts it; false if the slot is empty (its socket
/// closed: the helper fails with -ENOENT).
#[inline(always)]
fn try_slot(ctx: &SkReuseportContext, slot: u32, tier: Tier, migrating: bool) -> bool {
    if !SOCKETS.select(ctx, slot) {
        return false;
    }
    count(slot & SLOT_MASK, |c| match (migrating, tier) {
        (true, _) => c.migrated += 1,
        (false, Tier::Active) => c.selected += 1,
        (false, Tier::Fallback) => c.fallback += 1,
    });
    true
}

#[inline(always)]
fn count(index: u32, f: impl FnOnce(&mut SlotCounters)) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        f(unsafe { &mut *c });
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
