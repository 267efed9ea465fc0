//! Where the configuration server keeps sites and their discovered inventory.

pub const SITE: &str = "site";
pub const INVENTORY: &str = "inventory";

pub use ferry_api::config_server::Site;
