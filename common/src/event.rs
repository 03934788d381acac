//! The click event: one per redirect, made by the edge and consumed by the
//! analytics sink through a Redis stream. Its stream form is an interface
//! between the two (and anyone reading the stream with `XRANGE`), so fields
//! are only ever added.
//!
//! Every entry carries the same seven fields, in this order, absent values as
//! empty strings: Redis stores entries whose field names match the stream's
//! first entry without repeating the names, which keeps a long backlog small.
//!
//! | field  | meaning                                                   |
//! |--------|-----------------------------------------------------------|
//! | `id`   | event id, 32 lowercase hex digits (128 random bits)       |
//! | `code` | the short code that was followed                          |
//! | `ts`   | when the edge answered, Unix milliseconds                 |
//! | `ip`   | the visitor's address                                     |
//! | `ua`   | `User-Agent`                                              |
//! | `ref`  | `Referer`                                                 |
//! | `lang` | `Accept-Language`                                         |

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The stream's field names, in the order every entry uses.
pub const STREAM_FIELDS: [&str; 7] = ["id", "code", "ts", "ip", "ua", "ref", "lang"];

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
    pub ip: IpAddr,
    pub user_agent: Option<String>,
    pub referer: Option<String>,
    pub accept_language: Option<String>,
}

/// Why a stream entry is not a click event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventDecodeError {
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    #[error("field `{field}` is not valid: {value:?}")]
    Invalid { field: &'static str, value: String },
}

impl ClickEvent {
    /// The event's stream fields as `(name, value)` pairs, in
    /// [`STREAM_FIELDS`] order.
    pub fn to_stream_fields(&self) -> [(&'static str, String); 7] {
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        [
            ("id", format!("{:032x}", self.event_id)),
            ("code", self.code.clone()),
            ("ts", self.ts_ms.to_string()),
            ("ip", self.ip.to_string()),
            ("ua", text(&self.user_agent)),
            ("ref", text(&self.referer)),
            ("lang", text(&self.accept_language)),
        ]
    }

    /// Reads an event back from a stream entry's fields (any order; unknown
    /// fields, added by later versions, are ignored).
    pub fn from_stream_fields<'a>(
        fields: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, EventDecodeError> {
        let mut slots: [Option<&[u8]>; 7] = [None; 7];
        for (name, value) in fields {
            if let Some(i) = STREAM_FIELDS.iter().position(|f| *f == name) {
                slots[i] = Some(value);
            }
        }
        let text = |i: usize| -> Result<&str, EventDecodeError> {
            let raw = slots[i].ok_or(EventDecodeError::Missing(STREAM_FIELDS[i]))?;
            std::str::from_utf8(raw).map_err(|_| EventDecodeError::Invalid {
                field: STREAM_FIELDS[i],
                value: String::from_utf8_lossy(raw).into_owned(),
            })
        };
        let invalid = |i: usize, value: &str| EventDecodeError::Invalid {
            field: STREAM_FIELDS[i],
            value: value.to_owned(),
        };
        let optional = |s: &str| (!s.is_empty()).then(|| s.to_owned());

        let id = text(0)?;
        let event_id = (id.len() == 32)
            .then(|| u128::from_str_radix(id, 16).ok())
            .flatten()
            .ok_or_else(|| invalid(0, id))?;
        let code = text(1)?;
        if code.is_empty() {
            return Err(invalid(1, code));
        }
        let ts = text(2)?;
        let ts_ms = ts
            .parse::<i64>()
            .ok()
            .filter(|t| *t >= 0)
            .ok_or_else(|| invalid(2, ts))?;
        let ip = text(3)?;
        let ip = ip.parse().map_err(|_| invalid(3, ip))?;
        Ok(Self {
            event_id,
            code: code.to_owned(),
            ts_ms,
            ip,
            user_agent: optional(text(4)?),
            referer: optional(text(5)?),
            accept_language: optional(text(6)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClickEvent {
        ClickEvent {
            event_id: u128::MAX - 7,
            code: "abc".into(),
            ts_ms: 1_767_225_600_123,
            ip: "2001:db8::1".parse().unwrap(),
            user_agent: Some("curl/8".into()),
            referer: None,
            accept_language: Some("en-GB".into()),
        }
    }

    #[test]
    fn round_trips_through_json() {
        let event = sample();
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(serde_json::from_str::<ClickEvent>(&json).unwrap(), event);
    }

    #[test]
    fn round_trips_through_stream_fields() {
        let event = sample();
        let fields = event.to_stream_fields();
        assert_eq!(fields.clone().map(|(n, _)| n), STREAM_FIELDS);
        assert_eq!(fields[0].1, "fffffffffffffffffffffffffffffff8");
        assert_eq!(fields[5].1, "", "absent values are empty strings");
        let back =
            ClickEvent::from_stream_fields(fields.iter().map(|(n, v)| (*n, v.as_bytes()))).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn refuses_entries_that_are_not_events() {
        let good = sample().to_stream_fields();
        let decode = |replace: (&'static str, &str)| {
            let fields: Vec<(&str, &[u8])> = good
                .iter()
                .map(|(n, v)| {
                    if *n == replace.0 {
                        (*n, replace.1.as_bytes())
                    } else {
                        (*n, v.as_bytes())
                    }
                })
                .collect();
            ClickEvent::from_stream_fields(fields)
        };
        assert!(decode(("id", "xyz")).is_err());
        assert!(decode(("id", "0123")).is_err(), "ids are 32 hex digits");
        assert!(decode(("code", "")).is_err());
        assert!(decode(("ts", "-5")).is_err());
        assert!(decode(("ts", "soon")).is_err());
        assert!(decode(("ip", "300.1.1.1")).is_err());
        let missing: Vec<(&str, &[u8])> = good
            .iter()
            .filter(|(n, _)| *n != "ip")
            .map(|(n, v)| (*n, v.as_bytes()))
            .collect();
        assert_eq!(
            ClickEvent::from_stream_fields(missing),
            Err(EventDecodeError::Missing("ip"))
        );
        // Fields a later version adds are ignored.
        let mut extra: Vec<(&str, &[u8])> = good.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        extra.push(("new", b"x"));
        assert!(ClickEvent::from_stream_fields(extra).is_ok());
    }
}
