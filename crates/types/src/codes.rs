//! The one registry of error codes (TiKV's `error_code` shape): every code Ferry reports — on the
//! wire (`Message::Error`), in HTTP bodies (`{code, name, message, remedy}`), in job steps and
//! events — is declared here once, with a name, what it means, what the operator should do, and
//! the HTTP status it answers with. The reference product's numbers (806, 8061, 78093, 95226, …)
//! keep their values; Ferry's own are 9001 and up.
//!
//! `docs/error-codes.md` is generated from [`ALL`] (a test rewrites it under `UPDATE_DOCS=1` and
//! checks it otherwise); another test checks every code is unique and has a remedy.

use serde::Serialize;

/// An entry of the registry: what the code means and what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ErrorCode {
    pub code: u32,
    pub name: &'static str,
    pub meaning: &'static str,
    pub remedy: &'static str,
    /// The HTTP status an API answers with when this is the reason.
    pub http_status: u16,
}

/// An error type that maps each of its cases to a registry entry.
pub trait HasErrorCode {
    fn error_code(&self) -> ErrorCode;
}

macro_rules! registry {
    ($($(#[$doc:meta])* $ident:ident = $code:expr, $status:expr, $name:expr, $meaning:expr, $remedy:expr;)*) => {
        $($(#[$doc])* pub const $ident: ErrorCode =
            ErrorCode { code: $code, name: $name, meaning: $meaning, remedy: $remedy, http_status: $status };)*
        /// Every code, in declaration order.
        pub const ALL: &[ErrorCode] = &[$($ident),*];
    };
}

registry! {
    // The reference product's codes (REQUIREMENTS, ERR): same numbers.
    PS_HEARTBEAT_LOST = 806, 503, "ps-heartbeat-lost",
        "the process server has not sent a heartbeat within the threshold",
        "check that the process server runs and reaches the configuration server (network, certificates)";
    HOST_LACKS_MEMORY = 8038, 409, "host-lacks-memory",
        "the primary machine could not be started: the host lacks memory",
        "free memory on the host or choose another host";
    DATASTORE_INACCESSIBLE = 8061, 409, "datastore-inaccessible",
        "the datastore is not accessible from the host",
        "mount the datastore on the host, or choose one the host mounts";
    MT_HEARTBEAT_LOST = 78022, 503, "mt-heartbeat-lost",
        "the master target has not sent a heartbeat within the threshold",
        "check that the master target runs and reaches the configuration server";
    PROTECTION_NOT_COMPLETED = 78052, 409, "protection-not-completed",
        "protection could not be completed (unsupported OS, or a machine with the same name is already failing back on that master target's host)",
        "use a supported OS, or wait until the other failback finishes";
    MACHINE_NOT_ACCESSIBLE = 78093, 409, "machine-not-accessible",
        "the machine is not running, hung, or not accessible",
        "start the machine and check that its agent runs";
    SOURCE_HEARTBEAT_LOST = 78174, 503, "source-heartbeat-lost",
        "the source machine's agent has not sent a heartbeat within the threshold",
        "check that the machine runs, its agent service runs, and it reaches the configuration server";
    PS_UNREACHABLE = 78186, 503, "ps-unreachable",
        "the process server is unreachable from the source",
        "check the network path and the process server's address in the agent's configuration";
    CHURN_BEYOND_LIMITS = 78188, 503, "churn-beyond-limits",
        "the machine writes more than replication can carry",
        "add process-server capacity or bandwidth, or exclude volatile disks";
    POLICY_NOT_ASSOCIATED = 78253, 409, "policy-not-associated",
        "the replication policy is not associated with the configuration server",
        "associate the policy, or choose one that is";
    REPROTECT_NO_SERVER_PATH = 95226, 409, "reprotect-no-server-path",
        "reprotect failed: the failed-over machine cannot reach the configuration server",
        "give the machine a network path to the configuration server and start its agent";

    // Ferry's own: the data path.
    PROTOCOL = 9001, 400, "protocol",
        "the peer sent something that is not a valid Ferry message at this point",
        "check that both ends run the same Ferry version and that nothing else answers on the address";
    DISK_LAYOUT_CHANGED = 9002, 409, "disk-layout-changed",
        "the machine's disk layout differs from what this hop holds (a disk was added, removed or resized)",
        "re-protect the machine so the hops take the new layout";
    STORAGE = 9003, 500, "storage",
        "storage failed at this hop (spool, journal, target disk or image folder)",
        "check the named folder: free space, permissions, the disk's health; the hop's log has the detail";
    BAD_NAME = 9004, 400, "bad-name",
        "a machine or disk name is not allowed (1-128 characters from A-Z a-z 0-9 . _ -, not starting with '.')",
        "rename the machine or disk";
    NOT_REPLICATING = 9005, 409, "not-replicating",
        "the machine is in initial sync or resync, not replicating in order",
        "retry once the agent reports caught_up";
    NOT_FOUND = 9006, 404, "not-found",
        "no such object",
        "list the objects and use an existing name or ID";
    POINT_NOT_FOUND = 9007, 404, "point-not-found",
        "no recovery point matches (none yet, pruned, or not valid)",
        "list the machine's points (`ferry recovery-points MACHINE`) and choose one that exists";
    CONFLICT = 9008, 409, "conflict",
        "the request conflicts with the current state",
        "reload the object and retry, or resolve the conflict named in the message";
    BAD_REQUEST = 9009, 400, "bad-request",
        "the request is malformed (JSON, types, fields, or a path-like name)",
        "fix the request as the message says; see the API's openapi.json";
    MATERIALIZE_FAILED = 9010, 500, "materialize-failed",
        "making an image or export of a recovery point failed",
        "check the image folder and the retention volume; the master target's log has the detail";
    HOOK_FAILED = 9011, 500, "hook-failed",
        "a freeze/thaw hook failed or timed out: no app-consistent point was taken",
        "fix the hook named in the agent's configuration (see the agent log) and take the point again";
    GROUP_TAG_FAILED = 9012, 409, "group-tag-failed",
        "a multi-machine (group) point could not be taken on every member",
        "check that every member's agent runs and is caught up, then take a new group point";
    INVALID_RECORD = 9013, 400, "invalid-record",
        "a record names a disk the machine does not have or writes outside its disk; it was not acknowledged",
        "restart the agent; if it persists, re-protect the machine";
    NOT_PROTECTED = 9014, 403, "not-protected",
        "a stream for a machine the configuration server has not protected on this master target was refused: no replica was created",
        "protect the machine through the configuration server (`ferry protect`), which assigns it to this master target; a standalone master target names its machines in `machine_datastores`";
    WRONG_IDENTITY = 9015, 403, "wrong-identity",
        "the peer's certificate does not carry the identity this stream needs (an agent streams only its own machine, a master target takes a machine only from the process server routed for it); nothing was written",
        "give each component the certificate issued to it: `ferry register` (the configuration server names it KIND/NAME@SITE), or `ferry certs --component agent/MACHINE` for a CA you hold";
    CERTIFICATE_REVOKED = 9016, 403, "certificate-revoked",
        "the peer's certificate was revoked (its component registered again, or an admin revoked it); nothing was written",
        "register the component again (`ferry register`) and restart it with its new certificate";
    BULK_OUTSIDE_INITIAL_SYNC = 9017, 409, "bulk-outside-initial-sync",
        "initial-sync (bulk) data arrived for a replica that is not in an initial sync; nothing was written",
        "nothing to do if the agent is starting an initial sync (it resends once its ResyncBegin is journaled); otherwise restart the agent, and if it persists re-protect the machine";
    FENCED = 9018, 409, "fenced",
        "the replica is fenced (its machine failed over): the master target takes nothing more from its old source; nothing was written",
        "nothing to do on the old primary: stop its agent; to replicate again, reprotect the machine (it replicates back from the recovery site)";
    FAILOVER_STATE = 9019, 409, "failover-state",
        "the machine's failover state does not allow this: it is not failed over, its failover is already committed (the point cannot change any more), or it is still being handed over",
        "see the replica's `failover` in `ferry master-target status`; a committed failover is undone only by reprotect and failback";

    // Ferry's own: the control plane.
    UNAUTHENTICATED = 9020, 401, "unauthenticated",
        "no valid API token was given",
        "send `Authorization: Bearer <token>` (`ferry tokens create` by an admin, or the first admin token shown at first start)";
    FORBIDDEN = 9021, 403, "forbidden",
        "the token's role may not do this",
        "use a token with the operator or admin role";
    READ_ONLY_POLICY = 9022, 409, "read-only-policy",
        "a failback policy is created with its forward policy and is read-only (POL-2)",
        "edit the forward policy instead; its failback policy stays at 15 min / 24 h / 60 min";
    LIMIT_EXCEEDED = 9023, 400, "limit-exceeded",
        "a recovery plan may hold at most 7 groups and 100 machines, each machine or replication group in one group",
        "split the plan";
    REGISTRATION_REFUSED = 9024, 403, "registration-refused",
        "registration was refused: wrong passphrase or certificate request",
        "ask the administrator for the current passphrase (`ferry config-server passphrase --rotate` shows a new one)";
    JOB_STATE = 9025, 409, "job-state",
        "the job is not in a state that allows this",
        "check the job's state with `ferry jobs show ID`";
    DISCOVERY_FAILED = 9026, 502, "discovery-failed",
        "the site could not be discovered",
        "fix the site description named in the message and rediscover";
    STORE = 9027, 500, "store",
        "the configuration database failed",
        "check the database (disk space, PostgreSQL reachable) and the server log";
    BODY_TOO_LARGE = 9028, 413, "body-too-large",
        "the request body is larger than the server accepts",
        "send a smaller body (the limit is max_body_bytes)";
    BACKUP_FAILED = 9029, 500, "backup-failed",
        "the configuration backup or restore failed",
        "check the backup folder, its space and the backup key";
    MIXED_OS_FAMILY = 9030, 400, "mixed-os-family",
        "all machines of a replication group must have the same OS family (RG-1)",
        "put machines of different OS families in different replication groups";
    INTERNAL = 9031, 500, "internal",
        "a component failed inside (a worker thread ended unexpectedly)",
        "see the component's log and report it; retry the request";
    DISK_IN_USE = 9032, 409, "disk-in-use",
        "a target disk is locked by another writer (the machine runs at the recovery site, or another process holds it): nothing was changed",
        "shut the machine at the recovery site down (its agent releases the disks), then retry";
    DRAIN_INCOMPLETE = 9033, 504, "drain-incomplete",
        "a planned failover could not confirm that the recovery site holds every write the primary acknowledged (the primary's agent is quiesced: it takes no writes)",
        "check the link, the process server and the master target (`ferry components`), then run the planned failover again (it resumes where it stopped), or fail over unplanned to a chosen point (the writes after it are lost)";
    LINEAGE_MISMATCH = 9034, 409, "lineage-mismatch",
        "the stream comes from another copy of the machine's disks than the one the replica holds (a failed-over or restored copy with the same name); nothing was written",
        "stop the agent of the other copy; to replicate that copy, reprotect the machine (it replicates from the copy that runs), or protect it again for a full initial sync";
    PROTECTION_STATE = 9035, 409, "protection-state",
        "the machine's protection state does not allow this: another job works on it, it is in a test failover, it is failed over (disable needs --force), or its protection is already disabled",
        "see `ferry machines` and the job it names; wait for or cancel that job, clean a drill up, or say --force for a failed-over machine";
    STANDBY_SERVER = 9036, 503, "standby-server",
        "this configuration server is a standby: it keeps a copy of the active server's data and takes no changes",
        "send the request to the active server; if it is lost, promote this one (`ferry config-server promote`)";
    STALE_SERVER = 9037, 409, "stale-server",
        "another configuration server was promoted above this one (a higher epoch): this one takes no changes, runs no jobs and serves no settings",
        "use the promoted server named in the message; to use this host again, set it up as a standby of the promoted server";
    REPROTECT_REFUSED = 9038, 409, "reprotect-refused",
        "a precondition of reprotect does not hold (the check's message names which and why); nothing was changed",
        "fix what the check names, then run the reprotect again; `ferry reprotect MACHINE --dry-run` lists every check with its remedy";
    AGENT_NOT_INSTALLED = 9039, 409, "agent-not-installed",
        "the failed-over machine's mobility service (agent) has not registered with the configuration server yet (RP-7: up to 15 minutes after it boots)",
        "wait until the machine at the recovery site has booted and its agent registered (`ferry components`), then retry the reprotect";
    REPLICA_NOT_VERIFIED = 9040, 409, "replica-not-verified",
        "the block-hash comparison of the source disks with the replica still found differing blocks after its repair rounds (the message names the disk and offsets): the machine is not declared Protected",
        "look for a failing disk or a second writer of the replica's files at the master target, then run the reprotect again (it compares and repairs again)";
    SPLIT_BRAIN = 9041, 409, "split-brain",
        "the old primary wrote after the failover started (or its clock cannot tell): its disks and the recovery site's hold two histories, and the reprotect would overwrite the primary's (the message names the regions and times)",
        "save what the old primary wrote if it matters, then run the reprotect again with --discard-primary-changes (API: discard_primary_changes) to overwrite it with the recovery site's version";
}

/// The registry entry for `code`.
pub fn by_code(code: u32) -> Option<ErrorCode> {
    ALL.iter().copied().find(|c| c.code == code)
}

/// The registry as a Markdown document (what `docs/error-codes.md` holds).
pub fn markdown() -> String {
    let mut out = String::from(
        "# Error codes\n\nGenerated from `crates/types/src/codes.rs` (the one registry) by its test; do not edit by hand.\n\
         Run `UPDATE_DOCS=1 cargo test -p ferry-types` after changing the registry.\n\n\
         Every error Ferry reports carries one of these codes: on the wire (`Message::Error`), in API bodies\n\
         (`{code, name, message, remedy}`), in job steps and in events. The reference product's codes keep\n\
         their numbers; Ferry's own start at 9001.\n\n\
         | code | name | HTTP | meaning | remedy |\n|---|---|---|---|---|\n",
    );
    for c in ALL {
        out.push_str(&format!(
            "| {} | `{}` | {} | {} | {} |\n",
            c.code,
            c.name,
            c.http_status,
            c.meaning.replace('|', "\\|"),
            c.remedy.replace('|', "\\|")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_and_name_is_unique_and_has_a_meaning_and_a_remedy() {
        let mut codes: Vec<u32> = ALL.iter().map(|c| c.code).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), ALL.len(), "a code is declared twice");
        let mut names: Vec<&str> = ALL.iter().map(|c| c.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "a name is declared twice");
        for c in ALL {
            assert!(!c.meaning.is_empty() && !c.remedy.is_empty(), "{} lacks a meaning or a remedy", c.code);
            assert!((400..600).contains(&c.http_status), "{} has HTTP status {}", c.code, c.http_status);
            assert!(c.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'), "{}: name {:?}", c.code, c.name);
        }
        assert_eq!(by_code(78093), Some(MACHINE_NOT_ACCESSIBLE));
        assert_eq!(by_code(1), None);
    }

    #[test]
    fn the_error_code_document_is_generated_from_the_registry() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/error-codes.md");
        let want = markdown();
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(have == want, "docs/error-codes.md is stale: run `UPDATE_DOCS=1 cargo test -p ferry-types`");
    }
}
