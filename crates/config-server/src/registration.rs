//! Registration of data-path components: the component makes its key and a certificate request
//! locally, proves it knows the registration passphrase, and receives a certificate signed by the
//! server's CA plus a `component` token for heartbeats. Private keys never leave their host.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use crate::errors::{self, ApiError};
use crate::http::{hash_token, new_token, Body};
use crate::AppState;
use ferry_api::control::ComponentKind;
use ferry_api::inventory::Inventory;

pub const COMPONENT: &str = "component";

pub use ferry_api::config_server::RegisterRequest;

/// Registered certificates are valid this long; registering again renews.
pub const CERT_DAYS: u32 = 825;

pub use ferry_api::control::Component;

/// A component kind from a URL or a body.
pub fn check_kind(kind: &str) -> Result<ComponentKind, ApiError> {
    ComponentKind::parse(kind)
        .ok_or_else(|| ApiError::bad(format!("kind {kind:?} is not agent, process-server or master-target")))
}

pub async fn register(
    State(s): State<Arc<AppState>>,
    axum::extract::ConnectInfo(crate::PeerAddr(peer)): axum::extract::ConnectInfo<crate::PeerAddr>,
    Body(r): Body<RegisterRequest>,
) -> Result<(StatusCode, Json<ferry_api::config_server::Registered>), ApiError> {
    crate::model::check_name("component", &r.name)?;
    let refused = |m: &str| ApiError::new(StatusCode::FORBIDDEN, errors::REGISTRATION_REFUSED, m.to_owned());
    let now = crate::jobs::now_ms();
    // An IPv4 peer on a dual-stack listener arrives as ::ffff:a.b.c.d.
    let source = peer.ip().to_canonical();
    // Counted as a failure before the passphrase is looked at (and forgiven when it is right), so
    // a burst of concurrent guesses from one source is throttled too.
    let counted = {
        let mut f = s.registration_failures.lock().unwrap_or_else(|p| p.into_inner());
        let locked = f.locked(source, now);
        if !locked {
            f.failed(source, now);
        }
        !locked
    };
    if !counted {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            errors::REGISTRATION_REFUSED,
            format!("too many failed registrations from {source}: wait a minute"),
        ));
    }
    let expected = s.store.setting("registration_passphrase_hash").await?;
    // Compare hashes (fixed length) rather than the secrets themselves.
    if expected.as_deref() != Some(hash_token(&r.passphrase).as_str()) {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        return Err(refused("wrong registration passphrase"));
    }
    s.registration_failures.lock().unwrap_or_else(|p| p.into_inner()).forgive(source, now);
    let tls = s.tls_dir.clone();
    let csr = r.csr.clone();
    let others: Vec<Component> = s.store.list::<Component>(COMPONENT).await?.into_iter().map(|d| d.body).collect();
    let sans = certificate_names(r.kind, &r.name, &r.hosts, source, &others).map_err(ApiError::bad)?;
    let inventories: Vec<Inventory> =
        s.store.list::<Inventory>(crate::ops::INVENTORY).await?.into_iter().map(|d| d.body).collect();
    let site = component_site(r.kind, &r.name, r.site.as_deref(), &inventories).map_err(ApiError::bad)?;
    let identity = ferry_tls::Identity::new(cert_role(r.kind), &r.name, site.as_deref()).map_err(ApiError::bad)?;
    let id2 = identity.clone();
    let signed = tokio::task::spawn_blocking(move || ferry_tls::sign_csr(&tls, &csr, &id2, &sans, CERT_DAYS))
        .await
        .map_err(|e| refused(&e.to_string()))?
        .map_err(|e| refused(&format!("the certificate request is invalid: {e}")))?;
    let token = new_token();
    let id = format!("tok-{:08x}", rand::random::<u32>());
    let token_name = format!("{}/{}", r.kind, r.name);
    // Registering again (a reinstalled host) replaces the component's earlier tokens.
    let mut replaced = 0;
    for t in s.store.tokens().await? {
        if t.role == "component" && t.name == token_name {
            s.store.delete_token(&t.id).await?;
            replaced += 1;
        }
    }
    if replaced > 0 {
        let msg = format!("{token_name} registered again: its {replaced} earlier token(s) were revoked");
        s.store.add_event(0, "warning", &token_name, &msg).await?;
    }
    s.store.add_token(&id, &hash_token(&token), &token_name, "component").await?;
    let key = format!("{}/{}", r.kind, r.name);
    let now = crate::jobs::now_ms();
    let before = crate::health::update_component(&s, r.kind, &r.name, |comp| {
        comp.registered_ms = Some(now);
        comp.certificate_serial = Some(signed.serial.clone());
        comp.identity = Some(identity.to_string());
    })
    .await?;
    let earlier = before.and_then(|c| c.certificate_serial);
    if let Some(serial) = earlier {
        crate::revocation::revoke(&s.store, &serial, &format!("{key} registered again")).await?;
    }
    let msg = format!("{} {} registered (certificate serial {})", r.kind, r.name, signed.serial);
    s.store.add_event(0, "info", &key, &msg).await?;
    Ok((
        StatusCode::CREATED,
        Json(ferry_api::config_server::Registered {
            certificate: signed.pem,
            ca: s.ca_pem.clone(),
            token,
            token_id: id,
            identity: identity.to_string(),
        }),
    ))
}

