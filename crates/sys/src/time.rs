//! Wall-clock time as Ferry stores it: milliseconds since the Unix epoch.

/// Milliseconds since the Unix epoch; 0 if the clock is before 1970 (never negative, never a panic).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_is_after_2020() {
        assert!(super::now_ms() > 1_577_836_800_000);
    }
}
