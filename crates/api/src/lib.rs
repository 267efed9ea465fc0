//! The types that cross Ferry's HTTP boundaries, used by the server that answers and by every
//! client that asks (the CLI, the lab, the configuration server reading heartbeats, agents
//! coordinating group points). Each server's routes are listed once here ([`route::Route`]); the
//! server builds its router and its role checks from that table, and [`route::openapi`] turns it
//! into the server's OpenAPI document (committed under `openapi/`, checked by a test).
//!
//! API boundary: changing a type here changes a wire format; add fields with `#[serde(default)]`.

pub mod agent;
pub mod config_server;
pub mod control;
pub mod error;
pub mod inventory;
pub mod master_target;
pub mod process_server;
pub mod route;

pub use error::ErrorBody;
pub use route::{Method, Role, Route};

/// A timestamped event a component keeps in memory and shows in its status (newest last).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Event {
    pub time_ms: u64,
    pub kind: String,
    pub message: String,
}

/// The OpenAPI document of each server, by file name under `docs/openapi/`.
pub fn openapi_documents() -> Vec<(&'static str, serde_json::Value)> {
    use route::{openapi, DocInfo};
    vec![
        (
            "config-server.json",
            openapi(&DocInfo { title: "Ferry configuration server", bearer_tokens: true }, config_server::ROUTES),
        ),
        (
            "master-target.json",
            openapi(
                &DocInfo { title: "Ferry master target (status listener)", bearer_tokens: false },
                master_target::ROUTES,
            ),
        ),
        (
            "agent.json",
            openapi(&DocInfo { title: "Ferry agent (status listener)", bearer_tokens: false }, agent::ROUTES),
        ),
        (
            "process-server.json",
            openapi(
                &DocInfo { title: "Ferry process server (status listener)", bearer_tokens: false },
                process_server::ROUTES,
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    /// The committed OpenAPI files are what the route tables say: `UPDATE_OPENAPI=1 cargo test -p
    /// ferry-api` rewrites them; otherwise a drift fails here, without a live server.
    #[test]
    fn committed_openapi_documents_match_the_route_tables() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi");
        let update = std::env::var_os("UPDATE_OPENAPI").is_some();
        for (name, doc) in super::openapi_documents() {
            let text = serde_json::to_string_pretty(&doc).unwrap() + "\n";
            let path = dir.join(name);
            if update {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
                continue;
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == text,
                "docs/openapi/{name} drifted from the route table: run `UPDATE_OPENAPI=1 cargo test -p ferry-api` and commit it"
            );
        }
    }

    /// Every route has a summary, each path+method is listed once, and paths are absolute.
    #[test]
    fn route_tables_are_well_formed() {
        fn check<Id: Copy>(name: &str, t: &[super::Route<Id>]) {
            let mut seen = std::collections::HashSet::new();
            for r in t {
                assert!(r.path.starts_with('/'), "{name}: {}", r.path);
                assert!(!r.summary.is_empty(), "{name}: {} has no summary", r.path);
                assert!(seen.insert((r.method, r.path)), "{name}: {:?} {} listed twice", r.method, r.path);
            }
        }
        check("config-server", super::config_server::ROUTES);
        check("master-target", super::master_target::ROUTES);
        check("agent", super::agent::ROUTES);
        check("process-server", super::process_server::ROUTES);
    }
}
