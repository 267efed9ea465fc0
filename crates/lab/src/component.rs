//! A component's configuration file as whoever starts it writes it — the lab for its master
//! targets and process servers, a lab guest for its agent, the end-to-end test harness for its
//! chains: the component's own keys, its TLS identity and, for a registered component, its link
//! to the configuration server. One writer, so the lab and the tests start components the same way.
//!
//! The lab depends on no component crate (see the crate docs), so the keys are TOML values named
//! as each component's configuration names them; the shared sections are the typed structs the
//! components read ([`TlsFiles`], [`ConfigServerLink`]).

use std::path::{Path, PathBuf};

use ferry_status::ConfigServerLink;
use ferry_tls::TlsFiles;

/// Why a component file could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum ComponentFileError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("extra configuration is not valid TOML: {0}")]
    Extra(String),
    #[error("cannot encode the configuration: {0}")]
    Encode(String),
}

/// A component configuration being built.
#[derive(Debug, Clone, Default)]
pub struct ComponentFile {
    keys: toml::Table,
}

/// A path as a TOML string.
pub fn path_value(p: &Path) -> toml::Value {
    toml::Value::String(p.to_string_lossy().into_owned())
}

impl ComponentFile {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set one key (a later set of the same key wins).
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.keys.insert(key.to_owned(), value.into());
        self
    }

    /// Set one key to a path.
    pub fn path(self, key: &str, p: &Path) -> Self {
        self.set(key, path_value(p))
    }

    /// The component's TLS identity (`[tls]`).
    pub fn tls(self, files: &TlsFiles) -> Result<Self, ComponentFileError> {
        let v = toml::Value::try_from(files).map_err(|e| ComponentFileError::Encode(e.to_string()))?;
        Ok(self.set("tls", v))
    }

    /// The link to the configuration server (`[config_server]`).
    pub fn config_server(self, link: &ConfigServerLink) -> Result<Self, ComponentFileError> {
        let v = toml::Value::try_from(link).map_err(|e| ComponentFileError::Encode(e.to_string()))?;
        Ok(self.set("config_server", v))
    }

    /// Every key of `other` (a table, e.g. settings from the configuration server).
    pub fn merge(mut self, other: toml::Table) -> Self {
        self.keys.extend(other);
        self
    }

    /// Keys given as TOML text (an operator's or a test's extra configuration); they win over
    /// keys set before.
    pub fn extra(self, text: &str) -> Result<Self, ComponentFileError> {
        let t: toml::Table = toml::from_str(text).map_err(|e| ComponentFileError::Extra(e.to_string()))?;
        Ok(self.merge(t))
    }

    pub fn to_toml(&self) -> Result<String, ComponentFileError> {
        toml::to_string(&self.keys).map_err(|e| ComponentFileError::Encode(e.to_string()))
    }

    /// Write it to `path` (replaced atomically: a component restarted at that moment reads the
    /// old file or the new one, never half of one).
    pub fn write(&self, path: &Path) -> Result<(), ComponentFileError> {
        let text = self.to_toml()?;
        ferry_sys::fs::write_atomic(path, text.as_bytes())
            .map_err(|source| ComponentFileError::Write { path: path.to_owned(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_sections_come_out_as_the_components_read_them() {
        let tls = TlsFiles { ca: "/r/ca.pem".into(), cert: "/r/agent.pem".into(), key: "/r/agent.key".into() };
        let link = ConfigServerLink {
            address: "127.0.0.1:1".into(),
            ca: "/r/ca.pem".into(),
            token_file: "/r/config-server.token".into(),
            name: Some("vm1".into()),
            policy: None,
            heartbeat_interval_secs: 1.0,
            other_addresses: Vec::new(),
        };
        let text = ComponentFile::new()
            .set("machine", "vm1")
            .path("state_dir", Path::new("/s"))
            .tls(&tls)
            .unwrap()
            .config_server(&link)
            .unwrap()
            .extra("reconnect_interval_secs = 0.2\nmachine = 'vm2'")
            .unwrap()
            .to_toml()
            .unwrap();
        let back: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(back["machine"].as_str(), Some("vm2"), "extra keys win");
        let tls_back: TlsFiles = back["tls"].clone().try_into().unwrap();
        assert_eq!(tls_back, tls);
        let link_back: ConfigServerLink = back["config_server"].clone().try_into().unwrap();
        assert_eq!(link_back.name.as_deref(), Some("vm1"));
        assert!(ComponentFile::new().extra("not toml [").is_err());
    }
}
