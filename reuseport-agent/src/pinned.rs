//! The record of a group that the agent pins next to the group's maps (the `STATE` map,
//! see [`reuseport_common::PinnedState`]), so that a restarted or upgraded agent can adopt
//! the group: addresses, owner, generations with their states and names, and which socket
//! (by cookie) sits in which slot.
//!
//! The encoding is JSON behind the binary header: fields may be added with a serde default
//! without an ABI bump; removing or changing one is an ABI change.

use std::net::SocketAddr;

use reuseport_common::{PinnedState, STATE_CAPACITY, STATE_MAGIC, StateHeader};
use serde::{Deserialize, Serialize};

use super::registry::{Refusal, Registry};
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
    Box::new(PinnedState {
        header: StateHeader::default(),
        data: [0; STATE_CAPACITY],
    })
}

/// Encodes `record` with `abi_version` in the header, into `out`.
pub fn encode(
    record: &GroupRecord,
    abi_version: u32,
    out: &mut PinnedState,
) -> Result<(), Refusal> {
    let previous = out.header.len as usize;
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
    serde_json::from_slice(bytes).map_err(|e| format!("undecodable record: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Member;

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
        encode(&rec, 2, &mut state).unwrap();
        assert_eq!(state.header.magic, STATE_MAGIC);
        assert_eq!(state.header.abi_version, 2);
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

    /// Generations with the longest names a group's record holds for sure (README, "Limits").
    const GENERATIONS_WITH_LONGEST_NAMES: u32 = 100;

    /// Names and error texts are capped (see `reuseport_proto::text`), so a group holds at least
    /// [`GENERATIONS_WITH_LONGEST_NAMES`] generations with the longest names, a restart error
    /// of the longest length and generous figures. Beyond what the record holds, a change is
    /// refused as a limit (and undone, see `Group::change`), never half made.
    #[test]
    fn the_record_holds_the_documented_generations_with_longest_names() {
        use reuseport_proto::text::{MAX_ERROR_LEN, MAX_NAME_LEN};
        let mut registry = Registry::default();
        let mut fitted = 0;
        let mut state = buffer();
        for slot in 0..reuseport_common::MAX_SLOTS {
            let member = Member {
                reg: 1_000_000 + u64::from(slot),
                pid: 4_194_304,
                uid: 1_000_000,
                cookie: 1 << 40,
                drops_base: u32::MAX,
                server: true,
            };
            let generation = 1_000_000 + slot;
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
            let rec = GroupRecord {
                addr: "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                    .parse()
                    .unwrap(),
                netns: 4_026_531_840,
                owner_uid: 1_000_000,
                serial: u32::MAX,
                program: crate::kernel::program_id(crate::kernel::Mode::SelectOrMigrate),
                registry: Registry {
                    generations: registry.generations.clone(),
                },
                last_restart: Some(RestartOutcome::Failed {
                    error: "e".repeat(MAX_ERROR_LEN),
                }),
                // NB: IFNAMSIZ - 1 bytes, the longest device name there is.
                bound_device: Some(Some("d".repeat(15))),
            };
            match encode(&rec, 2, &mut state) {
                Ok(()) => fitted = slot + 1,
                Err(e) => {
                    assert_eq!(e.kind, ErrorKind::Limit, "{e}");
                    break;
                }
            }
        }
        println!("generations with the longest names in one record: {fitted}");
        assert!(
            fitted >= GENERATIONS_WITH_LONGEST_NAMES,
            "only {fitted} generations with {MAX_NAME_LEN}-byte names fit the record"
        );
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
        encode(
            &GroupRecord {
                addr: "127.0.0.1:1".parse().unwrap(),
                netns: 1,
                owner_uid: 0,
                serial: 0,
                program: String::new(),
                registry: Registry::default(),
                last_restart: None,
                bound_device: None,
            },
            2,
            &mut state,
        )
        .unwrap();
        state.data[0] = b'!';
        assert!(decode(&state).is_err());
        state.header.len = u32::MAX;
        assert!(decode(&state).is_err());
    }
}
