//! What a group's pin directory holds, read without taking the group over: its record
//! (whatever ABI version pinned it) and whether its sockets still listen.

use std::{os::fd::AsFd as _, path::Path};

use aya::maps::MapData;
use reuseport_common::{ADOPTABLE_ABI, MAX_SLOTS, MapNames, PinnedState, STATE_MAGIC, StateHeader};

use super::sys;

/// What a group directory in bpffs holds.
pub enum PinnedRecord {
    /// A record this agent can adopt.
    Adoptable(Box<PinnedState>),
    /// Pinned by an agent of an ABI version this one cannot adopt.
    Incompatible { abi_version: u32 },
    /// No record at all (pinned by a version 1 agent) or not one of ours.
    Missing,
    /// Our `STATE` map, never written: an agent died while creating the group, before its
    /// first publish. Nothing was attached yet, so there is nothing to adopt.
    Unwritten,
}

/// Reads the `STATE` record pinned in `pin_dir` without touching anything else.
///
/// NB: read as bytes of the map's own value size: records of other ABI versions have other
/// sizes, and their header still says which version pinned them.
pub fn read_pinned(pin_dir: &Path) -> PinnedRecord {
    let Ok(data) = MapData::from_pin(pin_dir.join(MapNames::STATE)) else {
        return PinnedRecord::Missing;
    };
    let Ok(size) = data.info().map(|i| i.value_size() as usize) else {
        return PinnedRecord::Missing;
    };
    if size < size_of::<StateHeader>() {
        return PinnedRecord::Missing;
    }
    let mut bytes = vec![0u8; size];
    if sys::array_lookup(data.fd().as_fd(), 0, &mut bytes).is_err() {
        return PinnedRecord::Missing;
    }
    // SAFETY: at least a header's bytes; StateHeader is plain integers, any bytes are valid.
    let header: StateHeader = unsafe { bytes.as_ptr().cast::<StateHeader>().read_unaligned() };
    if header == StateHeader::default() {
        PinnedRecord::Unwritten
    } else if header.magic != STATE_MAGIC {
        PinnedRecord::Missing
    } else if ADOPTABLE_ABI.contains(&header.abi_version) && size == size_of::<PinnedState>() {
        let mut record = crate::pinned::buffer();
        // SAFETY: exactly size_of::<PinnedState>() bytes into a PinnedState, which any
        // bytes are a valid value of (integers and byte arrays).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                std::ptr::from_mut(&mut *record).cast::<u8>(),
                size,
            );
        }
        PinnedRecord::Adoptable(record)
    } else {
        PinnedRecord::Incompatible {
            abi_version: header.abi_version,
        }
    }
}

/// Whether any slot of the sockarray pinned in `pin_dir` still holds a socket.
pub fn pinned_sockets_live(pin_dir: &Path) -> bool {
    let Ok(data) = MapData::from_pin(pin_dir.join(MapNames::SOCKETS)) else {
        return false;
    };
    (0..MAX_SLOTS).any(|slot| matches!(sys::sockarray_cookie(data.fd().as_fd(), slot), Ok(Some(_))))
}
