//! Configuration: a TOML file, with command-line flags overriding its keys.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

#[derive(Default)]
pub struct Overrides(Vec<(String, toml::Value)>);

impl Overrides {
    pub fn set(&mut self, key: &str, v: toml::Value) {
        self.0.push((key.to_owned(), v));
    }
    pub fn string(&mut self, key: &str, v: Option<String>) {
        if let Some(v) = v {
            self.set(key, toml::Value::String(v));
        }
    }
    pub fn path(&mut self, key: &str, v: Option<PathBuf>) {
        self.string(key, v.map(|p| p.to_string_lossy().into_owned()));
    }
    pub fn int(&mut self, key: &str, v: Option<u64>) {
        if let Some(v) = v {
            self.set(key, toml::Value::Integer(v.min(i64::MAX as u64) as i64));
        }
    }
    pub fn bool(&mut self, key: &str, v: bool) {
        self.set(key, toml::Value::Boolean(v));
    }
    /// `--set KEY=VALUE`: VALUE is parsed as a TOML value (number, bool, string...), else taken as a string.
    pub fn assignments(&mut self, sets: &[String]) -> Result<()> {
        for a in sets {
            let Some((k, v)) = a.split_once('=') else { anyhow::bail!("--set {a:?} must be KEY=VALUE") };
            let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(v.to_owned()));
            self.set(k.trim(), value);
        }
        Ok(())
    }

    /// `--certs DIR`: the files `ferry certs` wrote for this component.
    pub fn certs(&mut self, dir: Option<PathBuf>, component: &str) {
        if let Some(d) = dir {
            let f = ferry_tls::TlsFiles::in_dir(&d, component);
            let mut t = toml::Table::new();
            t.insert("ca".into(), f.ca.to_string_lossy().into_owned().into());
            t.insert("cert".into(), f.cert.to_string_lossy().into_owned().into());
            t.insert("key".into(), f.key.to_string_lossy().into_owned().into());
            self.set("tls", toml::Value::Table(t));
        }
    }
}

fn read_table(path: Option<&Path>, component: &str) -> Result<toml::Table> {
    Ok(match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the {component} configuration {}", p.display()))?;
            toml::from_str::<toml::Table>(&text).with_context(|| format!("{} is not valid TOML", p.display()))?
        }
        None => toml::Table::new(),
    })
}

/// Read the TOML file (if any), apply the overrides, and deserialize; errors name the file and key.
pub fn load_config<T: DeserializeOwned>(path: Option<&Path>, overrides: Overrides, component: &str) -> Result<T> {
    let table = read_table(path, component)?;
    finish(table, path, overrides, component)
}

/// Like [`load_config`], and when the file links the component to a configuration server
/// (`[config_server]`), the settings the server holds for it (peers, disks, policy) override the
/// file's keys; flags still override both. An unreachable server leaves the file's settings
/// (standalone operation continues), with a warning.
pub async fn load_config_with_server<T: DeserializeOwned>(
    path: Option<&Path>,
    overrides: Overrides,
    component: &str,
    default_name: impl Fn(&toml::Table) -> String,
) -> Result<T> {
    let mut table = read_table(path, component)?;
    if let Some(link) = table.get("config_server").cloned() {
        let link: ferry_status::ConfigServerLink =
            link.try_into().with_context(|| format!("invalid [config_server] in the {component} configuration"))?;
        let name = link.name.clone().unwrap_or_else(|| default_name(&table));
        match fetch_settings(&link, component, &name).await {
            Ok(settings) => {
                tracing::info!(server = %link.address, keys = settings.len(), "settings from the configuration server");
                for (k, v) in settings {
                    table.insert(k, v);
                }
            }
            Err(e) => {
                tracing::warn!(server = %link.address, error = %format!("{e:#}"), "cannot fetch settings from the configuration server; using the local file")
            }
        }
    }
    finish(table, path, overrides, component)
}

async fn fetch_settings(link: &ferry_status::ConfigServerLink, kind: &str, name: &str) -> Result<toml::Table> {
    if !link.token_file.exists() {
        anyhow::bail!("cannot read {} (run `ferry register`)", link.token_file.display());
    }
    let kind: ferry_api::control::ComponentKind = serde_json::from_value(serde_json::Value::String(kind.to_owned()))
        .with_context(|| format!("component kind {kind}"))?;
    let (_, status, body) = link.fetch_settings(kind, name).await?;
    if status != 200 {
        anyhow::bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    let mut v: serde_json::Value = serde_json::from_slice(&body).context("settings are not JSON")?;
    // Not configuration keys: the running component follows them (its settings watch).
    if let Some(m) = v.as_object_mut() {
        for k in ferry_api::control::RUNTIME_KEYS {
            m.remove(k);
        }
    }
    let t: toml::Table = toml::Value::try_from(v)
        .context("settings do not convert to TOML")?
        .try_into()
        .context("settings are not a table")?;
    Ok(t)
}

fn finish<T: DeserializeOwned>(
    mut table: toml::Table,
    path: Option<&Path>,
    overrides: Overrides,
    component: &str,
) -> Result<T> {
    for (k, v) in overrides.0 {
        table.insert(k, v);
    }
    let source = path.map(|p| p.display().to_string()).unwrap_or_else(|| "the command line".into());
    T::deserialize(toml::Value::Table(table)).with_context(|| {
        format!("invalid {component} configuration in {source} (see README for the keys; flags override file keys)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mt.toml");
        std::fs::write(
            &p,
            "datastore = '/a'\nretention = '/b'\nlisten = '127.0.0.1:1'\n[tls]\nca='c'\ncert='d'\nkey='e'\n",
        )
        .unwrap();
        let mut o = Overrides::default();
        o.string("listen", Some("127.0.0.1:2".into()));
        let c: ferry_master_target::MasterTargetConfig = load_config(Some(&p), o, "master-target").unwrap();
        assert_eq!(c.listen, "127.0.0.1:2");
        std::fs::write(&p, "datastore = '/a'\nbogus = 1\n").unwrap();
        let e = load_config::<ferry_master_target::MasterTargetConfig>(Some(&p), Overrides::default(), "master-target")
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("mt.toml") && (msg.contains("bogus") || msg.contains("missing")), "{msg}");
    }
}
