#![no_main]
//! Feed arbitrary bytes as the JSON body of every request type the HTTP APIs take (the
//! configuration server's, the agent's and the master target's), and validate what parses: a
//! body must be refused with an error, never panic a component.
use libfuzzer_sys::fuzz_target;

fn body<T: serde::de::DeserializeOwned>(data: &[u8]) -> Option<T> {
    serde_json::from_slice(data).ok()
}

fuzz_target!(|data: &[u8]| {
    use ferry_api::config_server as cs;
    let Some((&which, data)) = data.split_first() else { return };
    match which % 12 {
        0 => {
            if let Some(p) = body::<cs::Policy>(data) {
                let _ = p.validate();
            }
        }
        1 => {
            if let Some(g) = body::<cs::ReplicationGroup>(data) {
                let _ = g.validate();
            }
        }
        2 => {
            if let Some(p) = body::<cs::RecoveryPlan>(data) {
                let _ = p.validate(|_| Some(vec!["vm1".into()]));
            }
        }
        3 => {
            let _ = body::<cs::ProtectRequest>(data);
        }
        4 => {
            let _ = body::<cs::RegisterRequest>(data);
        }
        5 => {
            let _ = body::<cs::SiteOperation>(data);
        }
        6 => {
            if let Some(s) = body::<ferry_api::control::ComponentSettings>(data) {
                let _ = s.without_secrets();
            }
        }
        7 => {
            let _ = body::<ferry_api::agent::GroupRequest>(data);
        }
        8 => {
            let _ = body::<ferry_api::agent::VerifyRequest>(data);
        }
        9 => {
            let _ = body::<ferry_api::master_target::SelectPoint>(data);
        }
        10 => {
            let _ = body::<ferry_api::master_target::MaterializeRequest>(data);
        }
        _ => {
            let _ = body::<ferry_api::control::Heartbeat>(data);
        }
    }
});