/// The certificate role of a component kind.
pub fn cert_role(kind: ComponentKind) -> ferry_tls::CertRole {
    match kind {
        ComponentKind::Agent => ferry_tls::CertRole::Agent,
        ComponentKind::ProcessServer => ferry_tls::CertRole::ProcessServer,
        ComponentKind::MasterTarget => ferry_tls::CertRole::MasterTarget,
    }
}

/// The site in a component's identity: a site whose discovered inventory lists it (an agent's
/// machine, a master target, a process server) — the requested one when several do (a machine
/// listed at both sites after a failover); a request naming a site that does not list it is
/// refused; when only one site lists it and none is requested, that one — else the site the
/// registering admin named, else none.
pub fn component_site(
    kind: ComponentKind,
    name: &str,
    requested: Option<&str>,
    inventories: &[Inventory],
) -> Result<Option<String>, String> {
    let listed: Vec<&Inventory> = inventories
        .iter()
        .filter(|i| match kind {
            ComponentKind::Agent => i.content.machines.iter().any(|m| m.name == name),
            ComponentKind::MasterTarget => i.content.master_targets.iter().any(|m| m.name == name),
            ComponentKind::ProcessServer => i.content.process_servers.iter().any(|p| p.name == name),
        })
        .collect();
    let sites = || listed.iter().map(|i| i.site.as_str()).collect::<Vec<_>>().join(", ");
    match (listed.as_slice(), requested) {
        (l, Some(r)) if !l.is_empty() && !l.iter().any(|i| i.site == r) => Err(format!(
            "{kind} {name} is in the inventory of site {}, not {r}: register it with --site naming one of them",
            sites()
        )),
        ([_, _, ..], None) => {
            Err(format!("{kind} {name} is in the inventories of sites {}: say which with --site", sites()))
        }
        ([i, ..], r) => Ok(Some(r.map_or_else(|| i.site.clone(), str::to_owned))),
        ([], r) => {
            if let Some(r) = r {
                ferry_types::validate_name("site", r)?;
            }
            Ok(r.map(str::to_owned))
        }
    }
}

/// Names no component's certificate may carry: the configuration server's own, and the default
/// server names components verify their peers by.
const RESERVED_NAMES: [&str; 4] = ["config-server", "process-server", "master-target", "agent"];

