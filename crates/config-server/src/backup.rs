//! Backup and restore of the configuration (RP-4): a consistent snapshot of every table plus the
//! CA (certificate and key), encrypted with ChaCha20-Poly1305 under the server's backup key.
//! File: `FERRYBK1` | 12-byte nonce | ciphertext of the JSON snapshot.

use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use ferry_store::Store;

use crate::jobs::JobControl;

const MAGIC: &[u8; 8] = b"FERRYBK1";

#[derive(Debug, Clone)]
pub struct BackupConfig {
    pub dir: PathBuf,
    pub key_file: PathBuf,
    pub tls_dir: PathBuf,
    /// Backups kept when scheduled backups prune old ones.
    pub keep: usize,
}

/// Load the backup key, creating it (32 random bytes, hex, mode 0600) on first use.
pub fn load_or_create_key(path: &Path) -> Result<[u8; 32], String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return parse_key(text.trim()).ok_or_else(|| format!("{} is not a 64-hex-digit backup key", path.display()));
    }
    let key: [u8; 32] = rand::random();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, hex.as_bytes())?;
    Ok(key)
}

pub fn parse_key(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(key)
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| format!("cannot create {}: {e}", p.display()))?;
    }
    ferry_sys::fs::write_atomic(path, data).map_err(|e| e.to_string())
}

/// Write an encrypted backup into the backup folder; returns its path.
pub async fn write_backup(store: &Store, cfg: &BackupConfig, ctl: &JobControl) -> Result<PathBuf, String> {
    let key = load_or_create_key(&cfg.key_file)?;
    let mut snapshot = store.export_all().await.map_err(|e| e.to_string())?;
    for f in ["ca.pem", "ca.key"] {
        let p = cfg.tls_dir.join(f);
        let text = std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        snapshot["tls"][f] = serde_json::Value::String(text);
    }
    snapshot["backup_ms"] = crate::jobs::now_ms().into();
    let plain = serde_json::to_vec(&snapshot).map_err(|e| e.to_string())?;
    ctl.bytes(0, plain.len() as u64);
    let cipher = ChaCha20Poly1305::new(&Key::from(key));
    let nonce: [u8; 12] = rand::random();
    let sealed =
        cipher.encrypt(&Nonce::from(nonce), plain.as_slice()).map_err(|e| format!("encryption failed: {e}"))?;
    let mut out = Vec::with_capacity(20 + sealed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    let path = cfg.dir.join(format!("ferry-config-{}.bak", crate::jobs::now_ms()));
    write_private(&path, &out)?;
    ctl.bytes(plain.len() as u64, plain.len() as u64);
    prune(cfg);
    Ok(path)
}

/// Keep the newest `keep` backups.
fn prune(cfg: &BackupConfig) {
    let Ok(entries) = std::fs::read_dir(&cfg.dir) else { return };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with("ferry-config-") && n.to_string_lossy().ends_with(".bak")
            })
        })
        .collect();
    files.sort();
    while files.len() > cfg.keep.max(1) {
        let old = files.remove(0);
        let _ = std::fs::remove_file(&old);
    }
}

/// Decrypt a backup file.
pub fn read_backup(path: &Path, key: &[u8; 32]) -> Result<serde_json::Value, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if data.len() < 20 || &data[..8] != MAGIC {
        return Err(format!("{} is not a Ferry configuration backup", path.display()));
    }
    let cipher = ChaCha20Poly1305::new(&Key::from(*key));
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&data[8..20]);
    let plain = cipher.decrypt(&Nonce::from(nonce), &data[20..]).map_err(|_| {
        format!("{} cannot be decrypted with this backup key (wrong key, or the file is damaged)", path.display())
    })?;
    serde_json::from_slice(&plain).map_err(|e| format!("{} holds no valid snapshot: {e}", path.display()))
}

/// Restore a snapshot into `store` and the CA into `tls_dir` (the server keeps its identity).
pub async fn restore(store: &Store, snapshot: &serde_json::Value, tls_dir: &Path) -> Result<(), String> {
    let version = store.schema_version().await.map_err(|e| e.to_string())?;
    if snapshot["schema_version"].as_i64().unwrap_or(0) > version {
        return Err("the backup comes from a newer Ferry (newer database schema): restore it with that version".into());
    }
    store.import_all(snapshot).await.map_err(|e| e.to_string())?;
    for f in ["ca.pem", "ca.key"] {
        if let Some(text) = snapshot["tls"][f].as_str() {
            write_private(&tls_dir.join(f), text.as_bytes())?;
        }
    }
    store
        .set_setting("restored_from_backup_ms", &snapshot["backup_ms"].to_string())
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
