//! One error-code table drives API bodies, CLI messages and the `/api/v1/errors` document: the
//! REQUIREMENTS ERR codes plus Ferry's own (9xxx, shared with the data path's `codes`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// An entry of the table: what the code means and what to do.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ErrorCode {
    pub code: u32,
    pub name: &'static str,
    pub meaning: &'static str,
    pub remedy: &'static str,
}

macro_rules! table {
    ($($ident:ident = $code:expr, $name:expr, $meaning:expr, $remedy:expr;)*) => {
        $(pub const $ident: ErrorCode = ErrorCode { code: $code, name: $name, meaning: $meaning, remedy: $remedy };)*
        pub const TABLE: &[ErrorCode] = &[$($ident),*];
    };
}

table! {
    // REQUIREMENTS (ERR): same numbers as the reference product.
    PS_HEARTBEAT_LOST = 806, "ps-heartbeat-lost", "the process server has not sent a heartbeat within the threshold", "check that the process server runs and reaches the configuration server (network, certificates)";
    HOST_LACKS_MEMORY = 8038, "host-lacks-memory", "the primary machine could not be started: the host lacks memory", "free memory on the host or choose another host";
    DATASTORE_INACCESSIBLE = 8061, "datastore-inaccessible", "the datastore is not accessible from the host", "mount the datastore on the host, or choose one the host mounts";
    MT_HEARTBEAT_LOST = 78022, "mt-heartbeat-lost", "the master target has not sent a heartbeat within the threshold", "check that the master target runs and reaches the configuration server";
    PROTECTION_NOT_COMPLETED = 78052, "protection-not-completed", "protection could not be completed (unsupported OS, or a machine with the same name is already failing back on that master target's host)", "use a supported OS, or wait until the other failback finishes";
    MACHINE_NOT_ACCESSIBLE = 78093, "machine-not-accessible", "the machine is not running, hung, or not accessible", "start the machine and check that its agent runs";
    SOURCE_HEARTBEAT_LOST = 78174, "source-heartbeat-lost", "the source machine's agent has not sent a heartbeat within the threshold", "check that the machine runs, its agent service runs, and it reaches the configuration server";
    PS_UNREACHABLE = 78186, "ps-unreachable", "the process server is unreachable from the source", "check the network path and the process server's address in the agent's configuration";
    CHURN_BEYOND_LIMITS = 78188, "churn-beyond-limits", "the machine writes more than replication can carry", "add process-server capacity or bandwidth, or exclude volatile disks";
    POLICY_NOT_ASSOCIATED = 78253, "policy-not-associated", "the replication policy is not associated with the configuration server", "associate the policy, or choose one that is";
    REPROTECT_NO_SERVER_PATH = 95226, "reprotect-no-server-path", "reprotect failed: the failed-over machine cannot reach the configuration server", "give the machine a network path to the configuration server and start its agent";
    // Ferry's own.
    BAD_REQUEST = 9009, "bad-request", "the request is malformed (JSON, types, fields, or a path-like name)", "fix the request as the message says; see /api/v1/openapi.json";
    NOT_FOUND = 9006, "not-found", "no such object", "list the objects and use an existing name or ID";
    CONFLICT = 9008, "conflict", "the request conflicts with the current state", "reload the object and retry, or resolve the conflict named in the message";
    UNAUTHENTICATED = 9020, "unauthenticated", "no valid API token was given", "send `Authorization: Bearer <token>` (`ferry tokens create` by an admin, or the first admin token shown at first start)";
    FORBIDDEN = 9021, "forbidden", "the token's role may not do this", "use a token with the operator or admin role";
    READ_ONLY_POLICY = 9022, "read-only-policy", "a failback policy is created with its forward policy and is read-only (POL-2)", "edit the forward policy instead; its failback policy stays at 15 min / 24 h / 60 min";
    LIMIT_EXCEEDED = 9023, "limit-exceeded", "a recovery plan may hold at most 7 groups and 100 machines, each machine or replication group in one group", "split the plan";
    REGISTRATION_REFUSED = 9024, "registration-refused", "registration was refused: wrong passphrase or certificate request", "ask the administrator for the current passphrase (`ferry config-server passphrase --rotate` shows a new one)";
    JOB_STATE = 9025, "job-state", "the job is not in a state that allows this", "check the job's state with `ferry jobs show ID`";
    DISCOVERY_FAILED = 9026, "discovery-failed", "the site could not be discovered", "fix the site description named in the message and rediscover";
    STORE = 9027, "store", "the configuration database failed", "check the database (disk space, PostgreSQL reachable) and the server log";
    BODY_TOO_LARGE = 9028, "body-too-large", "the request body is larger than the server accepts", "send a smaller body (the limit is max_body_bytes)";
    BACKUP_FAILED = 9029, "backup-failed", "the configuration backup or restore failed", "check the backup folder, its space and the backup key";
    MIXED_OS_FAMILY = 9030, "mixed-os-family", "all machines of a replication group must have the same OS family (RG-1)", "put machines of different OS families in different replication groups";
}

/// An API error: HTTP status plus the table's code, a message naming what was wrong, and a remedy.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, CONFLICT, message)
    }
}

impl From<ferry_store::StoreError> for ApiError {
    fn from(e: ferry_store::StoreError) -> ApiError {
        match e {
            ferry_store::StoreError::Conflict { .. } => ApiError::conflict(e.to_string()),
            other => {
                tracing::error!(error = %other, "store error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, STORE, other.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "code": self.code.code,
            "name": self.code.name,
            "message": self.message,
            "remedy": self.code.remedy,
        });
        (self.status, Json(body)).into_response()
    }
}
