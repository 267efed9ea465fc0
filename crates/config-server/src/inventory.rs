//! Where the configuration server keeps sites and their discovered inventory.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const SITE: &str = "site";
pub const INVENTORY: &str = "inventory";

/// A registered site (local provider: a folder with `site.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub name: String,
    /// `local` (the only provider so far).
    #[serde(default = "local")]
    pub provider: String,
    pub path: PathBuf,
}

fn local() -> String {
    "local".into()
}
