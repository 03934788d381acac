//! Turns a click event into a ClickHouse row: browser, OS, device class and
//! bot flag from the User-Agent (the `woothee` crate's maintained rules),
//! the referrer's host, the country from a MaxMind-format database, the
//! first Accept-Language tag, and a visitor hash in place of the address.

use std::collections::HashMap;
use std::hash::Hasher;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use shortener_common::ClickEvent;
use siphasher::sip::SipHasher13;
use siphasher::sip128::{Hasher128, SipHasher13 as SipHasher13x128};

use crate::store::ClickRow;

/// What the User-Agent says, worked out once per distinct User-Agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub browser: String,
    pub os: String,
    pub device: &'static str,
    pub is_bot: bool,
}

/// Classifies a User-Agent. An empty or unrecognised one is `other`, not a
/// bot: a bare `curl` is a person at a terminal as often as a script.
pub fn classify_agent(user_agent: &str) -> Agent {
    let unknown = |s: &str| {
        if s == woothee::woothee::VALUE_UNKNOWN {
            String::new()
        } else {
            s.to_owned()
        }
    };
    match woothee::parser::Parser::new().parse(user_agent) {
        Some(r) => {
            let is_bot = r.category == "crawler";
            let device = match r.category {
                "pc" => "desktop",
                "smartphone" | "mobilephone" => "mobile",
                "appliance" => "appliance",
                "crawler" => "bot",
                _ => "other",
            };
            Agent {
                browser: unknown(r.name),
                os: unknown(r.os),
                device,
                is_bot,
            }
        }
        None => Agent {
            browser: String::new(),
            os: String::new(),
            device: "other",
            is_bot: false,
        },
    }
}

/// The host of a Referer, lower case; empty when there is none or it is not
/// a URL with a host.
pub fn referrer_host(referer: Option<&str>) -> String {
    referer
        .and_then(|r| url::Url::parse(r).ok())
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
        .unwrap_or_default()
}

/// The first language tag of an Accept-Language header, lower case
/// (`en-GB,en;q=0.9` gives `en-gb`); empty for none or `*`.
pub fn first_language(accept_language: Option<&str>) -> String {
    let Some(header) = accept_language else {
        return String::new();
    };
    let tag = header
        .split(',')
        .next()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    let valid = !tag.is_empty()
        && tag != "*"
        && tag.len() <= 35
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if valid {
        tag.to_ascii_lowercase()
    } else {
        String::new()
    }
}

/// A country database. Reads both record shapes: MaxMind's GeoIP2 and
/// GeoLite2 (`country.iso_code`) and ip-location-db's (`country_code`).
pub struct Geo {
    reader: maxminddb::Reader<Vec<u8>>,
}

#[derive(Deserialize)]
struct GeoRecord<'a> {
    #[serde(borrow, default)]
    country: Option<IsoCode<'a>>,
    #[serde(borrow, default)]
    registered_country: Option<IsoCode<'a>>,
    #[serde(borrow, default)]
    country_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct IsoCode<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

impl Geo {
    pub fn open(path: &Path) -> Result<Self, maxminddb::MaxMindDbError> {
        Ok(Self {
            reader: maxminddb::Reader::open_readfile(path)?,
        })
    }

    /// The visitor's country as ISO 3166-1 alpha-2, or empty.
    pub fn country(&self, ip: IpAddr) -> String {
        let Ok(result) = self.reader.lookup(ip) else {
            return String::new();
        };
        let Ok(Some(record)) = result.decode::<GeoRecord<'_>>() else {
            return String::new();
        };
        record
            .country_code
            .or_else(|| record.country.and_then(|c| c.iso_code))
            .or_else(|| record.registered_country.and_then(|c| c.iso_code))
            .filter(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()))
            .map(str::to_ascii_uppercase)
            .unwrap_or_default()
    }
}

/// Keyed, day-salted visitor hashes: the same address and User-Agent give
/// the same hash within one UTC day and unrelated hashes on other days, so
/// unique visitors can be counted per day without keeping addresses, and
/// nobody can follow a visitor across days.
pub struct VisitorHasher {
    k0: u64,
    k1: u64,
}

impl VisitorHasher {
    pub fn new(secret: &[u8]) -> Self {
        // Derive a 128-bit key from a secret of any length.
        let mut h = SipHasher13x128::new_with_keys(0x7368_6f72_7465_6e65, 0x7669_7369_746f_7273);
        h.write(secret);
        let key = h.finish128();
        Self {
            k0: key.h1,
            k1: key.h2,
        }
    }

    /// The hash of a visitor on `day` (days since 1970-01-01, UTC).
    pub fn hash(&self, day: u16, ip: IpAddr, user_agent: &str) -> u64 {
        let mut salt = SipHasher13x128::new_with_keys(self.k0, self.k1);
        salt.write_u16(day);
        let day_key = salt.finish128();
        let mut h = SipHasher13::new_with_keys(day_key.h1, day_key.h2);
        match ip {
            IpAddr::V4(v4) => h.write(&v4.octets()),
            IpAddr::V6(v6) => h.write(&v6.octets()),
        }
        h.write_u8(0xff);
        h.write(user_agent.as_bytes());
        h.finish()
    }
}

/// Enrichment shared by a sink's reader: the country database, the visitor
/// key, and a cache of User-Agent classifications (traffic repeats a small
/// set of User-Agents, and classifying one costs microseconds).
pub struct Enricher {
    geo: Option<Arc<Geo>>,
    visitors: VisitorHasher,
    store_raw_ip: bool,
    agents: HashMap<String, Agent>,
}

