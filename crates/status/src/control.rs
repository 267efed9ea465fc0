//! Who may call a status listener's routes that change state or reach disk data.
//!
//! A status listener is plain HTTP on loopback, which every local user reaches. Routes whose
//! role is [`Role::Control`] need the daemon's **control token**: a random secret the daemon
//! writes at first start to a file only its own user can read (0600 in its own 0700 folder), the
//! way a database keeps a cookie file for its local clients. The ferry CLI, running as that user
//! on the same host, learns the file from `GET /status` and sends the token as
//! `Authorization: Bearer`. Routes whose role is [`Role::Coordinator`] (a replication group's
//! prepare/commit/abort) need a signature by the group's coordinator key: the configuration server
//! makes an Ed25519 key pair per group, gives the private key to the coordinator and the public key
//! to the members, and the coordinator signs each request (route, time, exact body). So no local
//! user, other component or member of the group can hold a member's writes: a member sees only
//! signatures, and a signature is good for its own request for a minute. Read-only routes
//! ([`Role::Local`]) stay open.

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
    /// The group coordinator's Ed25519 public key.
    coordinator: Option<Arc<[u8]>>,
    /// Signatures taken within the last two windows, with their times: each is good once.
    used: Arc<std::sync::Mutex<std::collections::HashMap<Vec<u8>, u64>>>,
}

/// How far a signed group request's time may be from the member's clock.
pub const SIGNATURE_WINDOW_MS: u64 = 60_000;

/// What the coordinator signs: the route, the time and the exact body.
fn signed_message(path: &str, time_ms: u64, body: &[u8]) -> Vec<u8> {
    let mut m = format!("ferry-group-request-v1\n{path}\n{time_ms}\n").into_bytes();
    m.extend_from_slice(body);
    m
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) || s.len() > 4096 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A replication group's coordinator key pair: `(private key, public key)`, hex (the private
/// key as PKCS#8). Made by the configuration server at protection, or by hand for a standalone
/// group.
pub fn new_group_key_pair() -> Result<(String, String), String> {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| e.to_string())?;
    Ok((hex(pkcs8.as_ref()), hex(pair.public_key().as_ref())))
}

/// The coordinator's signing half: signs each group request it sends.
pub struct GroupSigner(ring::signature::Ed25519KeyPair);

impl GroupSigner {
    /// From the private key (hex PKCS#8) the configuration server gave the coordinator.
    pub fn from_hex(private_key: &str) -> Result<GroupSigner, String> {
        let der = unhex(private_key).ok_or("the coordinator key is not hex")?;
        ring::signature::Ed25519KeyPair::from_pkcs8(&der)
            .map(GroupSigner)
            .map_err(|e| format!("the coordinator key is not an Ed25519 private key: {e}"))
    }

    /// The `Authorization` bearer for a request to `path` with `body`, signed now.
    pub fn bearer(&self, path: &str, body: &[u8]) -> String {
        self.bearer_at(path, body, ferry_sys::time::now_ms())
    }

    /// The same, signed as of `time_ms` (a member refuses one outside its window).
    pub fn bearer_at(&self, path: &str, body: &[u8], time_ms: u64) -> String {
        format!("fgs1.{time_ms}.{}", hex(self.0.sign(&signed_message(path, time_ms, body)).as_ref()))
    }
}

impl Access {
    /// Control routes need `token`; coordinator routes are refused until
    /// [`Access::with_coordinator_key`] names the public key.
    pub fn control(token: &str) -> Access {
        Access { control: Some(hash(token).into()), ..Access::default() }
    }

    /// Coordinator routes need a signature by the key whose public half (hex) is
    /// `public_key_hex`; a value that is not a 32-byte key leaves them refused.
    pub fn with_coordinator_key(mut self, public_key_hex: Option<&str>) -> Access {
        self.coordinator = public_key_hex.and_then(unhex).filter(|k| k.len() == 32).map(Into::into);
        self
    }

    /// Whether a request with these headers may call a route that needs `role` (for
    /// [`Role::Coordinator`], [`Access::check_signed`] checks the signature once the body is read).
    pub fn check(&self, role: Role, headers: &axum::http::HeaderMap) -> Result<(), Failure> {
        let (configured, what) = match role {
            Role::Control => (self.control.is_some(), "the daemon's control token"),
            Role::Coordinator => (self.coordinator.is_some(), "a signature by the replication group's coordinator key"),
            _ => return Ok(()),
        };
        if !configured {
            return Err(Failure::of(
                codes::FORBIDDEN,
                format!("this route needs {what}, and none is configured here"),
                match role {
                    Role::Coordinator => "protect the group's machines through the configuration server (it gives every member the coordinator's public key), or set coordinator_public_key in the member's [group]",
                    _ => "restart the daemon: it creates its control token at start",
                },
            ));
        }
        let Some(given) = bearer(headers) else {
            return Err(Failure::of(
                codes::UNAUTHENTICATED,
                format!("this route needs {what} as `Authorization: Bearer …`"),
                remedy(role),
            ));
        };
        match (role, &self.control) {
            (Role::Control, Some(expected)) if hash(given) != **expected => {
                Err(Failure::of(codes::FORBIDDEN, format!("the bearer token is not {what}"), remedy(role)))
            }
            _ => Ok(()),
        }
    }

