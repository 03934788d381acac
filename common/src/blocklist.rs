//! The optional domain blocklist, shared by the control plane (checked when a
//! link is created or changed) and the edge (checked when a mapping enters
//! its cache, and again over the whole cache whenever the list changes).
//!
//! The file holds one domain per line; blank lines and `#` comments are
//! ignored. A domain blocks itself and every subdomain: `evil.example`
//! blocks `evil.example` and `a.evil.example`, not `notevil.example`. An IP
//! address blocks that exact host. Names are compared in lower case and in
//! ASCII (punycode) form, which is how the control plane stores targets.
//!
//! The file is re-read when its modification time or length changes, checked
//! by a watcher thread every `interval`, so operators edit it (or a
//! Kubernetes ConfigMap updates it) without restarting anything. A reload
//! that fails (the file is being replaced, say), or a file that changes
//! while being read, keeps the previous list. Replace the file atomically
//! (write another, then rename it over) so no reader ever sees half of it.
//! Entries are matched as written: list international names in their
//! punycode (`xn--`) form, as targets are stored.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// A parsed list of blocked domains.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Blocklist {
    domains: HashSet<String>,
}

impl Blocklist {
    pub fn parse(text: &str) -> Self {
        let domains = text
            .lines()
            .map(|line| line.split('#').next().unwrap_or_default().trim())
            .filter(|line| !line.is_empty())
            .map(|domain| domain.trim_end_matches('.').to_ascii_lowercase())
            .filter(|domain| !domain.is_empty())
            .collect();
        Self { domains }
    }

    pub fn len(&self) -> usize {
        self.domains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// Whether `host`, or a domain it belongs to, is on the list.
    pub fn blocks_host(&self, host: &str) -> bool {
        if self.domains.is_empty() {
            return false;
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let mut rest = host.as_str();
        loop {
            if self.domains.contains(rest) {
                return true;
            }
            match rest.split_once('.') {
                Some((_, parent)) if !parent.is_empty() => rest = parent,
                _ => return false,
            }
        }
    }

    /// Whether the host of this absolute URL is on the list. A URL without a
    /// recognisable host is not blocked (the control plane refuses those
    /// before they are ever stored).
    pub fn blocks_url(&self, url: &str) -> bool {
        host_of(url).is_some_and(|host| self.blocks_host(host))
    }
}

/// The host of an absolute `scheme://host[:port]/...` URL as the control
/// plane stores it: no user info, IPv6 in brackets.
pub fn host_of(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit('@').next().unwrap_or_default();
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    (!host.is_empty()).then_some(host)
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read the blocklist {path}: {source}")]
pub struct BlocklistError {
    path: PathBuf,
    source: std::io::Error,
}

/// The list as the file says now, with what the file looked like when read.
struct Loaded {
    list: Arc<Blocklist>,
    stamp: Option<(SystemTime, u64)>,
}

/// A blocklist file and its current contents; cheap to share.
pub struct BlocklistFile {
    path: PathBuf,
    loaded: RwLock<Loaded>,
}

fn stamp(path: &Path) -> std::io::Result<(SystemTime, u64)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.modified()?, meta.len()))
}

impl BlocklistFile {
    /// Reads the file now; an unreadable file is an error (a configuration
    /// mistake to report at start-up, not to run without).
    pub fn open(path: impl Into<PathBuf>) -> Result<Arc<Self>, BlocklistError> {
        let path = path.into();
        let read = || -> std::io::Result<Loaded> {
            let stamp = stamp(&path)?;
            let text = std::fs::read_to_string(&path)?;
            Ok(Loaded {
                list: Arc::new(Blocklist::parse(&text)),
                stamp: Some(stamp),
            })
        };
        let loaded = read().map_err(|source| BlocklistError {
            path: path.clone(),
            source,
        })?;
        Ok(Arc::new(Self {
            path,
            loaded: RwLock::new(loaded),
        }))
    }

    /// The list as last read.
    pub fn current(&self) -> Arc<Blocklist> {
        self.loaded.read().expect("blocklist lock").list.clone()
    }

