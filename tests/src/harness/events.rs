//! The JSON events of `reuseportctl exec --json` and `supervise --json` (docs/operations.md,
//! "Launcher events"), read back from the file their stdout went to.

use std::path::Path;

use serde_json::Value;

/// Every line of `path` as a JSON event; panics unless each one is a JSON object with an
/// `event` name and a `time`: nothing else may reach the launcher's stdout, not even what its
/// servers print there.
pub fn launcher_events(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading the events in {}: {e}", path.display()));
    text.lines()
        .map(|line| {
            let event: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "every stdout line of a launcher under --json should be JSON ({e}): {line:?}"
                )
            });
            assert!(
                event["event"].is_string() && event["time"].is_string(),
                "each event should name itself and say when: {line}"
            );
            event
        })
        .collect()
}

/// Whether `event` has every field of `pattern` with the same value.
fn event_matches(event: &Value, pattern: &Value) -> bool {
    pattern
        .as_object()
        .expect("a pattern is a JSON object")
        .iter()
        .all(|(key, value)| &event[key] == value)
}

/// Asserts that events matching `expected` appear in `events` in this order, others
/// possibly between them; returns the matching events.
pub fn assert_event_sequence<'a>(events: &'a [Value], expected: &[Value]) -> Vec<&'a Value> {
    let mut rest = events.iter();
    expected
        .iter()
        .map(|pattern| {
            rest.find(|e| event_matches(e, pattern)).unwrap_or_else(|| {
                let lines: Vec<String> = events.iter().map(Value::to_string).collect();
                panic!(
                    "the launcher should report {pattern} after the events before it in {}; \
                     its events:\n{}",
                    Value::Array(expected.to_vec()),
                    lines.join("\n")
                )
            })
        })
        .collect()
}

/// Whether the file has an event matching `pattern` yet (for waiting on one).
pub fn has_event(path: &Path, pattern: &Value) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| {
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|e| event_matches(&e, pattern))
    })
}
