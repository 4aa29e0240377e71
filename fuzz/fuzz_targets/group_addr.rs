//! Group addresses as users type them (`tcp://IP:PORT[@NETNS]`, read by `GroupAddr`'s
//! `FromStr` for every CLI argument such as `--listen ADDR:PORT` and `activate ADDR`) and as
//! requests carry them (JSON strings).
//!
//! Input: up to two addresses, one a line, so that the bpffs directory names of two groups
//! can be compared.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reuseport_proto::{GroupAddr, GroupKey};

/// The initial network namespace's usual inode, for addresses that name none.
const SOME_NETNS: u64 = 4026531840;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (first, second) = text.split_once('\n').unwrap_or((text, ""));
    let (Some(a), Some(b)) = (check(first), check(second)) else {
        return;
    };
    if a.pin_name() == b.pin_name() {
        assert_eq!(
            a,
            b,
            "two groups should never share the bpffs directory {}",
            a.pin_name()
        );
    }
});

/// Checks what holds for one address; the group it names, if it parses.
fn check(input: &str) -> Option<GroupKey> {
    let addr = match input.parse::<GroupAddr>() {
        Ok(addr) => addr,
        Err(e) => {
            let _ = e.to_string();
            return None;
        }
    };
    assert_ne!(addr.addr.port(), 0, "port 0 should be refused");
    let shown = addr.to_string();
    assert!(
        shown.starts_with("tcp://"),
        "{shown:?} should name its scheme"
    );
    let again: GroupAddr = shown
        .parse()
        .unwrap_or_else(|e| panic!("{shown:?} (from {input:?}) should parse back: {e}"));
    assert_eq!(again, addr, "{input:?} should survive Display -> parse");
    let json = serde_json::to_string(&addr).expect("an address serializes");
    let from_json: GroupAddr =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json} should deserialize: {e}"));
    assert_eq!(from_json, addr, "{input:?} should survive JSON");

    let key = GroupKey {
        addr: addr.addr,
        netns: addr.netns.unwrap_or(SOME_NETNS),
    };
    assert!(key.matches(&addr), "{key} should match {addr}");
    let pin = key.pin_name();
    assert!(
        !pin.is_empty() && pin.len() <= 255 && !pin.contains(['.', '/', '\0']),
        "{pin:?} should be a valid bpffs name"
    );
    Some(key)
}
