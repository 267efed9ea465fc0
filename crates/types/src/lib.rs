//! Ferry's small shared vocabulary, used by every crate and by both ends of every boundary: the
//! one registry of error codes ([`codes`]) and validated object names ([`validate_name`]).
//!
//! Leaf crate: no I/O, no async, serde derives only.

pub mod codes;

pub use codes::{ErrorCode, HasErrorCode};

/// Check a machine, disk, site or other object name: 1–128 characters from `A-Z a-z 0-9 . _ -`,
/// not starting with `.`. Names become file and folder names on every hop, so nothing that could
/// climb out of a folder (`..`, `/`) or hide (a leading dot) is accepted.
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} name {name:?}: use 1-128 characters from A-Z a-z 0-9 . _ - (not starting with '.')"
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_that_could_leave_a_folder_are_refused() {
        for bad in ["", ".", "..", ".hidden", "a/b", "../x", "a b", &"x".repeat(129)] {
            assert!(super::validate_name("machine", bad).is_err(), "{bad:?}");
        }
        for good in ["vm1", "db-1.prod", "A_b", &"x".repeat(128)] {
            assert!(super::validate_name("machine", good).is_ok(), "{good:?}");
        }
    }
}
