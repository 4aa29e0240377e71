//! How much of the agent one user may take: per-uid quotas on groups and control connections,
//! and a share of each table that only root may use.
//!
//! - A non-root uid owns at most `groups_per_uid` groups (counting the ones being created)
//!   and holds at most `connections_per_uid` control connections (registrations included).
//! - Non-root users together use at most the table minus its root reserve (1/16 of it), so
//!   root's `status`, `activate` and registrations always find room, whoever filled the rest.
//! - Root is bound by the table's size alone.
//!
//! The defaults are a quarter of each table: one user can never take it all, and a few users
//! can fill the shared part only up to the reserve.

use super::registry::Refusal;
use reuseport_proto::message::{ErrorKind, Limits};

/// The agent's tables and what one user may take of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    pub max_groups: u32,
    pub groups_per_uid: u32,
    pub max_connections: u32,
    pub connections_per_uid: u32,
}

/// The default per-uid share of a table of `limit` places.
pub fn default_per_uid(limit: u32) -> u32 {
    (limit / 4).max(1)
}

/// Places of a table of `limit` that only root may take.
fn root_reserve(limit: u32) -> u32 {
    if limit < 2 { 0 } else { (limit / 16).max(1) }
}

/// Who asks for a place, and how many places are taken.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    /// The uid the place would count for.
    pub uid: u32,
    pub of_uid: u32,
    pub of_non_root: u32,
    pub total: u32,
}

/// Why a place is refused: what is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// The uid holds its quota.
    Uid,
    /// What non-root users may share is taken; the rest is root's.
    Shared,
    /// The whole table.
    Table,
}

impl Full {
    /// Whether taking away a place of `uid` would make room for a request this refused
    /// (for `requester`): which places may be evicted for it.
    pub fn freed_by(self, uid: u32, requester: u32) -> bool {
        match self {
            Self::Uid => uid == requester,
            Self::Shared => uid != 0,
            Self::Table => true,
        }
    }
}

impl Quotas {
    /// `groups_per_uid` and `connections_per_uid` default to a quarter of their table; a
    /// quota larger than its table is the table.
    pub fn new(
        max_groups: u32,
        groups_per_uid: Option<u32>,
        max_connections: u32,
        connections_per_uid: Option<u32>,
    ) -> Self {
        Self {
            max_groups,
            groups_per_uid: groups_per_uid
                .unwrap_or_else(|| default_per_uid(max_groups))
                .min(max_groups),
            max_connections,
            connections_per_uid: connections_per_uid
                .unwrap_or_else(|| default_per_uid(max_connections))
                .min(max_connections),
        }
    }

    /// Fills in what `status` reports of these quotas.
    pub fn report(&self, limits: &mut Limits) {
        limits.groups_per_uid = Some(self.groups_per_uid);
        limits.control_connections_per_uid = Some(self.connections_per_uid);
        limits.groups_reserved_for_root = Some(root_reserve(self.max_groups));
        limits.control_connections_reserved_for_root = Some(root_reserve(self.max_connections));
    }

    /// What refuses one more control connection to `usage`, if anything.
    pub fn connection_full(&self, usage: Usage) -> Option<Full> {
        check(
            usage,
            self.connections_per_uid,
            self.max_connections,
            root_reserve(self.max_connections),
        )
    }

    /// Refuses a new group owned by `owner`, asked for by `requester`, when `owners` (of the
    /// groups there are and being created) leave no room for it.
    pub fn room_for_group(
        &self,
        requester: u32,
        owner: u32,
        owners: impl Iterator<Item = u32>,
    ) -> Result<(), Refusal> {
        let mut usage = Usage {
            // NB: root may create a group for any owner, beyond that owner's quota.
            uid: if requester == 0 { 0 } else { owner },
            of_uid: 0,
            of_non_root: 0,
            total: 0,
        };
        for o in owners {
            usage.total += 1;
            usage.of_non_root += u32::from(o != 0);
            usage.of_uid += u32::from(o == owner);
        }
        let reserve = root_reserve(self.max_groups);
        let Some(full) = check(usage, self.groups_per_uid, self.max_groups, reserve) else {
            return Ok(());
        };
        let (max, quota) = (self.max_groups, self.groups_per_uid);
        let message = match full {
            Full::Uid => format!(
                "uid {owner} owns as many groups as its quota allows ({quota}, \
                 reuseport-agent --max-groups-per-uid): close the registrations of one of them, \
                 or raise the quota"
            ),
            Full::Shared => format!(
                "users other than root own every group they may ({} of {max}; {reserve} kept \
                 for root): close the registrations of a group, or raise reuseport-agent \
                 --max-groups",
                max - reserve
            ),
            Full::Table => format!(
                "the agent already manages {max} groups, its limit: close the registrations of \
                 a group, or restart the agent with a higher --max-groups"
            ),
        };
        Err(Refusal::new(ErrorKind::Limit, message))
    }