/// Distinct User-Agents remembered before the cache starts over.
const AGENT_CACHE: usize = 50_000;

impl Enricher {
    pub fn new(geo: Option<Arc<Geo>>, visitor_secret: &[u8], store_raw_ip: bool) -> Self {
        Self {
            geo,
            visitors: VisitorHasher::new(visitor_secret),
            store_raw_ip,
            agents: HashMap::new(),
        }
    }

    pub fn row(&mut self, event: &ClickEvent) -> ClickRow {
        let ua = event.user_agent.clone().unwrap_or_default();
        let agent = match self.agents.get(&ua) {
            Some(agent) => agent.clone(),
            None => {
                let agent = classify_agent(&ua);
                if self.agents.len() >= AGENT_CACHE {
                    self.agents.clear();
                }
                self.agents.insert(ua.clone(), agent.clone());
                agent
            }
        };
        let ts_ms = event.ts_ms.max(0) as u64;
        let secs = ts_ms / 1000;
        let day = (secs / 86_400).min(u64::from(u16::MAX)) as u16;
        ClickRow {
            event_id: uuid::Uuid::from_u128(event.event_id),
            code: event.code.clone(),
            ts: secs.min(u64::from(u32::MAX)) as u32,
            ts_ms,
            date: day,
            visitor_hash: self.visitors.hash(day, event.ip, &ua),
            ip: if self.store_raw_ip {
                event.ip.to_string()
            } else {
                String::new()
            },
            referrer_host: referrer_host(event.referer.as_deref()),
            referrer: event.referer.clone().unwrap_or_default(),
            country: self
                .geo
                .as_ref()
                .map(|g| g.country(event.ip))
                .unwrap_or_default(),
            browser: agent.browser,
            os: agent.os,
            device: agent.device.to_owned(),
            is_bot: u8::from(agent.is_bot),
            language: first_language(event.accept_language.as_deref()),
            user_agent: ua,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHROME_WINDOWS: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";
    const SAFARI_IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1";
    const GOOGLEBOT: &str =
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";

    #[test]
    fn user_agents_are_classified() {
        let chrome = classify_agent(CHROME_WINDOWS);
        assert_eq!(chrome.browser, "Chrome");
        assert_eq!(chrome.device, "desktop");
        assert!(chrome.os.starts_with("Windows"), "{}", chrome.os);
        assert!(!chrome.is_bot);

        let safari = classify_agent(SAFARI_IPHONE);
        assert_eq!(safari.browser, "Safari");
        assert_eq!(safari.os, "iPhone");
        assert_eq!(safari.device, "mobile");

        let bot = classify_agent(GOOGLEBOT);
        assert!(bot.is_bot);
        assert_eq!(bot.device, "bot");

        let nothing = classify_agent("");
        assert!(!nothing.is_bot);
        assert_eq!(nothing.device, "other");
    }

    #[test]
    fn referrers_and_languages_are_reduced() {
        assert_eq!(
            referrer_host(Some("https://News.Example.com/a?b=c")),
            "news.example.com"
        );
        assert_eq!(referrer_host(Some("not a url")), "");
        assert_eq!(referrer_host(None), "");
        assert_eq!(first_language(Some("en-GB,en;q=0.9")), "en-gb");
        assert_eq!(first_language(Some("fr;q=0.8")), "fr");
        assert_eq!(first_language(Some("*")), "");
        assert_eq!(first_language(Some("<script>")), "");
        assert_eq!(first_language(None), "");
    }

    #[test]
    fn visitor_hashes_are_per_day_and_keyed() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let a = VisitorHasher::new(b"0123456789abcdef");
        let b = VisitorHasher::new(b"another secret!!");
        assert_eq!(a.hash(20_000, ip, "ua"), a.hash(20_000, ip, "ua"));
        assert_ne!(a.hash(20_000, ip, "ua"), a.hash(20_001, ip, "ua"));
        assert_ne!(a.hash(20_000, ip, "ua"), a.hash(20_000, ip, "ub"));
        assert_ne!(a.hash(20_000, ip, "ua"), b.hash(20_000, ip, "ua"));
    }

    #[test]
    fn a_row_keeps_no_address_unless_asked() {
        let event = ClickEvent {
            event_id: 9,
            code: "abc".into(),
            ts_ms: 86_400_000 * 20_000 + 1_500,
            ip: "192.0.2.7".parse().unwrap(),
            user_agent: Some(CHROME_WINDOWS.into()),
            referer: Some("https://t.co/x".into()),
            accept_language: Some("de-DE".into()),
        };
        let row = Enricher::new(None, b"0123456789abcdef", false).row(&event);
        assert_eq!(row.ip, "");
        assert_eq!(row.date, 20_000);
        assert_eq!(row.ts, 86_400 * 20_000 + 1);
        assert_eq!(row.ts_ms, 86_400_000 * 20_000 + 1_500);
        assert_eq!(row.referrer_host, "t.co");
        assert_eq!(row.language, "de-de");
        assert_eq!(row.country, "");
        let raw = Enricher::new(None, b"0123456789abcdef", true).row(&event);
        assert_eq!(raw.ip, "192.0.2.7");
        assert_eq!(raw.visitor_hash, row.visitor_hash);
    }
}
