//! Who may call a status listener's routes that change state or reach disk data.
//!
//! A status listener is plain HTTP on loopback, which every local user reaches. Routes whose
//! role is [`Role::Control`] need the daemon's **control token**: a random secret the daemon
//! writes at first start to a file only its own user can read (0600 in its own 0700 folder), the
//! way a database keeps a cookie file for its local clients. The ferry CLI, running as that user
//! on the same host, learns the file from `GET /status` and sends the token as
//! `Authorization: Bearer`. Routes whose role is [`Role::Coordinator`] (a replication group's
//! prepare/commit/abort) need the group's coordinator key: the configuration server gives it to
//! the coordinator and its BLAKE3 hash to the members, so no local user or other component can
//! hold a member's writes (members see the key when the coordinator sends it: closing that needs
//! per-request signatures). Read-only routes ([`Role::Local`]) stay open.

use std::path::Path;
use std::sync::Arc;

use axum::http::header::AUTHORIZATION;
use ferry_api::{ErrorBody, Role};
use ferry_types::codes;

use crate::Failure;

/// The secrets a status listener checks (their hashes: comparing hashes leaks nothing about
/// the secret through timing).
#[derive(Clone, Default)]
pub struct Access {
    control: Option<Arc<str>>,
    coordinator: Option<Arc<str>>,
}

impl Access {
    /// Control routes need `token`; coordinator routes are refused until
    /// [`Access::with_coordinator_hash`] names the key.
    pub fn control(token: &str) -> Access {
        Access { control: Some(hash(token).into()), coordinator: None }
    }

    /// Coordinator routes need the key whose BLAKE3 hash (hex) is `blake3_hex`.
    pub fn with_coordinator_hash(mut self, blake3_hex: Option<&str>) -> Access {
        self.coordinator = blake3_hex.map(|h| h.trim().to_ascii_lowercase().into());
        self
    }

    /// Whether a request with these headers may call a route that needs `role`.
    pub fn check(&self, role: Role, headers: &axum::http::HeaderMap) -> Result<(), Failure> {
        let (expected, what) = match role {
            Role::Control => (&self.control, "the daemon's control token"),
            Role::Coordinator => (&self.coordinator, "the replication group's coordinator key"),
            _ => return Ok(()),
        };
        let Some(expected) = expected else {
            return Err(Failure::of(
                codes::FORBIDDEN,
                format!("this route needs {what}, and none is configured here"),
                match role {
                    Role::Coordinator => "protect the group's machines through the configuration server (it gives every member the coordinator's key), or set coordinator_key_blake3 in the member's [group]",
                    _ => "restart the daemon: it creates its control token at start",
                },
            ));
        };
        let given = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => Err(Failure::of(
                codes::UNAUTHENTICATED,
                format!("this route needs {what} as `Authorization: Bearer …`"),
                remedy(role),
            )),
            Some(t) if hash(t.trim()) == **expected => Ok(()),
            Some(_) => Err(Failure::of(codes::FORBIDDEN, format!("the bearer token is not {what}"), remedy(role))),
        }
    }
}

fn remedy(role: Role) -> &'static str {
    match role {
        Role::Coordinator => "group requests come only from the group's coordinator agent",
        _ => "run the ferry CLI as the daemon's user on its host (it reads the token from the control_token_file the status names)",
    }
}

