//! The record of a group that the agent pins next to the group's maps (the `STATE` map,
//! see [`reuseport_common::PinnedState`]), so that a restarted or upgraded agent can adopt
//! the group: addresses, owner, generations with their states and names, and which socket
//! (by cookie) sits in which slot.
//!
//! The sockets are a fixed-size binary table, one [`SlotRecord`] per slot; the rest is JSON
//! behind the binary header: fields may be added with a serde default without an ABI bump;
//! removing or changing one is an ABI change.

use std::net::SocketAddr;

use reuseport_common::{
    MAX_SLOTS, PinnedState, SLOT_SERVER, SLOT_USED, STATE_CAPACITY, STATE_MAGIC, SlotRecord,
    StateHeader,
};
use serde::{Deserialize, Serialize};

use super::registry::{Member, Refusal, Registry};
use reuseport_proto::{
    addr::GroupKey,
    message::{ErrorKind, RestartOutcome},
};

#[derive(Debug, Serialize, Deserialize)]
pub struct GroupRecord {
    pub addr: SocketAddr,
    pub netns: u64,
    pub owner_uid: u32,
    /// Serial of the table published with this record.
    pub serial: u32,
    /// `kernel::program_id` of the program the writer ran (empty: unknown).
    #[serde(default)]
    pub program: String,
    pub registry: Registry,
    /// What the group's supervisor last reported about a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart: Option<RestartOutcome>,
    /// The device the group's sockets are bound to (`SO_BINDTODEVICE`): `Some(None)` for
    /// none, `None` in a record of an agent that did not keep it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub bound_device: Option<Option<String>>,
}

/// A field that is present, `null` included: `Some` (an absent one is the default, `None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

impl GroupRecord {
    pub fn key(&self) -> GroupKey {
        GroupKey {
            addr: self.addr,
            netns: self.netns,
        }
    }
}

/// Runs `f` on this thread's record buffer. Every group encodes into it: a buffer per group
/// made 32 KiB of every group's memory, and a fresh 32 KiB allocation per flip cost tens of
/// microseconds in page faults. [`encode`] zeroes what a longer record left behind.
pub fn with_buffer<R>(f: impl FnOnce(&mut PinnedState) -> R) -> R {
    thread_local! {
        static BUFFER: std::cell::RefCell<Box<PinnedState>> = std::cell::RefCell::new(buffer());
    }
    BUFFER.with_borrow_mut(|b| f(b))
}

/// A zeroed record buffer.
pub fn buffer() -> Box<PinnedState> {
    // NB: built in place: a 72 KiB value on the stack of a tokio worker is needless risk.
    let mut b: Box<std::mem::MaybeUninit<PinnedState>> = Box::new_uninit();
    // SAFETY: PinnedState is plain integers and bytes; all zeroes is a valid value.
    unsafe {
        b.as_mut_ptr().write_bytes(0, 1);
        b.assume_init()
    }
}

fn slot_record(generation: u32, m: &Member) -> SlotRecord {
    SlotRecord {
        cookie: m.cookie,
        reg: m.reg,
        generation,
        pid: m.pid,
        uid: m.uid,
        drops_base: m.drops_base,
        flags: SLOT_USED | if m.server { SLOT_SERVER } else { 0 },
        _pad: 0,
    }
}

fn member(r: &SlotRecord) -> Member {
    Member {
        reg: r.reg,
        pid: r.pid,
        uid: r.uid,
        cookie: r.cookie,
        drops_base: r.drops_base,
        server: r.flags & SLOT_SERVER != 0,
    }
}

/// Encodes `record` with `abi_version` in the header, into `out`.
pub fn encode(
    record: &GroupRecord,
    abi_version: u32,
    out: &mut PinnedState,
) -> Result<(), Refusal> {
    let previous = out.header.len as usize;
    out.slots.fill(SlotRecord::default());
    for (n, g) in &record.registry.generations {
        for (slot, m) in &g.sockets {
            // Slots come from the group's pool, always below MAX_SLOTS.
            out.slots[*slot as usize] = slot_record(*n, m);
        }
    }
    let mut rest = &mut out.data[..];
    if serde_json::to_writer(&mut rest, record).is_err() {
        return Err(Refusal::new(
            ErrorKind::Limit,
            format!(
                "the group's record would take more than the {STATE_CAPACITY} bytes its pinned \
                 STATE map holds: use shorter generation names or fewer generations"
            ),
        ));
    }
    let len = STATE_CAPACITY - rest.len();
    // Bytes a longer record left behind: not read (the header says how many are), zeroed
    // so that the pinned map holds nothing stale.
    if previous > len {
        out.data[len..previous.min(STATE_CAPACITY)].fill(0);
    }
    out.header = StateHeader {
        magic: STATE_MAGIC,
        abi_version,
        len: len as u32,
        _pad: 0,
    };
    Ok(())
}

