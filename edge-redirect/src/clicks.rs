//! The click-event queue. The hot path hands each click over with
//! `try_send` and never waits: a full queue drops the click and counts the
//! drop. What crosses the queue is a `RawClick` that borrows the request's
//! header bytes (reference-counted, no copy); the consumer task turns it into
//! the shared [`ClickEvent`] off the hot path. Shipping events to the Redis
//! stream comes with the analytics pipeline; until then the consumer only
//! counts them.

use std::net::IpAddr;

use http::HeaderValue;
use shortener_common::ClickEvent;
use tokio::sync::mpsc;

pub struct RawClick {
    pub event_id: u128,
    pub code: Box<str>,
    pub ts_ms: i64,
    pub ip: IpAddr,
    pub user_agent: Option<HeaderValue>,
    pub referer: Option<HeaderValue>,
    pub accept_language: Option<HeaderValue>,
}

impl RawClick {
    pub fn into_event(self) -> ClickEvent {
        let text = |v: Option<HeaderValue>| v.and_then(|v| v.to_str().ok().map(str::to_owned));
        ClickEvent {
            event_id: self.event_id,
            code: self.code.into(),
            ts_ms: self.ts_ms,
            ip: self.ip,
            user_agent: text(self.user_agent),
            referer: text(self.referer),
            accept_language: text(self.accept_language),
        }
    }
}

#[derive(Clone)]
pub struct ClickQueue {
    tx: mpsc::Sender<RawClick>,
    accepted: metrics::Counter,
    dropped: metrics::Counter,
}

impl ClickQueue {
    /// A queue of `capacity` clicks and the task that drains it.
    pub fn start(capacity: usize) -> Self {
        let (tx, mut rx) = mpsc::channel::<RawClick>(capacity);
        let consumed = metrics::counter!("edge_click_events_consumed_total");
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(1024);
            while rx.recv_many(&mut batch, 1024).await > 0 {
                let events: Vec<ClickEvent> = batch.drain(..).map(RawClick::into_event).collect();
                consumed.increment(events.len() as u64);
            }
        });
        Self {
            tx,
            accepted: metrics::counter!("edge_click_events_total"),
            dropped: metrics::counter!("edge_click_events_dropped_total"),
        }
    }

    pub fn push(&self, click: RawClick) {
        self.accepted.increment(1);
        if self.tx.try_send(click).is_err() {
            self.dropped.increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_click_becomes_the_shared_event() {
        let event = RawClick {
            event_id: 42,
            code: "abc".into(),
            ts_ms: 7,
            ip: "192.0.2.1".parse().unwrap(),
            user_agent: Some(HeaderValue::from_static("Mozilla/5.0")),
            referer: None,
            accept_language: Some(HeaderValue::from_bytes(b"\xff").unwrap()),
        }
        .into_event();
        assert_eq!(event.code, "abc");
        assert_eq!(event.user_agent.as_deref(), Some("Mozilla/5.0"));
        assert_eq!(event.referer, None);
        // Headers that are not text are left out rather than mangled.
        assert_eq!(event.accept_language, None);
    }
}
