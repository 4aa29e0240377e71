//! Adoption: at start, before the first control connection, the agent takes over the groups
//! an earlier agent pinned in its bpffs directory (see [`pinned`] for the record). Their
//! sockets keep their slots and are steered as before; clients that register them again get
//! them back.

use std::{collections::HashMap, os::fd::OwnedFd};

use reuseport_common::{ABI_VERSION, ADOPTABLE_ABI};

use crate::{
    agent::Agent,
    bpffs,
    grace::Ticket,
    group::Group,
    kernel::{self, GroupKernel, PinnedRecord},
    pinned,
    registry::RegId,
};

impl Agent {
    /// Takes over the groups that an earlier agent pinned in the bpffs directory (see
    /// [`pinned`]). Their sockets keep their slots and are steered as before; clients that
    /// register them again get them back. Returns how many groups were adopted.
    pub fn adopt_pinned(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.bpffs) else {
            return 0;
        };
        let mut adopted = 0;
        // NB: one ticket for every group: what the dead agent retired, it retired before
        // this point, so one grace period covers all of them. A ticket per group made every
        // group's republish wait a grace period of its own (≈30 ms each, one after the
        // other: 42 s for 1,300 groups).
        let retired = self.grace.retire();
        // NB: a link here is never followed (see bpffs): adoption would take another
        // group's pins for this name's.
        for dir in entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| bpffs::is_real_dir(p))
        {
            match kernel::read_pinned(&dir) {
                PinnedRecord::Adoptable(record) => match self.adopt_one(&dir, &record, retired) {
                    Ok(true) => adopted += 1,
                    Ok(false) => {}
                    Err(e) => tracing::error!(
                        dir = %dir.display(), error = %e,
                        "cannot adopt the pinned group; it keeps steering as it was, unmanaged"
                    ),
                },
                PinnedRecord::Incompatible { abi_version } => tracing::error!(
                    dir = %dir.display(),
                    "pinned by an agent of ABI version {abi_version}, which this agent (ABI \
                     {ABI_VERSION}, adopts {ADOPTABLE_ABI:?}) cannot adopt; the group keeps \
                     steering on its old program, unmanaged: {}",
                    UNADOPTABLE_ADVICE
                ),
                PinnedRecord::Missing if kernel::pinned_sockets_live(&dir) => tracing::error!(
                    dir = %dir.display(),
                    "pinned without a group record (ABI version 1, or not ours); its sockets \
                     keep being steered by the old program, unmanaged: {}",
                    UNADOPTABLE_ADVICE
                ),
                PinnedRecord::Missing => {}
                PinnedRecord::Unwritten => {
                    kernel::remove_pins(&dir);
                    tracing::info!(
                        dir = %dir.display(),
                        "an agent died creating this group, before its first record: nothing \
                         to adopt, its pins were removed (its sockets register afresh)"
                    );
                }
            }
        }
        adopted
    }

    /// Adopts one group; `Ok(false)` when none of its sockets is left (its pins go).
    pub(crate) fn adopt_one(
        &self,
        dir: &std::path::Path,
        state: &reuseport_common::PinnedState,
        retired: Ticket,
    ) -> Result<bool, String> {
        let record = pinned::decode(state)?;
        let key = record.key();
        let kernel = GroupKernel::adopt(self.mode, dir, &record.program, retired)
            .map_err(|e| e.to_string())?;
        let mut registry = record.registry;
        // Registration ids of the dead agent mean nothing here: one fresh id per old one,
        // none of them connected until its client registers again.
        let mut fresh: HashMap<RegId, RegId> = HashMap::new();
        let mut gone = Vec::new();
        for g in registry.generations.values_mut() {
            for (slot, m) in &mut g.sockets {
                m.reg = *fresh.entry(m.reg).or_insert_with(|| self.next_reg_id());
                if kernel.slot_cookie(*slot) != Some(m.cookie) {
                    gone.push(*slot);
                }
            }
        }
        let dropped = registry.remove_slots(&gone);
        for slot in &dropped {
            let _ = kernel.clear_slot(*slot);
        }
        if registry.is_empty() {
            kernel.unpin();
            tracing::info!(group = %key, "pinned group has no socket left; its pins were removed");
            return Ok(false);
        }
        let sockets = registry
            .generations
            .values()
            .map(|g| g.sockets.len())
            .sum::<usize>();
        let netns = registry
            .generations
            .values()
            .flat_map(|g| g.sockets.values())
            .find_map(|m| netns_of(m.pid, key.netns));
        let record = pinned::GroupRecord { registry, ..record };
        let group = Group::adopt(record, kernel, netns, self.pin_abi, retired, &self.grace)
            .map_err(|r| r.message)?;
        let generations: Vec<String> = group
            .generation_states()
            .map(|(n, state)| format!("{n}:{state}"))
            .collect();
        tracing::info!(
            group = %key, generations = %generations.join(","), sockets,
            dropped = dropped.len(), abi = state.header.abi_version,
            program = if group.program_reused() { "reused" } else { "reloaded" },
            "adopted pinned group; its clients re-register their sockets"
        );
        self.lock().groups.insert(key, group);
        Ok(true)
    }
}

pub(crate) const UNADOPTABLE_ADVICE: &str = "finish the deploy with the agent version that pinned it, or \
    stop the group's servers (once no socket is left, this agent replaces the pins)";

/// The network namespace of process `pid` if it is the group's (inode `netns`).
fn netns_of(pid: i32, netns: u64) -> Option<OwnedFd> {
    use std::os::unix::fs::MetadataExt as _;
    let file = std::fs::File::open(format!("/proc/{pid}/ns/net")).ok()?;
    (file.metadata().ok()?.ino() == netns).then(|| file.into())
}