/// Decodes a record whose header was already checked (magic, adoptable version).
pub fn decode(state: &PinnedState) -> Result<GroupRecord, String> {
    let len = state.header.len as usize;
    let bytes = state
        .data
        .get(..len)
        .ok_or_else(|| format!("record length {len} exceeds the map's {STATE_CAPACITY} bytes"))?;
    let mut record: GroupRecord =
        serde_json::from_slice(bytes).map_err(|e| format!("undecodable record: {e}"))?;
    for (slot, r) in (0..MAX_SLOTS).zip(&state.slots) {
        if r.flags & SLOT_USED == 0 {
            continue;
        }
        let g = record
            .registry
            .generations
            .get_mut(&r.generation)
            .ok_or_else(|| {
                format!(
                    "slot {slot} names generation {}, which the record does not hold",
                    r.generation
                )
            })?;
        g.sockets.insert(slot, member(r));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let mut registry = Registry::default();
        let m = |reg, cookie| Member {
            reg,
            pid: 10,
            uid: 0,
            cookie,
            drops_base: 3,
            server: true,
        };
        registry.register(1, Some("v1".into()), false, 0, m(1, 100));
        registry.register(2, None, true, 5, m(2, 200));
        let rec = GroupRecord {
            addr: "[::1]:443".parse().unwrap(),
            netns: 42,
            owner_uid: 7,
            serial: 9,
            program: "select-or-migrate-00".into(),
            registry,
            last_restart: Some(RestartOutcome::Active { generation: 2 }),
            bound_device: Some(None),
        };
        let mut state = buffer();
        encode(&rec, 3, &mut state).unwrap();
        assert_eq!(state.header.magic, STATE_MAGIC);
        assert_eq!(state.header.abi_version, 3);
        let back = decode(&state).unwrap();
        assert_eq!(back.key(), rec.key());
        assert_eq!(back.owner_uid, 7);
        assert_eq!(back.serial, 9);
        assert_eq!(back.last_restart, rec.last_restart);
        assert_eq!(back.bound_device, Some(None), "no device is kept as such");
        assert_eq!(
            format!("{:?}", back.registry),
            format!("{:?}", rec.registry),
            "the registry should come back exactly"
        );
    }

    /// Names and error texts are capped (see `reuseport_proto::text`), so a full group (every
    /// slot, as many generations as a group holds, each with the longest name), a restart
    /// error of the longest length and generous figures fit the record, and come back whole.
    #[test]
    fn a_full_group_with_the_longest_names_fits_the_record() {
        use reuseport_common::{MAX_GENERATIONS, MAX_SLOTS};
        use reuseport_proto::text::{MAX_ERROR_LEN, MAX_NAME_LEN};
        let mut registry = Registry::default();
        for slot in 0..MAX_SLOTS {
            let member = Member {
                reg: 1_000_000 + u64::from(slot),
                pid: 4_194_304,
                uid: 1_000_000,
                cookie: (1 << 40) + u64::from(slot),
                drops_base: u32::MAX,
                server: slot % 2 == 0,
            };
            let generation = 1_000_000 + slot % MAX_GENERATIONS;
            registry.register(
                generation,
                Some("n".repeat(MAX_NAME_LEN)),
                true,
                slot,
                member,
            );
            let g = registry.generations.get_mut(&generation).unwrap();
            g.retired_counters = reuseport_common::SlotCounters {
                selected: 1 << 40,
                fallback: 1 << 30,
                migrated: 1 << 30,
                unsteered: 0,
            };
        }
        let rec = GroupRecord {
            addr: "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                .parse()
                .unwrap(),
            netns: 4_026_531_840,
            owner_uid: 1_000_000,
            serial: u32::MAX,
            program: crate::kernel::program_id(crate::kernel::Mode::SelectOrMigrate),
            registry,
            last_restart: Some(RestartOutcome::Failed {
                error: "e".repeat(MAX_ERROR_LEN),
            }),
            // NB: IFNAMSIZ - 1 bytes, the longest device name there is.
            bound_device: Some(Some("d".repeat(15))),
        };
        let mut state = buffer();
        encode(&rec, reuseport_common::ABI_VERSION, &mut state)
            .unwrap_or_else(|e| panic!("a full group should fit its record: {e}"));
        println!(
            "{MAX_SLOTS} sockets in {MAX_GENERATIONS} generations with the longest names: \
             {} of {STATE_CAPACITY} bytes of JSON",
            state.header.len
        );
        let back = decode(&state).unwrap();
        assert_eq!(back.registry.generations.len(), MAX_GENERATIONS as usize);
        assert_eq!(
            format!("{:?}", back.registry),
            format!("{:?}", rec.registry),
            "every socket and generation should come back exactly"
        );
    }

    #[test]
    fn a_slot_of_an_unknown_generation_is_an_error() {
        let mut state = buffer();
        encode(&empty_record(), reuseport_common::ABI_VERSION, &mut state).unwrap();
        state.slots[7] = SlotRecord {
            generation: 3,
            flags: SLOT_USED,
            ..SlotRecord::default()
        };
        let e = decode(&state).unwrap_err();
        assert!(e.contains("slot 7 names generation 3"), "{e}");
    }

    fn empty_record() -> GroupRecord {
        GroupRecord {
            addr: "127.0.0.1:1".parse().unwrap(),
            netns: 1,
            owner_uid: 0,
            serial: 0,
            program: String::new(),
            registry: Registry::default(),
            last_restart: None,
            bound_device: None,
        }
    }

    #[test]
    fn a_record_without_a_device_field_says_it_is_unknown() {
        let old = r#"{"addr":"127.0.0.1:1","netns":1,"owner_uid":0,"serial":0,
            "registry":{"generations":{}}}"#;
        let rec: GroupRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.bound_device, None);
        let lo: GroupRecord = serde_json::from_str(
            &old.replace(r#""serial":0"#, r#""serial":0,"bound_device":"lo""#),
        )
        .unwrap();
        assert_eq!(lo.bound_device, Some(Some("lo".into())));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut state = buffer();
        encode(&empty_record(), reuseport_common::ABI_VERSION, &mut state).unwrap();
        state.data[0] = b'!';
        assert!(decode(&state).is_err());
        state.header.len = u32::MAX;
        assert!(decode(&state).is_err());
    }
}
