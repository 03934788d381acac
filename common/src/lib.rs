//! Shared by every service of the shortener, and nothing else: environment
//! configuration, logging and metrics set-up, the JSON error body, small hyper
//! response helpers, and the click event. The real-service test harness lives
//! behind the `test-support` feature so production binaries never link it.
//!
//! This crate must stay free of web frameworks and database drivers: the edge
//! depends on it and keeps its hot path lean.

pub mod blocklist;
pub mod config;
pub mod error;
pub mod event;
pub mod http;
pub mod ops;
pub mod redis_conn;
pub mod telemetry;

#[cfg(feature = "test-support")]
pub mod testing;

pub use config::{ConfigError, Env, Secret};
pub use error::ErrorBody;
pub use event::{ClickEvent, EventDecodeError};
