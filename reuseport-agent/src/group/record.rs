//! What a group keeps in its pinned record besides the table's members: its supervisor's
//! last restart and the launchers' drain steps, and the record itself, written alone for
//! what the kernel program does not read.

use reuseport_proto::message::{DrainStep, RestartOutcome};

use super::{Group, kernel_refusal};
use crate::{
    kernel,
    pinned::{self, GroupRecord},
    registry::{Refusal, Registry},
};

impl Group {
    /// Records how the supervisor's last restart ended; all or nothing.
    pub(crate) fn set_last_restart(&mut self, outcome: RestartOutcome) -> Result<(), Refusal> {
        let previous = self.last_restart.replace(outcome);
        if let Err(e) = self.save_record() {
            self.last_restart = previous;
            return Err(e);
        }
        Ok(())
    }

    /// Records what a launcher did to a draining generation (see `drain_progress`); all or
    /// nothing.
    pub(crate) fn set_drain_step(
        &mut self,
        generation: u32,
        step: DrainStep,
    ) -> Result<(), Refusal> {
        let previous = self
            .registry
            .generations
            .get(&generation)
            .and_then(|g| g.drain_step.clone());
        self.registry.drain_step(generation, step)?;
        if let Err(e) = self.save_record() {
            if let Some(g) = self.registry.generations.get_mut(&generation) {
                g.drain_step = previous;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Pins the record alone (for what the kernel program does not read).
    pub(super) fn save_record(&mut self) -> Result<(), Refusal> {
        if self.record_abi < reuseport_common::FIRST_ABI_WITH_RECORD {
            // An agent asked to write as ABI 1 (tests) pins no record at all, as ABI 1 did.
            self.kernel.remove_record_pin();
            return Ok(());
        }
        let (record, record_abi) = (self.record(), self.record_abi);
        let group_kernel = &mut self.kernel;
        pinned::with_buffer(|buf| {
            pinned::encode(&record, record_abi, buf)?;
            crate::fault::fail("publish.record").map_err(|e| {
                kernel_refusal(kernel::injected("writing the pinned group record", e))
            })?;
            group_kernel.write_record(buf).map_err(kernel_refusal)
        })
    }

    pub(super) fn record(&self) -> GroupRecord {
        GroupRecord {
            addr: self.key.addr,
            netns: self.key.netns,
            owner_uid: self.owner_uid,
            serial: self.serial,
            program: crate::fault::recorded_program_id(self.kernel.program_id()),
            // NB: a clone per publish (at most MAX_SLOTS members): simpler than a borrowing
            // twin of the record type, and publishes are not a hot path.
            registry: Registry {
                generations: self.registry.generations.clone(),
            },
            last_restart: self.last_restart.clone(),
            bound_device: self.device.clone(),
        }
    }
}
