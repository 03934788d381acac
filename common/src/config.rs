//! Typed configuration from environment variables.
//!
//! Every service reads its settings through an [`Env`], which records each bad
//! value instead of stopping at the first, so an operator sees every mistake
//! in one start-up message. Secrets come from `NAME` or from the file named by
//! `NAME_FILE` (the Docker and Kubernetes secrets convention) and are wrapped
//! in [`Secret`], whose `Debug` never prints the value.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// Exit status for a configuration error (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// A value that must not appear in logs: database URLs with passwords, API
/// keys, the keygen permutation secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Every problem found in the environment, one line each.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .problems.join("\n  "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// Reads variables and collects every problem before reporting any.
pub struct Env {
    vars: HashMap<String, String>,
    problems: Vec<String>,
}

impl Env {
    /// The process environment.
    pub fn from_process() -> Self {
        Self::from_pairs(std::env::vars())
    }

    /// An explicit set of variables, for tests and for embedding.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            problems: Vec::new(),
        }
    }

    /// The raw value, treating an empty string as unset.
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Parses `name`, or returns `default` when it is unset.
    pub fn parse_or<T>(&mut self, name: &str, default: T) -> T
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.parse_opt(name).unwrap_or(default)
    }

    /// Parses `name` if it is set.
    pub fn parse_opt<T>(&mut self, name: &str) -> Option<T>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let raw = self.raw(name)?.to_owned();
        match raw.parse() {
            Ok(value) => Some(value),
            Err(err) => {
                self.problems
                    .push(format!("{name}={raw:?} is not valid: {err}"));
                None
            }
        }
    }

    /// Parses `name`, which must be set.
    pub fn parse_required<T>(&mut self, name: &str) -> Option<T>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        if self.raw(name).is_none() {
            self.problems.push(format!("{name} must be set"));
            return None;
        }
        self.parse_opt(name)
    }

    /// A secret from `name`, or from the file that `name_FILE` points at
    /// (trailing newline removed). Setting both is an error, so there is never
    /// doubt about which one is used.
    pub fn secret_opt(&mut self, name: &str) -> Option<Secret> {
        let file_var = format!("{name}_FILE");
        match (self.raw(name), self.raw(&file_var)) {
            (Some(_), Some(_)) => {
                self.problems
                    .push(format!("set only one of {name} and {file_var}"));
                None
            }
            (Some(value), None) => Some(Secret::new(value)),
            (None, Some(path)) => {
                let path = path.to_owned();
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        let value = text.trim_end_matches(['\n', '\r']).to_owned();
                        if value.is_empty() {
                            self.problems
                                .push(format!("{file_var}={path:?} names an empty file"));
                            None
                        } else {
                            Some(Secret::new(value))
                        }
                    }
                    Err(err) => {
                        self.problems
                            .push(format!("{file_var}={path:?} cannot be read: {err}"));
                        None
                    }
                }
            }
            (None, None) => None,
        }
    }

    /// A secret that must be present, from `name` or `name_FILE`.
    pub fn secret_required(&mut self, name: &str) -> Option<Secret> {
        let had_problems = self.problems.len();
        let secret = self.secret_opt(name);
        if secret.is_none() && self.problems.len() == had_problems {
            self.problems
                .push(format!("{name} (or {name}_FILE) must be set"));
        }
        secret
    }

    /// Records a problem found by a service's own cross-field checks.
    pub fn problem(&mut self, message: impl Into<String>) {
        self.problems.push(message.into());
    }

    /// Ends reading: every problem so far, or nothing.
    pub fn finish(self) -> Result<(), ConfigError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                problems: self.problems,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reports_every_bad_variable_at_once() {
        let mut env = Env::from_pairs([("A_PORT", "eighty"), ("B_COUNT", "-1")]);
        let port: u16 = env.parse_or("A_PORT", 1);
        let count: u32 = env.parse_or("B_COUNT", 2);
        let _: Option<String> = env.parse_required("C_URL");
        assert_eq!((port, count), (1, 2));
        let err = env.finish().unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
        let text = err.to_string();
        assert!(text.contains("A_PORT=\"eighty\""), "{text}");
        assert!(text.contains("B_COUNT=\"-1\""), "{text}");
        assert!(text.contains("C_URL must be set"), "{text}");
    }

    #[test]
    fn empty_values_count_as_unset() {
        let mut env = Env::from_pairs([("PORT", "")]);
        assert_eq!(env.parse_or("PORT", 7u16), 7);
        env.finish().unwrap();
    }

    #[test]
    fn secret_comes_from_a_file_and_never_prints() {
        let mut file = tempfile_in_target();
        writeln!(file.1, "hunter2-hunter2").unwrap();
        let path = file.0.clone();
        let mut env = Env::from_pairs([("API_KEY_FILE", path.as_str())]);
        let secret = env.secret_required("API_KEY").unwrap();
        env.finish().unwrap();
        assert_eq!(secret.expose(), "hunter2-hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn secret_from_both_sources_or_neither_is_an_error() {
        let mut env = Env::from_pairs([("K", "a"), ("K_FILE", "/nonexistent")]);
        assert!(env.secret_opt("K").is_none());
        assert!(env.secret_required("MISSING").is_none());
        let err = env.finish().unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(!err.to_string().contains("\"a\""), "value leaked: {err}");
    }

    fn tempfile_in_target() -> (String, std::fs::File) {
        let path = std::env::temp_dir().join(format!(
            "shortener-secret-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::File::create(&path).unwrap();
        (path.to_string_lossy().into_owned(), file)
    }
}
