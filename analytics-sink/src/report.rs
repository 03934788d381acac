//! One link's analytics, as `GET /analytics/{code}` returns them.
//!
//! Whole-day ranges (no bounds, dates, or midnight timestamps) are read from
//! the rollups (`clicks_daily`, `clicks_by_dimension`), which stay small;
//! ranges that cut a day are read from `clicks` itself, so the answer is
//! exact either way. Bots are left out of `clicks`, `unique_visitors`,
//! `last_accessed`, `by_day` and every breakdown, and counted in `bots`.
//! Unique visitors are counted per UTC day (the visitor hash is salted per
//! day) and summed over the range's days.

use chrono::{DateTime, NaiveDate, NaiveTime, SecondsFormat, Utc};
use clickhouse::Row;
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

const MS_PER_DAY: u64 = 86_400_000;
/// 2105-12-31, the exclusive end of an unbounded range: ClickHouse 18.16
/// parses no later date (`toDate` gives zero).
const LAST_DAY: u64 = 49_672;
/// The rollups' and breakdowns' top-N.
const TOP: usize = 10;

/// `[from, to)` in Unix milliseconds; `None` is unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Range {
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
}

impl Range {
    /// Parses the `from` and `to` query parameters: a date (`2026-11-30`,
    /// the whole day, UTC) or an RFC 3339 timestamp. `from` is inclusive;
    /// `to` is the end of the given day, or the given instant (exclusive).
    pub fn parse(from: Option<&str>, to: Option<&str>) -> Result<Self, String> {
        let from_ms = from.map(|f| parse_bound(f, "from", false)).transpose()?;
        let to_ms = to.map(|t| parse_bound(t, "to", true)).transpose()?;
        if let (Some(f), Some(t)) = (from_ms, to_ms)
            && f >= t
        {
            return Err("from must be before to".into());
        }
        Ok(Self { from_ms, to_ms })
    }

    fn whole_days(&self) -> bool {
        self.from_ms.is_none_or(|f| f % MS_PER_DAY == 0)
            && self.to_ms.is_none_or(|t| t % MS_PER_DAY == 0)
    }

    fn first_day(&self) -> u64 {
        self.from_ms.map_or(0, |f| f / MS_PER_DAY)
    }

    /// The day after the last one, exclusive.
    fn end_day(&self) -> u64 {
        self.to_ms.map_or(LAST_DAY, |t| t.div_ceil(MS_PER_DAY))
    }
}