    /// What is full, for a refused or evicted connection (see [`Self::connection_full`]).
    pub fn connections_full(&self, full: Full, uid: u32) -> String {
        let (max, quota) = (self.max_connections, self.connections_per_uid);
        match full {
            Full::Uid => format!(
                "uid {uid} holds as many control connections as its quota allows ({quota}, \
                 reuseport-agent --max-connections-per-uid)"
            ),
            Full::Shared => format!(
                "users other than root hold every control connection they may ({} of {max}; \
                 {} kept for root, reuseport-agent --max-connections)",
                max - root_reserve(max),
                root_reserve(max)
            ),
            Full::Table => format!(
                "the agent holds its maximum of {max} control connections (reuseport-agent \
                 --max-connections)"
            ),
        }
    }

    /// The refusal of a control connection for `uid` when no idle one could make room.
    pub fn connection_refusal(&self, full: Full, uid: u32) -> String {
        let advice = match full {
            Full::Uid => "close some, or raise the quota",
            Full::Shared | Full::Table => "retry, or raise the limit",
        };
        format!(
            "{}, all registered or busy: {advice}",
            self.connections_full(full, uid)
        )
    }
}

/// The first rule that leaves no room for one more place of `usage.uid`.
fn check(usage: Usage, per_uid: u32, limit: u32, reserve: u32) -> Option<Full> {
    if usage.uid != 0 && usage.of_uid >= per_uid {
        Some(Full::Uid)
    } else if usage.uid != 0 && usage.of_non_root >= limit.saturating_sub(reserve) {
        Some(Full::Shared)
    } else if usage.total >= limit {
        Some(Full::Table)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas() -> Quotas {
        Quotas::new(256, None, 4096, None)
    }

    #[test]
    fn defaults_are_a_quarter_with_a_sixteenth_kept_for_root() {
        let q = quotas();
        assert_eq!((q.groups_per_uid, q.connections_per_uid), (64, 1024));
        assert_eq!((root_reserve(256), root_reserve(4096)), (16, 256));
        let small = Quotas::new(1, None, 3, Some(10));
        assert_eq!(
            (small.groups_per_uid, small.connections_per_uid),
            (1, 3),
            "a quota is never larger than its table"
        );
        assert_eq!(
            root_reserve(1),
            0,
            "a table of one place has nothing to keep"
        );
    }

    #[test]
    fn one_user_gets_its_quota_and_users_together_leave_roots_share() {
        let q = Quotas::new(8, None, 64, None);
        // uid 1000 owns 2 groups: its quota.
        let e = q
            .room_for_group(1000, 1000, [1000, 1000].into_iter())
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Limit);
        assert!(e.message.contains("--max-groups-per-uid"), "{e}");
        // Users own 7 of 8: the last one is root's.
        let users = [1, 1, 2, 2, 3, 3, 4];
        let e = q.room_for_group(5, 5, users.into_iter()).unwrap_err();
        assert!(e.message.contains("kept for root"), "{e}");
        q.room_for_group(0, 0, users.into_iter())
            .expect("root takes the reserved group");
        q.room_for_group(0, 5, users.into_iter())
            .expect("root may create a group for a user beyond the shares");
        let e = q
            .room_for_group(0, 0, users.into_iter().chain([0]))
            .unwrap_err();
        assert!(e.message.contains("--max-groups"), "{e}");
    }

    #[test]
    fn connections_follow_the_same_rules() {
        let q = Quotas::new(8, None, 64, Some(16));
        let usage = |uid, of_uid, of_non_root, total| Usage {
            uid,
            of_uid,
            of_non_root,
            total,
        };
        assert_eq!(q.connection_full(usage(7, 16, 16, 16)), Some(Full::Uid));
        assert_eq!(q.connection_full(usage(7, 12, 60, 60)), Some(Full::Shared));
        assert_eq!(q.connection_full(usage(0, 0, 60, 60)), None);
        assert_eq!(q.connection_full(usage(0, 4, 60, 64)), Some(Full::Table));
        assert_eq!(q.connection_full(usage(7, 3, 10, 64)), Some(Full::Table));
        assert!(Full::Uid.freed_by(7, 7) && !Full::Uid.freed_by(8, 7));
        assert!(Full::Shared.freed_by(8, 7) && !Full::Shared.freed_by(0, 7));
        assert!(Full::Table.freed_by(0, 7));
        assert!(
            q.connection_refusal(Full::Shared, 7)
                .contains("60 of 64; 4 kept for root")
        );
    }
}
