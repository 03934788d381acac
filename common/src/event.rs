//! The click event: one per redirect, made by the edge and consumed by the
//! analytics sink. Its serialised form is an interface between the two, so
//! fields are only ever added.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClickEvent {
    /// 128-bit random id, unique per redirect; lets the pipeline drop
    /// duplicates so a retried event is counted once.
    pub event_id: u128,
    /// The short code that was followed.
    pub code: String,
    /// When the edge answered, Unix milliseconds.
    pub ts_ms: i64,
    /// The visitor's address (from `X-Forwarded-For` only behind a trusted
    /// proxy).
    pub ip: std::net::IpAddr,
    pub user_agent: Option<String>,
    pub referer: Option<String>,
    pub accept_language: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let event = ClickEvent {
            event_id: u128::MAX - 7,
            code: "abc".into(),
            ts_ms: 1_767_225_600_123,
            ip: "2001:db8::1".parse().unwrap(),
            user_agent: Some("curl/8".into()),
            referer: None,
            accept_language: Some("en-GB".into()),
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(serde_json::from_str::<ClickEvent>(&json).unwrap(), event);
    }
}