fn parse_bound(text: &str, name: &str, end: bool) -> Result<u64, String> {
    let ms = if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let date = if end {
            date.succ_opt()
                .ok_or_else(|| format!("{name} is out of range"))?
        } else {
            date
        };
        date.and_time(NaiveTime::MIN).and_utc().timestamp_millis()
    } else if let Ok(instant) = DateTime::parse_from_rfc3339(text) {
        instant.timestamp_millis()
    } else {
        return Err(format!(
            "{name} must be a date (2026-11-30) or an RFC 3339 timestamp (2026-11-30T12:00:00Z), got {text:?}"
        ));
    };
    if !(0..=4_102_444_800_000).contains(&ms) {
        return Err(format!("{name} must be between 1970 and 2100"));
    }
    Ok(ms as u64)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub code: String,
    pub clicks: u64,
    pub unique_visitors: u64,
    /// RFC 3339, UTC; `null` before the first click.
    pub last_accessed: Option<String>,
    pub by_day: Vec<DayCount>,
    pub referrers: Vec<ValueCount>,
    pub countries: Vec<ValueCount>,
    pub browsers: Vec<ValueCount>,
    pub operating_systems: Vec<ValueCount>,
    pub devices: Vec<ValueCount>,
    pub bots: u64,
    /// The range applied, RFC 3339; `null` when unbounded.
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayCount {
    pub date: String,
    pub clicks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueCount {
    pub value: String,
    pub clicks: u64,
}

#[derive(Row, Deserialize)]
struct Totals {
    is_bot: u8,
    clicks: u64,
    last_ts: u32,
}

#[derive(Row, Deserialize)]
struct Daily {
    date: u16,
    clicks: u64,
    visitors: u64,
}

#[derive(Row, Deserialize)]
struct Breakdown {
    dimension: String,
    value: String,
    clicks: u64,
}

const DIMENSIONS_ARRAY: &str = "[('referrer', referrer_host), ('country', country), \
     ('browser', browser), ('os', os), ('device', device)]";

fn rfc3339_ms(ms: u64) -> Option<String> {
    DateTime::<Utc>::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

fn day_string(day: u64) -> String {
    DateTime::<Utc>::from_timestamp((day * 86_400) as i64, 0)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

/// Builds the report for `code` over `range`.
pub async fn report(store: &Store, code: &str, range: Range) -> Result<Report, StoreError> {
    let client = store.client();
    let first = day_string(range.first_day());
    let end = day_string(range.end_day().min(LAST_DAY));
    let (totals, daily, breakdowns) = if range.whole_days() {
        let days = "code = ? AND date >= toDate(?) AND date < toDate(?)";
        let totals = client
            .query(&format!(
                "SELECT is_bot, countMerge(clicks) AS clicks, maxMerge(last_ts) AS last_ts \
                 FROM clicks_daily WHERE {days} GROUP BY is_bot"
            ))
            .bind(code)
            .bind(&first)
            .bind(&end)
            .fetch_all::<Totals>();
        let daily = client
            .query(&format!(
                "SELECT date, countMerge(clicks) AS clicks, uniqExactMerge(visitors) AS visitors \
                 FROM clicks_daily WHERE {days} AND is_bot = 0 GROUP BY date ORDER BY date"
            ))
            .bind(code)
            .bind(&first)
            .bind(&end)
            .fetch_all::<Daily>();
        let breakdowns = client
            .query(&format!(
                "SELECT dimension, value, sum(clicks) AS clicks FROM clicks_by_dimension \
                 WHERE {days} GROUP BY dimension, value \
                 ORDER BY dimension, clicks DESC, value LIMIT {TOP} BY dimension"
            ))
            .bind(code)
            .bind(&first)
            .bind(&end)
            .fetch_all::<Breakdown>();
        tokio::try_join!(totals, daily, breakdowns)?
    } else {
        let from_ms = range.from_ms.unwrap_or(0);
        let to_ms = range.to_ms.unwrap_or(u64::MAX);
        // The date and ts bounds let ClickHouse skip partitions and granules;
        // ts_ms makes the cut exact.
        let within = "code = ? AND date >= toDate(?) AND date < toDate(?) \
                      AND ts_ms >= ? AND ts_ms < ?";
        let totals = client
            .query(&format!(
                "SELECT is_bot, count() AS clicks, max(ts) AS last_ts \
                 FROM clicks WHERE {within} GROUP BY is_bot"
            ))
            .bind(code)
            .bind(&first)
            .bind(&end)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all::<Totals>();
        let daily = client
            .query(&format!(
                "SELECT date, count() AS clicks, uniqExact(visitor_hash) AS visitors \
                 FROM clicks WHERE {within} AND is_bot = 0 GROUP BY date ORDER BY date"
            ))
            .bind(code)
            .bind(&first)
            .bind(&end)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all::<Daily>();
        let breakdowns = client
            .query(&format!(
                "SELECT dim.1 AS dimension, dim.2 AS value, count() AS clicks \
                 FROM clicks ARRAY JOIN {DIMENSIONS_ARRAY} AS dim \
                 WHERE {within} AND is_bot = 0 GROUP BY dimension, value \
                 ORDER BY dimension, clicks DESC, value LIMIT {TOP} BY dimension"
            ))
            .bind(code)
            .bind(&first)
            .bind(&end)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all::<Breakdown>();
        tokio::try_join!(totals, daily, breakdowns)?
    };

    let mut report = Report {
        code: code.to_owned(),
        clicks: 0,
        unique_visitors: daily.iter().map(|d| d.visitors).sum(),
        last_accessed: None,
        by_day: Vec::new(),
        referrers: Vec::new(),
        countries: Vec::new(),
        browsers: Vec::new(),
        operating_systems: Vec::new(),
        devices: Vec::new(),
        bots: 0,
        from: range.from_ms.and_then(rfc3339_ms),
        to: range.to_ms.and_then(rfc3339_ms),
    };
    for t in totals {
        if t.is_bot == 0 {
            report.clicks += t.clicks;
            if t.clicks > 0 {
                report.last_accessed = rfc3339_ms(u64::from(t.last_ts) * 1000);
            }
        } else {
            report.bots += t.clicks;
        }
    }
    report.by_day = fill_days(&daily);
    for b in breakdowns {
        let list = match b.dimension.as_str() {
            "referrer" => &mut report.referrers,
            "country" => &mut report.countries,
            "browser" => &mut report.browsers,
            "os" => &mut report.operating_systems,
            "device" => &mut report.devices,
            _ => continue,
        };
        list.push(ValueCount {
            value: b.value,
            clicks: b.clicks,
        });
    }
    Ok(report)
}

/// Every day from the first to the last day with clicks, days without
/// clicks as zero, so a chart needs no gap handling.
fn fill_days(daily: &[Daily]) -> Vec<DayCount> {
    let (Some(first), Some(last)) = (daily.first(), daily.last()) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(usize::from(last.date - first.date) + 1);
    let mut next = daily.iter().peekable();
    for day in first.date..=last.date {
        let clicks = match next.peek() {
            Some(d) if d.date == day => next.next().map_or(0, |d| d.clicks),
            _ => 0,
        };
        out.push(DayCount {
            date: day_string(u64::from(day)),
            clicks,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_dates_and_timestamps() {
        let r = Range::parse(Some("2026-11-01"), Some("2026-11-30")).unwrap();
        assert_eq!(r.from_ms, Some(1_793_491_200_000));
        // `to` as a date includes that whole day.
        assert_eq!(r.to_ms, Some(1_796_083_200_000));
        assert!(r.whole_days());
        let t = Range::parse(Some("2026-11-30T12:00:00Z"), None).unwrap();
        assert_eq!(t.from_ms, Some(1_796_040_000_000));
        assert!(!t.whole_days());
        let offset = Range::parse(Some("2026-11-30T13:00:00+01:00"), None).unwrap();
        assert_eq!(offset, t);
        assert_eq!(Range::parse(None, None).unwrap(), Range::default());
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert!(Range::parse(Some("yesterday"), None).is_err());
        assert!(Range::parse(Some("2026-13-01"), None).is_err());
        assert!(Range::parse(Some("2026-11-30"), Some("2026-11-01")).is_err());
        assert!(Range::parse(Some("1900-01-01"), None).is_err());
        let e = Range::parse(None, Some("soon")).unwrap_err();
        assert!(e.contains("to must be"), "{e}");
    }

    #[test]
    fn days_without_clicks_are_filled_with_zero() {
        let days = fill_days(&[
            Daily {
                date: 20_000,
                clicks: 3,
                visitors: 1,
            },
            Daily {
                date: 20_002,
                clicks: 1,
                visitors: 1,
            },
        ]);
        let counts: Vec<u64> = days.iter().map(|d| d.clicks).collect();
        assert_eq!(counts, [3, 0, 1]);
        assert_eq!(days[0].date, "2024-10-04");
        assert!(fill_days(&[]).is_empty());
    }
}
