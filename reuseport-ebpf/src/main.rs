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

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    macros::{map, sk_reuseport},
    maps::{Array, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use aya_log_ebpf::warn;
use reuseport_common::{
    COUNTER_ENTRIES, CONFIG_BUFFERS, GROUP_COUNTER_INDEX, MAX_SLOTS, SlotCounters,
    SteeringConfig,
};

#[map]
static SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_SLOTS, 0);

#[map]
static CONFIG: Array<SteeringConfig> = Array::with_max_entries(CONFIG_BUFFERS, 0);

/// Index of the live `CONFIG` buffer. One 4-byte word: the agent's flip is a single
/// atomic store, so a program never sees a half-written table.
#[map]
static CURRENT: Array<u32> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<SlotCounters> = PerCpuArray::with_max_entries(COUNTER_ENTRIES, 0);

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
    let hash = ctx.hash();

    let n_active = cfg.n_active & SLOT_MASK;
    if n_active != 0 && try_range(ctx, cfg, 0, n_active, hash % n_active, Tier::Active, migrating)
    {
        return SK_PASS;
    }

    let n_fallback = cfg.n_fallback & SLOT_MASK;
    if n_fallback != 0 {
        // Spread over the preferred fallback generation first, then walk everything else.
        let n_first = cfg.n_fallback_first & SLOT_MASK;
        let start = if n_first == 0 { 0 } else { hash % n_first };
        if try_range(ctx, cfg, n_active, n_fallback, start, Tier::Fallback, migrating) {
            return SK_PASS;
        }
    }

    // No registered socket is left: hand the choice back to the kernel's hash over whatever
    // sockets remain in the group. That is never worse than refusing the connection.
    count(GROUP_COUNTER_INDEX, |c| c.unsteered += 1);
    if first_on_this_cpu(GROUP_COUNTER_INDEX) {
        warn!(ctx, "no registered socket left in the group; connection handed to the kernel's hash");
    }
    SK_PASS
}

#[inline(always)]
fn current_config() -> Option<&'static SteeringConfig> {
    let cur = *CURRENT.get(0)?;
    CONFIG.get(cur & (CONFIG_BUFFERS - 1))
}

/// Tries `cfg.slots[base + (start + i) % len]` for `i` in `0..len`; true once a socket was
/// selected. Empty slots (a socket that closed) return -ENOENT and are skipped.
#[inline(always)]
fn try_range(
    ctx: &SkReuseportContext,
    cfg: &SteeringConfig,
    base: u32,
    len: u32,
    start: u32,
    tier: Tier,
    migrating: bool,
) -> bool {
    let mut idx = start;
    for _ in 0..MAX_SLOTS {
        if idx >= len {
            idx = 0;
        }
        let slot = cfg.slots[((base + idx) & SLOT_MASK) as usize];
        if SOCKETS.select_reuseport(ctx, slot).is_ok() {
            let slot = slot & SLOT_MASK;
            count(slot, |c| match (migrating, tier) {
                (true, _) => c.migrated += 1,
                (false, Tier::Active) => c.selected += 1,
                (false, Tier::Fallback) => c.fallback += 1,
            });
            return true;
        }
        idx += 1;
        if idx == start || len == 1 {
            return false;
        }
    }
    false
}

#[inline(always)]
fn count(index: u32, f: impl FnOnce(&mut SlotCounters)) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        f(unsafe { &mut *c });
    }
}

/// True the first time this CPU counts a group-wide event: logs rare events once instead of
/// once per connection.
#[inline(always)]
fn first_on_this_cpu(index: u32) -> bool {
    COUNTERS.get(index).is_some_and(|c| c.unsteered == 1)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
