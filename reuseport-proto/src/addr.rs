//! Group addresses: `tcp://127.0.0.1:8080`, `tcp://[::]:443`, optionally `…@NETNS` where
//! NETNS is the inode number of a network namespace (as in `ls -Li /proc/self/ns/net`).

use std::{fmt, net::SocketAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// Where a reuseport group listens. Two network namespaces listening on the same ip:port are
/// two groups, so the namespace is part of the identity once a group exists
/// ([`GroupKey`]); an address typed by a user may leave it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupAddr {
    pub addr: SocketAddr,
    /// Network namespace inode; `None` means "the caller's namespace, or the only match".
    pub netns: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("bad address {input:?}: only tcp:// is supported (e.g. tcp://127.0.0.1:8080)")]
    Scheme { input: String },
    #[error(
        "bad address {input:?}: expected IP:PORT such as 127.0.0.1:8080 or [::]:443 (hostnames are not resolved)"
    )]
    Syntax { input: String },
    #[error(
        "bad address {input:?}: port 0 is not a fixed port; name the port the group listens on"
    )]
    PortZero { input: String },
    #[error("bad address {input:?}: network namespace must be an inode number after '@'")]
    Netns { input: String },
    #[error(
        "bad address: {len} bytes long, more than any group address ({} at most)",
        crate::text::MAX_ADDR_LEN
    )]
    TooLong { len: usize },
}

impl FromStr for GroupAddr {
    type Err = AddrError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.len() > crate::text::MAX_ADDR_LEN {
            return Err(AddrError::TooLong { len: input.len() });
        }
        let s = input.trim();
        let rest = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("tcp") => rest,
            Some(_) => {
                return Err(AddrError::Scheme {
                    input: input.into(),
                });
            }
            None => s,
        };
        let (addr, netns) = match rest.rsplit_once('@') {
            Some((addr, ns)) => {
                let ns = ns.parse::<u64>().map_err(|_| AddrError::Netns {
                    input: input.into(),
                })?;
                (addr, Some(ns))
            }
            None => (rest, None),
        };
        let addr: SocketAddr = addr.parse().map_err(|_| AddrError::Syntax {
            input: input.into(),
        })?;
        if addr.port() == 0 {
            return Err(AddrError::PortZero {
                input: input.into(),
            });
        }
        Ok(Self { addr, netns })
    }
}

impl GroupAddr {
    /// The address with the calling thread's network namespace filled in (unless it names
    /// one already): the group a socket bound here joins. Launchers name their group this
    /// way, so that the same ip:port in another namespace never makes it ambiguous.
    pub fn in_caller_netns(self) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        if self.netns.is_some() {
            return Ok(self);
        }
        let ino = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
        Ok(Self {
            netns: Some(ino),
            ..self
        })
    }
}

impl fmt::Display for GroupAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tcp://{}", self.addr)?;
        if let Some(ns) = self.netns {
            write!(f, "@{ns}")?;
        }
        Ok(())
    }
}

impl Serialize for GroupAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GroupAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The identity of an existing group: address plus the namespace it lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    pub addr: SocketAddr,
    pub netns: u64,
}

impl GroupKey {
    pub fn to_addr(self) -> GroupAddr {
        GroupAddr {
            addr: self.addr,
            netns: Some(self.netns),
        }
    }

    /// Whether a user-typed address names this group.
    pub fn matches(&self, wanted: &GroupAddr) -> bool {
        self.addr == wanted.addr && wanted.netns.is_none_or(|ns| ns == self.netns)
    }

    /// A name usable as a bpffs directory, one per group: `tcp4_127_0_0_1_8080_4026531840`,
    /// `tcp6_fe80__1%2_443_4026531840` (a link-local address's scope is its interface, and
    /// each interface has its own group).
    /// NB: bpffs refuses names containing '.' (EPERM).
    pub fn pin_name(&self) -> String {
        let (family, ip, scope) = match self.addr {
            SocketAddr::V4(a) => ("tcp4", a.ip().to_string(), 0),
            // NB: an IPv4-mapped address displays as `::ffff:1.2.3.4`, which with '.'
            // replaced would be the name of `::ffff:1:2:3:4`: spell it in hex instead.
            SocketAddr::V6(a) => {
                let ip = if a.ip().to_ipv4_mapped().is_some() {
                    let s = a.ip().segments();
                    format!("::ffff:{:x}:{:x}", s[6], s[7])
                } else {
                    a.ip().to_string()
                };
                ("tcp6", ip, a.scope_id())
            }
        };
        let ip = ip.replace(['.', ':'], "_");
        let scope = if scope == 0 {
            String::new()
        } else {
            format!("%{scope}")
        };
        format!("{family}_{ip}{scope}_{}_{}", self.addr.port(), self.netns)
    }
}

impl fmt::Display for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_addr().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms_users_type() {
        let a: GroupAddr = "tcp://127.0.0.1:8080".parse().unwrap();
        assert_eq!(a.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(a.netns, None);
        let b: GroupAddr = "[::]:443".parse().unwrap();
        assert_eq!(b.to_string(), "tcp://[::]:443");
        let c: GroupAddr = "tcp://[::1]:80@4026531840".parse().unwrap();
        assert_eq!(c.netns, Some(4026531840));
        assert_eq!(c.to_string(), "tcp://[::1]:80@4026531840");
        assert_eq!(c.to_string().parse::<GroupAddr>().unwrap(), c);
    }

    #[test]
    fn rejects_with_actionable_errors() {
        for (input, hint) in [
            ("udp://1.2.3.4:5", "only tcp://"),
            ("localhost:80", "hostnames are not resolved"),
            ("127.0.0.1", "expected IP:PORT"),
            ("127.0.0.1:0", "port 0"),
            ("127.0.0.1:80@x", "inode number"),
            ("", "expected IP:PORT"),
        ] {
            let err = input.parse::<GroupAddr>().unwrap_err().to_string();
            assert!(err.contains(hint), "{input:?}: {err}");
        }
    }

    #[test]
    fn pin_names_are_path_safe() {
        let k = GroupKey {
            addr: "[::1]:443".parse().unwrap(),
            netns: 7,
        };
        assert_eq!(k.pin_name(), "tcp6___1_443_7");
        let k = GroupKey {
            addr: "127.0.0.1:80".parse().unwrap(),
            netns: 7,
        };
        assert_eq!(k.pin_name(), "tcp4_127_0_0_1_80_7");
        assert!(!k.pin_name().contains(['/', '.']));
    }

    /// Two groups must never share a directory (the scope case was found by the
    /// `group_addr` fuzz target).
    #[test]
    fn pin_names_differ_between_groups() {
        let pin = |addr: &str| {
            GroupKey {
                addr: addr.parse().unwrap(),
                netns: 7,
            }
            .pin_name()
        };
        for (a, b) in [
            ("[fe80::1%2]:80", "[fe80::1%3]:80"),
            ("[fe80::1%2]:80", "[fe80::1]:80"),
            ("[::ffff:1.2.3.4]:80", "[::ffff:1:2:3:4]:80"),
        ] {
            assert_ne!(pin(a), pin(b), "{a} and {b} are different groups");
        }
        assert_eq!(pin("[fe80::1%2]:80"), "tcp6_fe80__1%2_80_7");
        assert_eq!(pin("[::ffff:1.2.3.4]:80"), "tcp6___ffff_102_304_80_7");
    }
}
