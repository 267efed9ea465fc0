//! Ferry's small shared vocabulary, used by every crate and by both ends of every boundary: the
//! one registry of error codes ([`codes`]), validated object names ([`validate_name`],
//! [`MachineName`], [`DiskName`]) and stream positions ([`Seq`], [`Generation`]).
//!
//! Leaf crate: no I/O, no async, serde derives only.

pub mod bounds;
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

/// Defines a name newtype: it can only hold a name [`validate_name`] accepts, so code that
/// builds a path from one never needs to check again. Deserialising checks too (the error names
/// the value); it dereferences to `str`.
macro_rules! validated_name {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// What the name names, for messages ("machine", "disk").
            pub const KIND: &'static str = $kind;

            pub fn new(name: impl Into<String>) -> Result<Self, String> {
                let name = name.into();
                validate_name($kind, &name)?;
                Ok($name(name))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<std::path::Path> for $name {
            fn as_ref(&self) -> &std::path::Path {
                std::path::Path::new(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
    };
}

validated_name!(
    /// A protected machine's name: its folder name in every spool, retention folder and datastore.
    MachineName,
    "machine"
);
validated_name!(
    /// A disk's name within its machine: its export name and its file name on the target.
    DiskName,
    "disk"
);

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

    #[test]
    fn a_name_type_holds_only_valid_names_however_it_is_made() {
        use super::{DiskName, MachineName};
        assert!(MachineName::new("../etc").is_err());
        assert_eq!(&*MachineName::new("vm1").unwrap(), "vm1");
        let e = serde_json::from_str::<DiskName>("\".x\"").unwrap_err().to_string();
        assert!(e.contains("invalid disk name \".x\""), "{e}");
        let d: DiskName = serde_json::from_str("\"disk0\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"disk0\"");
    }
}

/// A position in a machine's ordered change stream: from the machine's single counter, strictly
/// increasing along the stream, never reused. On the wire it is the bare number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// Before the first record.
    pub const ZERO: Seq = Seq(0);
    pub const fn get(self) -> u64 {
        self.0
    }
    /// The seq after this one.
    pub const fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl std::fmt::Display for Seq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl PartialEq<u64> for Seq {
    fn eq(&self, other: &u64) -> bool {
        self.0 == *other
    }
}

impl PartialOrd<u64> for Seq {
    fn partial_cmp(&self, other: &u64) -> Option<std::cmp::Ordering> {
        self.0.partial_cmp(other)
    }
}

/// A replication generation: bumped when in-order shipping is abandoned or a side is promoted, so
/// a receiver can tell a stream that continues from one that starts over. On the wire it is the
/// bare number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    pub const fn get(self) -> u64 {
        self.0
    }
    /// The generation after this one.
    pub const fn next(self) -> Generation {
        Generation(self.0 + 1)
    }
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl PartialEq<u64> for Generation {
    fn eq(&self, other: &u64) -> bool {
        self.0 == *other
    }
}