/// BLAKE3 of a secret, hex.
pub fn hash(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// A new random secret (hex of 32 random bytes, with a prefix naming what it is).
pub fn new_secret(prefix: &str) -> String {
    let b: [u8; 32] = rand::random();
    let mut s = String::with_capacity(prefix.len() + 64);
    s.push_str(prefix);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// The control token in `path`, created (owner-only, written atomically) when missing. A file
/// other users can read is refused: its token is no secret any more.
pub fn load_or_create_control_token(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(md) => {
            if !md.file_type().is_file() {
                return Err(std::io::Error::other(format!(
                    "{} is not a regular file: remove it (the daemon writes a new control token)",
                    path.display()
                )));
            }
            if md.uid() != ferry_sys::proc::effective_uid() {
                return Err(std::io::Error::other(format!(
                    "{} belongs to another user (uid {}): whoever planted it knows the token; remove it and restart",
                    path.display(),
                    md.uid()
                )));
            }
            if md.mode() & 0o077 != 0 {
                return Err(std::io::Error::other(format!(
                    "{} can be read by other users (mode {:o}): remove it and restart (the daemon writes a new, private control token)",
                    path.display(),
                    md.mode() & 0o777
                )));
            }
            let t = std::fs::read_to_string(path)?;
            let t = t.trim();
            if t.len() < 32 {
                return Err(std::io::Error::other(format!(
                    "{} does not hold a control token: remove it and restart",
                    path.display()
                )));
            }
            Ok(t.to_owned())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let t = new_secret("fc_");
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            ferry_sys::fs::atomic_replace(path, format!("{t}\n").as_bytes(), 0o600)?;
            Ok(t)
        }
        Err(e) => Err(e),
    }
}

/// The control token a daemon's status names, read from its file (the caller must be allowed
/// to read it: the daemon's user on its host). The status is unauthenticated, so the file is
/// trusted only when it looks like a control token file: a regular file (not a link) of the
/// caller's own user, private, and small; a status that names any other file (a secret of the
/// caller's, `/dev/zero`) gets nothing sent.
pub fn read_control_token(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::symlink_metadata(path)?;
    let why = if !md.file_type().is_file() {
        Some("is not a regular file")
    } else if md.uid() != ferry_sys::proc::effective_uid() {
        Some("belongs to another user")
    } else if md.mode() & 0o077 != 0 {
        Some("can be read by other users")
    } else if md.len() > 256 {
        Some("is too large for a control token")
    } else {
        None
    };
    if let Some(why) = why {
        return Err(std::io::Error::other(format!("{} {why}: not a control token file", path.display())));
    }
    let t = std::fs::read_to_string(path)?;
    let t = t.trim();
    if !t.starts_with("fc_") {
        return Err(std::io::Error::other(format!("{} does not hold a control token", path.display())));
    }
    Ok(t.to_owned())
}

impl Failure {
    /// 401/403 bodies carry the registry's code.
    pub fn body(&self) -> &ErrorBody {
        &self.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        h
    }

    #[test]
    fn control_routes_need_the_token_and_coordinator_routes_the_key() {
        let key = new_secret("gk_");
        let a = Access::control("fc_secret-secret-secret-secret-secret").with_coordinator_hash(Some(&hash(&key)));
        assert!(a.check(Role::Local, &HeaderMap::new()).is_ok());
        let e = a.check(Role::Control, &HeaderMap::new()).unwrap_err();
        assert_eq!(e.1.code, codes::UNAUTHENTICATED.code);
        assert_eq!(a.check(Role::Control, &bearer("fc_wrong")).unwrap_err().1.code, codes::FORBIDDEN.code);
        assert!(a.check(Role::Control, &bearer("fc_secret-secret-secret-secret-secret")).is_ok());
        // The control token is not the coordinator key, nor the reverse.
        assert!(a.check(Role::Coordinator, &bearer("fc_secret-secret-secret-secret-secret")).is_err());
        assert!(a.check(Role::Control, &bearer(&key)).is_err());
        assert!(a.check(Role::Coordinator, &bearer(&key)).is_ok());
        // A member without the hash refuses every group request.
        let b = Access::control("x".repeat(40).as_str());
        assert_eq!(b.check(Role::Coordinator, &bearer(&key)).unwrap_err().1.code, codes::FORBIDDEN.code);
    }

    #[test]
    fn the_token_file_is_private_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("control-token");
        let t = load_or_create_control_token(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_create_control_token(&p).unwrap(), t, "kept across restarts");
        assert_eq!(read_control_token(&p).unwrap(), t);
        // What an unauthenticated status might name instead: a link, another secret, a device.
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(read_control_token(&link).is_err(), "a link is not followed");
        let other = d.path().join("other-secret");
        std::fs::write(&other, "hunter2").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_control_token(&other).is_err(), "a file that holds no control token");
        assert!(read_control_token(Path::new("/dev/zero")).is_err());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_create_control_token(&p).is_err(), "a readable token file is refused");
        assert!(read_control_token(&p).is_err());
    }
}
