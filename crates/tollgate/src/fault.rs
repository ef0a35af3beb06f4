//! Fault injection for tests, in debug builds only: a test arms a marker for a named point,
//! and the code at that point panics when it sees the marker (in the text it estimates, the
//! model it settles). It is how the tests prove that a panic on a settlement path still
//! writes the request's record, and that a panicking handler answers 500 in the caller's
//! dialect instead of dropping the connection.

use std::sync::Mutex;

static ARMED: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());

pub fn arm(point: &'static str, marker: &str) {
    ARMED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((point, marker.to_string()));
}

pub(crate) fn check(point: &'static str, seen: &str) {
    let hit = ARMED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|(p, m)| *p == point && seen.contains(m.as_str()));
    if hit {
        panic!("injected fault at {point}");
    }
}
