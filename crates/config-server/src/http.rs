//! HTTP plumbing shared by every handler: the caller's role from its bearer token, JSON bodies
//! whose rejections use Ferry's error format, and the answer helpers.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use crate::errors::{self, ApiError};
use crate::AppState;

/// Token roles: reader < operator < admin, and component tokens (given at registration).
pub use ferry_api::Role;

pub fn hash_token(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

pub fn new_token() -> String {
    let b: [u8; 24] = rand::random();
    format!("fy_{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

/// The caller, from `Authorization: Bearer <token>`.
#[derive(Debug, Clone)]
pub struct Caller {
    pub role: Role,
    pub token_name: String,
}

impl Caller {
    /// Whether the caller's role grants `role` (for checks that depend on the object; the route
    /// table's role is checked before any handler runs).
    pub(crate) fn need(&self, role: Role) -> Result<(), ApiError> {
        if self.role.allows(role) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            errors::FORBIDDEN,
            format!("token {:?} has the {} role; this needs {}", self.token_name, self.role.as_str(), role.as_str()),
        ))
    }

    /// The caller of a request, from its bearer token.
    pub(crate) async fn from_token(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let unauth = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, errors::UNAUTHENTICATED, m.to_owned());
        let header =
            parts.headers.get(axum::http::header::AUTHORIZATION).ok_or_else(|| unauth("no Authorization header"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| unauth("the Authorization header is not `Bearer <token>`"))?;
        let rec = state
            .store
            .token_by_hash(&hash_token(token.trim()))
            .await?
            .ok_or_else(|| unauth("unknown or revoked token"))?;
        let role = Role::parse_token_role(&rec.role).ok_or_else(|| unauth("the token has an unknown role"))?;
        Ok(Caller { role, token_name: rec.name })
    }
}

/// The caller the route's role check found (or, on a route without one, from the token).
impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Caller, ApiError> {
        if let Some(c) = parts.extensions.get::<Caller>() {
            return Ok(c.clone());
        }
        Caller::from_token(parts, state).await
    }
}

/// JSON body with our error format for malformed input.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => {
                let status = e.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    return Err(ApiError::new(status, errors::BODY_TOO_LARGE, e.body_text()));
                }
                Err(ApiError::new(
                    if status.is_client_error() { status } else { StatusCode::BAD_REQUEST },
                    errors::BAD_REQUEST,
                    e.body_text(),
                ))
            }
        }
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

pub(crate) fn ok<T: serde::Serialize>(v: T) -> ApiResult {
    Ok(Json(v).into_response())
}

pub(crate) fn created<T: serde::Serialize>(v: T) -> ApiResult {
    Ok((StatusCode::CREATED, Json(v)).into_response())
}