    /// A coordinator route's signature over its path, time and exact `body`, made within
    /// [`SIGNATURE_WINDOW_MS`] of now.
    pub fn check_signed(&self, headers: &axum::http::HeaderMap, path: &str, body: &[u8]) -> Result<(), Failure> {
        let refuse = |why: &str| {
            Failure::of(
                codes::FORBIDDEN,
                format!("the group request is not signed by the coordinator: {why}"),
                remedy(Role::Coordinator),
            )
        };
        let Some(key) = &self.coordinator else { return Err(refuse("no coordinator key is configured here")) };
        let given = bearer(headers).ok_or_else(|| refuse("no signature"))?;
        let mut parts = given.splitn(3, '.');
        let (Some("fgs1"), Some(t), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(refuse("not a signature (fgs1.TIME.SIGNATURE)"));
        };
        let t: u64 = t.parse().map_err(|_| refuse("the signature's time is not a number"))?;
        if ferry_sys::time::now_ms().abs_diff(t) > SIGNATURE_WINDOW_MS {
            return Err(refuse("the signature is older than a minute (or the clocks differ by more)"));
        }
        let sig = unhex(sig).ok_or_else(|| refuse("the signature is not hex"))?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key[..])
            .verify(&signed_message(path, t, body), &sig)
            .map_err(|_| refuse("the signature does not verify with the group's coordinator key"))?;
        // A request seen on the wire (plain HTTP on loopback) must not be sent again: only valid
        // signatures are kept, and only as long as their time is inside the window.
        let now = ferry_sys::time::now_ms();
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.retain(|_, at| now.abs_diff(*at) <= 2 * SIGNATURE_WINDOW_MS);
        if used.insert(sig, t).is_some() {
            return Err(refuse("this signed request was already taken (a replay)"));
        }
        Ok(())
    }
}

fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim)
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
    fn control_routes_need_the_token_and_coordinator_routes_a_signature() {
        let (private, public) = new_group_key_pair().unwrap();
        let signer = GroupSigner::from_hex(&private).unwrap();
        let token = "fc_secret-secret-secret-secret-secret";
        let a = Access::control(token).with_coordinator_key(Some(&public));
        assert!(a.check(Role::Local, &HeaderMap::new()).is_ok());
        let e = a.check(Role::Control, &HeaderMap::new()).unwrap_err();
        assert_eq!(e.1.code, codes::UNAUTHENTICATED.code);
        assert_eq!(a.check(Role::Control, &bearer("fc_wrong")).unwrap_err().1.code, codes::FORBIDDEN.code);
        assert!(a.check(Role::Control, &bearer(token)).is_ok());
        let body = br#"{"group":"g1","tag":"t1"}"#;
        let good = bearer(&signer.bearer("/group/prepare", body));
        assert!(a.check_signed(&good, "/group/prepare", body).is_ok());
        // Each signed request is good once: a copy seen on the wire is refused, also by a clone
        // of the listener's access (one per connection).
        let e = a.clone().check_signed(&good, "/group/prepare", body).unwrap_err();
        assert!(e.1.message.contains("replay"), "{}", e.1.message);
        // Not the control token, not the public key itself, not for another route or body, not
        // from another key, not two minutes old.
        let (other, _) = new_group_key_pair().unwrap();
        let other = GroupSigner::from_hex(&other).unwrap();
        let old = ferry_sys::time::now_ms() - 2 * SIGNATURE_WINDOW_MS;
        for (why, h, path, b) in [
            ("control token", bearer(token), "/group/prepare", &body[..]),
            ("public key", bearer(&public), "/group/prepare", &body[..]),
            ("another route", good.clone(), "/group/commit", &body[..]),
            ("another body", good.clone(), "/group/prepare", &br#"{"group":"g1","tag":"t2"}"#[..]),
            ("another key", bearer(&other.bearer("/group/prepare", body)), "/group/prepare", &body[..]),
            ("too old", bearer(&signer.bearer_at("/group/prepare", body, old)), "/group/prepare", &body[..]),
        ] {
            assert_eq!(a.check_signed(&h, path, b).unwrap_err().1.code, codes::FORBIDDEN.code, "{why}");
        }
        assert!(a.check(Role::Control, &good).is_err(), "a signature is not the control token");
        // A member without the public key refuses every group request.
        let b = Access::control("x".repeat(40).as_str());
        assert_eq!(b.check(Role::Coordinator, &good).unwrap_err().1.code, codes::FORBIDDEN.code);
        assert!(b.check_signed(&good, "/group/prepare", body).is_err());
        assert!(GroupSigner::from_hex(&public).is_err(), "a public key cannot sign");
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
