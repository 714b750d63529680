//! Errors in OpenAI's shape and the request parser. The wire types themselves are
//! [`optimsyn_synth::openai::wire`], shared with the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use optimsyn_synth::openai::wire::{self, ErrorObject, ErrorResponse};
use serde_json::Value;

/// An error reply: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After` (503 when busy).
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// 404 for a model this server does not serve (OpenAI's `model_not_found`).
    pub(crate) fn model_not_found(asked: &str, served: &str) -> ApiError {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::status(
                404,
                format!("the model `{asked}` does not exist; this server serves `{served}`"),
            )
        }
    }

    /// A 400 `invalid_request_error`, naming the field when one is at fault.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    /// Any status; the type is `server_error` for 5xx, else `invalid_request_error`.
    pub fn status(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind: if status >= 500 {
                "server_error"
            } else {
                "invalid_request_error"
            },
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// Sets the machine-readable code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The wire object.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorObject {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.map(|c| Value::String(c.to_string())),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = json_response(status, &self.body());
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// A JSON reply with a known length.
pub(crate) fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the reply: {e}"),
        )
            .into_response(),
    }
}

/// Parses a request body (a JSON object), naming the field at fault. serde_json's recursion limit
/// (128) turns deeply nested input into an error rather than a stack overflow.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object", None));
    }
    wire::from_value_at(value)
        .map_err(|(message, path)| ApiError::invalid(message, path.as_deref()))
}

/// The model object of `/v1/models`.
pub(crate) fn model_object(name: &str, created: u64) -> wire::Model {
    wire::Model {
        id: name.to_string(),
        object: "model".into(),
        created,
        owned_by: "optimsyn".into(),
        parent: None,
        root: None,
    }
}
