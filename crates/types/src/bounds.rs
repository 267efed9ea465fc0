//! Range checks for numbers that come from outside (configuration files, `--set` flags, settings
//! pushed by the configuration server, API bodies), used as serde `deserialize_with` helpers so
//! the error names the key and the file. A number of seconds must be finite and at most
//! [`MAX_SECS`]: `inf`, NaN or `1e300` would otherwise reach `Duration::from_secs_f64` in a
//! background task and panic it later, leaving a daemon that runs but never replicates.

use serde::{de::Error, Deserialize, Deserializer};

/// The longest interval, timeout or window any setting accepts: ten years.
pub const MAX_SECS: f64 = 10.0 * 365.0 * 86_400.0;

/// `v` as a number of seconds, or why it is not one.
pub fn check_secs(v: f64) -> Result<f64, String> {
    if v.is_finite() && (0.0..=MAX_SECS).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{} is not a number of seconds from 0 to {MAX_SECS} (ten years)", show(v)))
    }
}

/// `v` as a percentage (0 to 100), or why it is not one.
pub fn check_percent(v: f64) -> Result<f64, String> {
    if v.is_finite() && (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{} is not a percentage from 0 to 100", show(v)))
    }
}

/// What a batch of records or chunks may hold (`batch_bytes`, `forward_batch_bytes`): at least
/// a block, at most half a frame.
pub const BATCH_BYTES: (u64, u64) = (4096, 32 << 20);

/// A size or count key of a component's configuration within `min..=max`, or an error that
/// names the key and the range (sizes are checked at start: 0 or 2^64 would otherwise reach an
/// allocation or a division much later).
pub fn check_range(key: &str, v: u64, min: u64, max: u64) -> Result<(), String> {
    if (min..=max).contains(&v) {
        Ok(())
    } else {
        Err(format!("{key} = {v} is out of range: use {min} to {max}"))
    }
}

/// A number as a person reads it: 1e300, not three hundred digits.
fn show(v: f64) -> String {
    if v.is_finite() && v.abs() >= 1e15 {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// Seconds: finite, 0 to [`MAX_SECS`].
pub fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    check_secs(f64::deserialize(d)?).map_err(D::Error::custom)
}

/// Optional seconds, each as [`secs`].
pub fn opt_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Option::<f64>::deserialize(d)?.map(check_secs).transpose().map_err(D::Error::custom)
}

/// A percentage as a float: finite, 0 to 100.
pub fn percent<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    check_percent(f64::deserialize(d)?).map_err(D::Error::custom)
}

/// A whole percentage: 0 to 100.
pub fn percent_u8<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let v = u8::deserialize(d)?;
    if v <= 100 {
        Ok(v)
    } else {
        Err(D::Error::custom(format!("{v} is not a percentage from 0 to 100")))
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    struct Conf {
        #[serde(deserialize_with = "super::secs")]
        every_secs: f64,
        #[serde(default, deserialize_with = "super::opt_secs")]
        timeout_secs: Option<f64>,
        #[serde(default, deserialize_with = "super::percent")]
        free_percent: f64,
    }

    #[test]
    fn numbers_no_setting_can_mean_are_refused_naming_the_range() {
        for bad in [r#"{"every_secs": -1}"#, r#"{"every_secs": 1e300}"#, r#"{"every_secs": 1, "timeout_secs": 4e8}"#] {
            let e = serde_json::from_str::<Conf>(bad).unwrap_err().to_string();
            assert!(e.contains("is not a number of seconds from 0 to"), "{bad}: {e}");
        }
        let e = serde_json::from_str::<Conf>(r#"{"every_secs": 1e300}"#).unwrap_err().to_string();
        assert!(e.starts_with("1e300 is not"), "{e}");
        let e = serde_json::from_str::<Conf>(r#"{"every_secs": 1, "free_percent": 200}"#).unwrap_err().to_string();
        assert!(e.contains("200 is not a percentage"), "{e}");
        assert!(super::check_secs(f64::INFINITY).is_err() && super::check_secs(f64::NAN).is_err());
        assert!(super::check_percent(f64::NAN).is_err());
        let ok: Conf = serde_json::from_str(r#"{"every_secs": 0.2, "timeout_secs": 0}"#).unwrap();
        assert_eq!((ok.every_secs, ok.timeout_secs, ok.free_percent), (0.2, Some(0.0), 0.0));
    }
}