/// The names a component's certificate carries, chosen by the configuration server: its own name
/// and the extra host names it asked for, never a name another component goes by (a certificate
/// naming a process server would let its holder pose as that process server to agents), never a
/// reserved name except a kind's own default name for that kind, and `localhost`/`127.0.0.1`
/// only for a component registering from this host (`source` is loopback).
pub fn certificate_names(
    kind: ComponentKind,
    name: &str,
    hosts: &[String],
    source: std::net::IpAddr,
    registered: &[Component],
) -> Result<Vec<String>, String> {
    let own_default = kind.as_str();
    let taken = |n: &str| -> Option<String> {
        // `ps-primary.` names the same host as `ps-primary`.
        let n = n.trim_end_matches('.');
        if RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(n)) && !n.eq_ignore_ascii_case(own_default) {
            return Some(format!("{n:?} is reserved"));
        }
        registered
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(n) && !(c.kind == kind && c.name == name))
            .map(|c| format!("{n:?} is the name of {} {}", c.kind, c.name))
    };
    if let Some(why) = taken(name) {
        return Err(format!("a {kind} cannot be registered as {name:?}: {why}; choose another name"));
    }
    let loopback =
        |h: &str| h.eq_ignore_ascii_case("localhost") || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    let mut names = vec![name.to_owned()];
    for h in hosts {
        let valid =
            !h.is_empty() && h.len() <= 253 && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c));
        if !valid {
            return Err(format!("host {h:?} is not a host name or address"));
        }
        if let Some(why) = taken(h) {
            return Err(format!("host {h:?} cannot be in a {kind}'s certificate: {why}"));
        }
        if loopback(h) && !source.is_loopback() {
            return Err(format!("host {h:?} names this host, but the {kind} registers from {source}"));
        }
        names.push(h.clone());
    }
    if source.is_loopback() {
        names.extend(["localhost".to_owned(), "127.0.0.1".to_owned()]);
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    Ok(names)
}

/// Failed registrations per source address, for throttling guesses. Per source, so that guesses
/// from one address never lock the right passphrase out for the others: after
/// [`Self::LIMIT`] failures within a minute from an address, its attempts are refused until the
/// oldest of them is a minute old (a sliding window). The table is bounded: past
/// [`Self::SOURCES`] addresses the one with the oldest last failure is forgotten.
#[derive(Debug, Default)]
pub struct RegistrationFailures {
    by_source: std::collections::HashMap<std::net::IpAddr, std::collections::VecDeque<u64>>,
}

impl RegistrationFailures {
    pub const LIMIT: usize = 10;
    pub const WINDOW_MS: u64 = 60_000;
    pub const SOURCES: usize = 4096;

    /// Whether `source` must wait (and forget failures older than the window).
    pub fn locked(&mut self, source: std::net::IpAddr, now: u64) -> bool {
        let Some(f) = self.by_source.get_mut(&source) else { return false };
        while f.front().is_some_and(|t| now.saturating_sub(*t) > Self::WINDOW_MS) {
            f.pop_front();
        }
        if f.is_empty() {
            self.by_source.remove(&source);
            return false;
        }
        f.len() >= Self::LIMIT
    }

    /// Take back the attempt counted at `now` for `source` (its passphrase was right).
    pub fn forgive(&mut self, source: std::net::IpAddr, now: u64) {
        if let Some(f) = self.by_source.get_mut(&source) {
            if let Some(i) = f.iter().rposition(|t| *t == now) {
                f.remove(i);
            }
            if f.is_empty() {
                self.by_source.remove(&source);
            }
        }
    }