    /// Re-reads the file if it changed; returns whether the list did.
    pub fn refresh(&self) -> bool {
        let Ok(now) = stamp(&self.path) else {
            tracing::warn!(path = %self.path.display(), "the blocklist is unreadable; keeping the previous list");
            return false;
        };
        if self.loaded.read().expect("blocklist lock").stamp == Some(now) {
            return false;
        }
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "the blocklist is unreadable; keeping the previous list");
                return false;
            }
        };
        if stamp(&self.path).ok() != Some(now) {
            // Changed while being read (edited in place): next time.
            return false;
        }
        let list = Blocklist::parse(&text);
        let mut loaded = self.loaded.write().expect("blocklist lock");
        loaded.stamp = Some(now);
        if *loaded.list == list {
            return false;
        }
        tracing::info!(path = %self.path.display(), domains = list.len(), "blocklist reloaded");
        loaded.list = Arc::new(list);
        true
    }

    /// The file at `path` when one is configured, read now and then watched
    /// every `interval` (see [`Self::watch`]).
    pub fn open_watched(
        path: Option<&Path>,
        interval: Duration,
        on_change: impl Fn(&Blocklist) + Send + 'static,
    ) -> Result<Option<Arc<Self>>, BlocklistError> {
        let Some(path) = path else {
            return Ok(None);
        };
        let file = Self::open(path)?;
        file.watch(interval, on_change);
        Ok(Some(file))
    }

    /// Checks the file every `interval` on a thread of its own and calls
    /// `on_change` with the new list after each change. The thread ends when
    /// the last other reference to this file goes.
    pub fn watch(
        self: &Arc<Self>,
        interval: Duration,
        on_change: impl Fn(&Blocklist) + Send + 'static,
    ) {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("blocklist-watch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(interval);
                    let Some(file) = weak.upgrade() else { return };
                    if file.refresh() {
                        on_change(&file.current());
                    }
                }
            })
            .expect("spawn the blocklist watcher");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_blocks_itself_and_its_subdomains_only() {
        let list = Blocklist::parse(
            "# phishing\nEvil.Example\n\n  bad.test.  # trailing dot and comment\n192.0.2.7\n",
        );
        assert_eq!(list.len(), 3);
        for blocked in [
            "evil.example",
            "EVIL.example",
            "a.b.evil.example",
            "bad.test",
            "x.bad.test.",
            "192.0.2.7",
        ] {
            assert!(list.blocks_host(blocked), "{blocked} passed");
        }
        for allowed in [
            "notevil.example",
            "evil.example.com",
            "example",
            "test",
            "192.0.2.70",
            "",
        ] {
            assert!(!list.blocks_host(allowed), "{allowed} blocked");
        }
        assert!(!Blocklist::default().blocks_host("evil.example"));
    }

    #[test]
    fn hosts_come_out_of_stored_urls() {
        for (url, host) in [
            ("https://a.example/x?y#z", Some("a.example")),
            ("http://a.example:8080", Some("a.example")),
            ("https://a.example?q", Some("a.example")),
            ("http://[2001:db8::1]:80/x", Some("2001:db8::1")),
            ("http://u:p@a.example/", Some("a.example")),
            ("https:///x", None),
            ("not a url", None),
        ] {
            assert_eq!(host_of(url), host, "{url}");
        }
        let list = Blocklist::parse("evil.example");
        assert!(list.blocks_url("https://www.evil.example/login"));
        assert!(!list.blocks_url("https://evil.example.org/"));
    }

    #[test]
    fn the_file_is_reread_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocklist.txt");
        assert!(BlocklistFile::open(&path).is_err());
        std::fs::write(&path, "one.example\n").unwrap();
        let file = BlocklistFile::open(&path).unwrap();
        assert!(file.current().blocks_host("one.example"));
        assert!(!file.refresh());

        std::fs::write(&path, "one.example\ntwo.example\n").unwrap();
        assert!(file.refresh());
        assert!(file.current().blocks_host("two.example"));

        // Gone (being replaced): the last list stays.
        std::fs::remove_file(&path).unwrap();
        assert!(!file.refresh());
        assert!(file.current().blocks_host("two.example"));
    }

    #[test]
    fn the_watcher_reports_each_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocklist.txt");
        std::fs::write(&path, "").unwrap();
        let file = BlocklistFile::open(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        file.watch(Duration::from_millis(10), move |list| {
            let _ = tx.send(list.blocks_host("new.example"));
        });
        std::fs::write(&path, "new.example\n").unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
    }
}
