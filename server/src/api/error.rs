//! The API's one error type and its JSON shape: `{"error": {"code": "...", "message": "..."}}`.

use axum::Json;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use marathon_core::{EngineError, IdError, StoreError};
use serde::Serialize;
use utoipa::ToSchema;

/// An API error: a stable code, an HTTP status and a client-safe message.
///
/// Causes of server-side failures are logged when the response is made, never returned.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The code and message of an error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code: `not_found`, `invalid_argument`, `conflict`,
    /// `unauthorized`, `payload_too_large`, `unsupported_media_type`,
    /// `method_not_allowed`, `unavailable`, `internal`.
    pub code: String,
    /// Human-readable, client-safe message.
    pub message: String,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid_argument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required (Authorization: Bearer <token>)",
        )
    }

    /// 500 `internal`; `cause` is logged, not returned.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    /// 503 `unavailable`; `cause` is logged, not returned.
    pub fn unavailable(cause: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "backend unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "a backend is unavailable; try again later",
        )
    }

    /// The HTTP status.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    #[must_use]
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The client-safe message.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NotFound(id) => Self::not_found(format!("workflow {id} not found")),
            EngineError::UnknownWorkflow(name) => Self::invalid(format!(
                "workflow {name:?} is not registered on this server"
            )),
            EngineError::Closed(id) => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("workflow {id} has already finished"),
            ),
            EngineError::InvalidArgument(m) => Self::invalid(m),
            EngineError::UnservedTaskQueue { reason, .. } => {
                Self::invalid(format!("task_queue: {reason}"))
            }
            e @ EngineError::AlreadyStarted { .. } => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            EngineError::Store(StoreError::InvalidCursor(_)) => {
                Self::invalid("invalid cursor: pass a next_cursor from a previous page")
            }
            EngineError::Store(StoreError::NotFound(id)) => {
                Self::not_found(format!("workflow {id} not found"))
            }
            EngineError::Store(StoreError::Closed(id)) => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("workflow {id} has already finished"),
            ),
            e if e.is_retryable() => Self::unavailable(&e),
            e => Self::internal(&e),
        }
    }
}

impl From<IdError> for ApiError {
    fn from(e: IdError) -> Self {
        Self::invalid(e.to_string())
    }
}

fn from_rejection(status: StatusCode, text: String) -> ApiError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(status, "payload_too_large", text),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(status, "unsupported_media_type", text),
        s if s.is_server_error() => ApiError::internal(&text),
        _ => ApiError::invalid(text),
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        from_rejection(r.status(), r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        from_rejection(r.status(), r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        from_rejection(r.status(), r.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        from_rejection(r.status(), r.body_text())
    }
}
