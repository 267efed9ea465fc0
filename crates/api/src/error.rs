//! The error body every Ferry HTTP server answers with.

use ferry_types::ErrorCode;

/// `{code, name, message, remedy}`: what went wrong and who must do what. `code` is from the one
/// registry (`ferry_types::codes`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct ErrorBody {
    pub code: u32,
    #[serde(default)]
    pub name: String,
    pub message: String,
    #[serde(default)]
    pub remedy: String,
}

impl ErrorBody {
    /// An error with the registry's name and remedy for `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code: code.code,
            name: code.name.to_owned(),
            message: message.into(),
            remedy: code.remedy.to_owned(),
        }
    }
    /// An error whose remedy is more specific than the registry's.
    pub fn with_remedy(code: ErrorCode, message: impl Into<String>, remedy: impl Into<String>) -> ErrorBody {
        ErrorBody { code: code.code, name: code.name.to_owned(), message: message.into(), remedy: remedy.into() }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.name, self.message)?;
        if !self.remedy.is_empty() {
            write!(f, " — {}", self.remedy)?;
        }
        Ok(())
    }
}
