//! The objects of a group the agent opens from their pins when it uses them (a flip, a
//! registration) instead of holding a descriptor for each: `CONFIG`, `CURRENT`, `STATE` and
//! the program. At 4,096 groups, four descriptors per group were 16,000 of the 20,000 a
//! process commonly may hold; the two maps read for every `status` and scan stay open.
//!
//! Each object is checked against the kernel id it had when the agent created or adopted
//! the group: a pin replaced behind the agent's back is refused, never written to.

use std::{io, path::PathBuf};

use aya::{
    Pod,
    maps::{Array, Map, MapData},
    programs::{SkReuseport, SkReuseportAttachType},
};

use super::KernelError;

/// One pinned object of a group, known by its pin and its kernel id.
pub(super) struct ByPin {
    path: PathBuf,
    id: u32,
}

fn failed(what: String) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> KernelError {
    move |e| KernelError::Kernel {
        what,
        source: io::Error::other(e),
    }
}

impl ByPin {
    /// `data`, pinned at `path`.
    pub(super) fn map(path: PathBuf, data: &MapData) -> Result<Self, KernelError> {
        let id = data
            .info()
            .map_err(|e| failed(format!("reading the id of map {}", path.display()))(e.into()))?
            .id();
        Ok(Self { path, id })
    }

    /// `program`, pinned at `path`.
    pub(super) fn program(path: PathBuf, program: &SkReuseport) -> Result<Self, KernelError> {
        let id = program
            .info()
            .map_err(|e| failed(format!("reading the id of program {}", path.display()))(e.into()))?
            .id();
        Ok(Self { path, id })
    }

    fn check(&self, id: u32) -> Result<(), KernelError> {
        if id == self.id {
            return Ok(());
        }
        Err(KernelError::Kernel {
            what: format!(
                "{} is no longer the object the agent pinned there (kernel id {id}, expected {}): \
                 something replaced it; restart the agent, which adopts or recreates the group",
                self.path.display(),
                self.id
            ),
            source: io::ErrorKind::InvalidData.into(),
        })
    }

    /// The map, opened from its pin.
    pub(super) fn array<V: Pod>(&self) -> Result<Array<MapData, V>, KernelError> {
        let open = || failed(format!("opening the pinned map {}", self.path.display()));
        let data = MapData::from_pin(&self.path).map_err(|e| open()(e.into()))?;
        self.check(data.info().map_err(|e| open()(e.into()))?.id())?;
        Array::try_from(Map::Array(data)).map_err(|e| open()(e.into()))
    }

    /// The program, opened from its pin.
    pub(super) fn program_of(
        &self,
        attach_type: SkReuseportAttachType,
    ) -> Result<SkReuseport, KernelError> {
        let open = || {
            failed(format!(
                "opening the pinned program {}",
                self.path.display()
            ))
        };
        let program =
            SkReuseport::from_pin(&self.path, attach_type).map_err(|e| open()(e.into()))?;
        self.check(program.info().map_err(|e| open()(e.into()))?.id())?;
        Ok(program)
    }
}
