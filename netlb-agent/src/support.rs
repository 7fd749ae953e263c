//! Helpers every layer uses, in one copy.

use std::sync::{Mutex, MutexGuard};

/// An error's causes, outermost first, joined with ": " (the error itself
/// is left to the caller's `{e}`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

/// Locks `m`, also after a panic elsewhere poisoned it: every mutex of the
/// agent guards state that is only ever updated whole (an object, a
/// report), so a panic cannot leave it torn.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn the_chain_lists_the_causes_outermost_first() {
        let e = Outer(Middle(std::io::Error::other("inner")));
        assert_eq!(error_chain(&e), "middle: inner");
    }
}
