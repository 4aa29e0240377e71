//! Parsers of the values subcommands take: durations, signals, generation names.

use std::time::Duration;

use nix::sys::signal::Signal;
use reuseport_client::proto::MAX_NAME_LEN;

/// A duration as humantime reads it, with a unit always (`500ms`, `2s`, `1m30s`, `1h`): the
/// one rule for every duration the project takes, here, in the agent and in xtask.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| {
        format!("{s:?} is not a duration: {e} (use a number and a unit: 500ms, 2s, 1m)")
    })
}

/// A signal by name (`TERM`, `sigterm`, `SIGTERM`) or number.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("{n} is not a signal number"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse().map_err(|_| {
        format!("unknown signal {s:?}: use a name such as TERM, QUIT, USR1, or a number")
    })
}

/// The name must fit both the agent (length) and LISTEN_FDNAMES (no ':', which separates
/// names there, and no control characters: systemd's rule).
pub fn parse_name(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii() && !b.is_ascii_control() && b != b':');
    if valid {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "use 1 to {MAX_NAME_LEN} ASCII characters, no ':' and no control characters \
             (the name is passed in LISTEN_FDNAMES)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        for bad in ["", "5", "s", "-1s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn signals_by_name_or_number() {
        for s in ["TERM", "term", "SIGTERM", "15"] {
            assert_eq!(parse_signal(s), Ok(Signal::SIGTERM), "{s}");
        }
        assert_eq!(parse_signal("quit"), Ok(Signal::SIGQUIT));
        assert!(parse_signal("NOPE").unwrap_err().contains("unknown signal"));
        assert!(parse_signal("99").unwrap_err().contains("not a signal"));
    }

    #[test]
    fn names_fit_listen_fdnames() {
        assert_eq!(parse_name("web v2").as_deref(), Ok("web v2"));
        for bad in ["", "a:b", "tab\there", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(parse_name(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
