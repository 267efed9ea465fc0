//! API errors of the configuration server. The codes come from the one registry
//! (`ferry_types::codes`), which also drives the `/api/v1/errors` document and
//! `docs/error-codes.md`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
pub use ferry_types::codes::*;
pub use ferry_types::ErrorCode;

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

impl From<ferry_api::config_server::Invalid> for ApiError {
    fn from(e: ferry_api::config_server::Invalid) -> ApiError {
        let status = StatusCode::from_u16(e.code.http_status).unwrap_or(StatusCode::BAD_REQUEST);
        ApiError::new(status, e.code, e.message)
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
