//! Text that crosses the control socket: the length cap of every string field of a request,
//! which characters a generation name may hold, and how text from the agent is made safe for
//! a terminal (`docs/protocol.md`, "Requests", states the same rules).
//!
//! Every string a client sends is bounded here, not only by the frame size: what the agent
//! keeps (names, a supervisor's error text) is pinned in the group's record, whose size is
//! fixed, and printed by `reuseportctl status` on an operator's terminal.

use std::borrow::Cow;

use crate::message::{Op, Register, RestartOutcome};

/// Longest generation name (`register`'s `name`), in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest error text of a `restart_result` (`error`), in bytes.
pub const MAX_ERROR_LEN: usize = 1024;
/// Longest group address as written in a request (`group`), in bytes; the longest valid one
/// (`tcp://[` IPv6 with an embedded IPv4 and a scope `]:PORT@NETNS`) is about 90.
pub const MAX_ADDR_LEN: usize = 128;

/// A request field that breaks its rule.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FieldError {
    #[error("{field} is {len} bytes long; at most {max} are accepted")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error(
        "name {name:?} holds a control or bidirectional-formatting character: use printable \
         characters only"
    )]
    Unprintable { name: String },
}

/// Checks the string fields of `op` (the address is checked when it is parsed).
pub fn check(op: &Op) -> Result<(), FieldError> {
    match op {
        Op::Register(Register {
            name: Some(name), ..
        }) => check_name(name),
        Op::RestartResult {
            outcome: RestartOutcome::Failed { error },
            ..
        } => cap("error", error, MAX_ERROR_LEN),
        Op::Health {
            health:
                crate::message::GenerationHealth {
                    last_error: Some(error),
                    ..
                },
            ..
        } => cap("last_error", error, MAX_ERROR_LEN),
        _ => Ok(()),
    }
}

/// A generation name: at most [`MAX_NAME_LEN`] bytes, nothing a terminal would interpret.
pub fn check_name(name: &str) -> Result<(), FieldError> {
    cap("name", name, MAX_NAME_LEN)?;
    if name.chars().any(hidden) {
        return Err(FieldError::Unprintable { name: name.into() });
    }
    Ok(())
}

fn cap(field: &'static str, text: &str, max: usize) -> Result<(), FieldError> {
    if text.len() > max {
        return Err(FieldError::TooLong {
            field,
            len: text.len(),
            max,
        });
    }
    Ok(())
}

/// Characters that change how a terminal shows what follows: controls (escape sequences,
/// carriage returns) and the Unicode bidirectional overrides, isolates and marks (text that
/// reads differently from what it is).
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// `text` with every [`hidden`] character written as `\u{…}`, for printing text that came
/// from the agent (and so, possibly, from another user).
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if hidden(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_capped_and_printable() {
        assert!(check_name("v2.3.1 (blue)").is_ok());
        assert!(check_name(&"é".repeat(MAX_NAME_LEN / 2)).is_ok());
        assert!(matches!(
            check_name(&"x".repeat(MAX_NAME_LEN + 1)),
            Err(FieldError::TooLong {
                max: MAX_NAME_LEN,
                ..
            })
        ));
        for bad in ["a\u{1b}[2J", "tab\there", "abc\u{202E}fed", "x\u{2066}y"] {
            assert!(
                matches!(check_name(bad), Err(FieldError::Unprintable { .. })),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn escape_leaves_nothing_a_terminal_interprets() {
        assert_eq!(escape("plain text"), "plain text");
        let escaped = escape("red\u{1b}[31m\r\nrtl\u{202E}x");
        assert_eq!(escaped, "red\\u{1b}[31m\\u{d}\\u{a}rtl\\u{202e}x");
        assert!(!escaped.chars().any(hidden));
    }
}
