//! The one JSON shape every service uses for an error:
//! `{"error":{"code":"...","message":"..."}}`. `code` is a stable,
//! machine-readable snake_case word; `message` is for people and may change.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an error body always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_to_the_documented_shape() {
        let body = ErrorBody::new("invalid_count", "count must be 1..=1000");
        let value: serde_json::Value = serde_json::from_str(&body.to_json()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"error": {"code": "invalid_count", "message": "count must be 1..=1000"}})
        );
    }
}
