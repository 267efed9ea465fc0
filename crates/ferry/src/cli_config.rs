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

/// Read the TOML file (if any), apply the overrides, and deserialize; errors name the file and key.
pub fn load_config<T: DeserializeOwned>(path: Option<&Path>, overrides: Overrides, component: &str) -> Result<T> {
    let mut table = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the {component} configuration {}", p.display()))?;
            toml::from_str::<toml::Table>(&text).with_context(|| format!("{} is not valid TOML", p.display()))?
        }
        None => toml::Table::new(),
    };
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