    /// Record a failed attempt from `source`.
    pub fn failed(&mut self, source: std::net::IpAddr, now: u64) {
        if !self.by_source.contains_key(&source) && self.by_source.len() >= Self::SOURCES {
            self.by_source.retain(|_, f| f.back().is_some_and(|t| now.saturating_sub(*t) <= Self::WINDOW_MS));
            if self.by_source.len() >= Self::SOURCES {
                let oldest = self.by_source.iter().min_by_key(|(_, f)| f.back().copied()).map(|(ip, _)| *ip);
                if let Some(ip) = oldest {
                    self.by_source.remove(&ip);
                }
            }
        }
        let f = self.by_source.entry(source).or_default();
        f.push_back(now);
        while f.len() > Self::LIMIT {
            f.pop_front();
        }
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;

    fn comp(kind: ComponentKind, name: &str) -> Component {
        Component::new(kind, name)
    }

    #[test]
    fn certificate_names_never_claim_another_components_name_or_this_host_from_afar() {
        let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let remote: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let others = [comp(ComponentKind::ProcessServer, "ps-primary"), comp(ComponentKind::Agent, "db1")];
        let ok = certificate_names(ComponentKind::Agent, "app1", &["app1.example".into()], local, &others).unwrap();
        assert_eq!(ok, ["app1", "app1.example", "localhost", "127.0.0.1"]);
        let far = certificate_names(ComponentKind::Agent, "app1", &[], remote, &others).unwrap();
        assert_eq!(far, ["app1"], "no loopback names for a component registering from elsewhere");
        for (kind, name, hosts) in [
            (ComponentKind::Agent, "app1", vec!["ps-primary".to_owned()]),
            (ComponentKind::Agent, "app1", vec!["config-server".to_owned()]),
            (ComponentKind::Agent, "app1", vec!["ps-primary.".to_owned()]),
            (ComponentKind::Agent, "app1", vec!["Config-Server".to_owned()]),
            (ComponentKind::Agent, "process-server", vec![]),
            (ComponentKind::MasterTarget, "DB1", vec![]),
            (ComponentKind::Agent, "app1", vec!["a b".to_owned()]),
        ] {
            assert!(certificate_names(kind, name, &hosts, local, &others).is_err(), "{kind} {name} {hosts:?}");
        }
        let e = certificate_names(ComponentKind::Agent, "app1", &["localhost".into()], remote, &others).unwrap_err();
        assert!(e.contains("registers from 10.1.2.3"), "{e}");
        // Registering again under one's own name, and a kind's own default name, are fine.
        assert!(certificate_names(ComponentKind::Agent, "db1", &[], local, &others).is_ok());
        assert!(certificate_names(ComponentKind::ProcessServer, "process-server", &[], local, &others).is_ok());
    }
}

#[cfg(test)]
mod site_tests {
    use super::*;

    fn inventory(site: &str, machines: &[&str]) -> Inventory {
        let machines: Vec<_> =
            machines.iter().map(|m| serde_json::json!({"name": m, "os_family": "linux", "host": "h1"})).collect();
        Inventory {
            site: site.into(),
            folder: "/nonexistent".into(),
            discovered_ms: 0,
            content: serde_json::from_value(serde_json::json!({ "machines": machines })).unwrap(),
            warnings: vec![],
        }
    }

    #[test]
    fn a_machine_listed_at_both_sites_registers_at_the_site_it_names() {
        let invs = [inventory("primary", &["db1", "app1"]), inventory("recovery", &["db1"])];
        let site = |name: &str, requested: Option<&str>| component_site(ComponentKind::Agent, name, requested, &invs);
        assert_eq!(site("db1", Some("recovery")).unwrap().as_deref(), Some("recovery"), "after a failover");
        assert_eq!(site("db1", Some("primary")).unwrap().as_deref(), Some("primary"));
        assert!(site("db1", None).unwrap_err().contains("--site"), "ambiguous without a site");
        assert_eq!(site("app1", None).unwrap().as_deref(), Some("primary"), "listed once: that site");
        assert!(site("app1", Some("recovery")).unwrap_err().contains("primary"), "a site that does not list it");
        assert_eq!(site("web9", Some("lab")).unwrap().as_deref(), Some("lab"), "not discovered: the admin's word");
        assert_eq!(site("web9", None).unwrap(), None);
        assert!(site("web9", Some("no such site!")).is_err());
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::RegistrationFailures;
    use std::net::IpAddr;

    #[test]
    fn guesses_from_one_source_never_lock_out_another_and_expire() {
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let mut f = RegistrationFailures::default();
        for i in 0..RegistrationFailures::LIMIT as u64 {
            assert!(!f.locked(a, i));
            f.failed(a, i);
        }
        assert!(f.locked(a, 100), "the guessing source waits");
        assert!(!f.locked(b, 100), "another source is served");
        assert!(!f.locked(a, 100 + RegistrationFailures::WINDOW_MS), "a minute later it may try again");
        // An attempt counted up front and then found right is taken back.
        f.failed(b, 500);
        f.forgive(b, 500);
        assert!(!f.by_source.contains_key(&b));
        for n in 0..(RegistrationFailures::SOURCES as u32 + 10) {
            f.failed(IpAddr::from(n.to_be_bytes()), 200);
        }
        assert!(f.by_source.len() <= RegistrationFailures::SOURCES, "the table stays bounded");
    }
}
