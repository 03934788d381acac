//! ClickHouse: the schema migrations, the click inserts and the reads behind
//! the analytics API. Works with ClickHouse 18.16 (Debian's) and current
//! releases: row validation (`RowBinaryWithNamesAndTypes`) is on when the
//! server has it, plain `RowBinary` otherwise.

use std::time::Duration;

use clickhouse::Row;
use serde::{Deserialize, Serialize};

/// The schema, in order. Never edit a migration that has shipped: add one.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[(
    1,
    "clicks",
    include_str!("../../migrations/clickhouse/0001_clicks.sql"),
)];

/// One row of `clicks`, in column order.
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct ClickRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: uuid::Uuid,
    pub code: String,
    /// `DateTime`: Unix seconds.
    pub ts: u32,
    pub ts_ms: u64,
    /// `Date`: days since 1970-01-01.
    pub date: u16,
    pub visitor_hash: u64,
    pub ip: String,
    pub user_agent: String,
    pub referrer: String,
    pub referrer_host: String,
    pub country: String,
    pub browser: String,
    pub os: String,
    pub device: String,
    pub is_bot: u8,
    pub language: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// ClickHouse refused the rows themselves; retrying cannot help.
    #[error("ClickHouse refused the data: {0}")]
    Data(String),
    /// Anything else (unreachable, overloaded, timed out): retry.
    #[error("ClickHouse is unavailable: {0}")]
    Unavailable(String),
}

/// ClickHouse error codes that mean "these rows are bad" rather than "try
/// again later": parse and conversion failures, type mismatches, values out
/// of range, and `throwIf` in a materialized view.
const DATA_ERROR_CODES: &[u32] = &[
    6, 26, 27, 32, 33, 38, 41, 53, 69, 70, 72, 117, 131, 190, 321, 395,
];

impl From<clickhouse::error::Error> for StoreError {
    fn from(error: clickhouse::error::Error) -> Self {
        use clickhouse::error::Error as E;
        match &error {
            E::BadResponse(text) => match server_error_code(text) {
                Some(code) if DATA_ERROR_CODES.contains(&code) => Self::Data(text.clone()),
                _ => Self::Unavailable(text.clone()),
            },
            // Rows our side could not serialise are bad data too.
            E::Custom(_) | E::SequenceMustHaveLength | E::InvalidUtf8Encoding(_) => {
                Self::Data(error.to_string())
            }
            _ => Self::Unavailable(error.to_string()),
        }
    }
}

/// The `Code: NNN` of a ClickHouse error text.
fn server_error_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[derive(Clone)]
pub struct Store {
    client: clickhouse::Client,
    database: String,
}

#[derive(Row, Deserialize)]
struct Version {
    version: String,
}

#[derive(Row, Deserialize)]
struct Id {
    id: String,
}

#[derive(Row, Deserialize)]
struct Count {
    n: u64,
}

impl Store {
    /// A client for `database`; validation is decided by [`Store::detect`].
    pub fn new(url: &str, database: &str, user: &str, password: Option<&str>) -> Self {
        let mut client = clickhouse::Client::default()
            .with_url(url)
            .with_user(user)
            .with_database(database)
            .with_validation(false)
            .with_compression(clickhouse::Compression::Lz4);
        if let Some(password) = password {
            client = client.with_password(password);
        }
        Self {
            client,
            database: database.to_owned(),
        }
    }

    /// Asks the server its version and turns row validation on if it has
    /// `RowBinaryWithNamesAndTypes` with the metadata the crate needs
    /// (ClickHouse 23 and later). Returns the version.
    pub async fn detect(&mut self) -> Result<String, StoreError> {
        let version = self
            .client
            .clone()
            .with_database("system")
            .query("SELECT version() AS version")
            .fetch_one::<Version>()
            .await?
            .version;
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        self.client = self.client.clone().with_validation(major >= 23);
        Ok(version)
    }

    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// Creates the database if needed and applies every migration not yet
    /// recorded in `schema_migrations`. Returns the versions applied.
    pub async fn migrate(&self) -> Result<Vec<u32>, StoreError> {
        let system = self.client.clone().with_database("system");
        system
            .query(&format!("CREATE DATABASE IF NOT EXISTS {}", self.database))
            .execute()
            .await?;
        self.client
            .query(
                "CREATE TABLE IF NOT EXISTS schema_migrations \
                 (version UInt32, name String, applied_at DateTime) \
                 ENGINE = MergeTree ORDER BY version",
            )
            .execute()
            .await?;
        let mut applied = Vec::new();
        for (version, name, sql) in MIGRATIONS {
            let done = self
                .client
                .query("SELECT count() AS n FROM schema_migrations WHERE version = ?")
                .bind(*version)
                .fetch_one::<Count>()
                .await?
                .n;
            if done > 0 {
                continue;
            }
            for statement in statements(sql) {
                self.client.query(&statement).execute().await?;
            }
            self.client
                .query(
                    "INSERT INTO schema_migrations (version, name, applied_at) SELECT ?, ?, now()",
                )
                .bind(*version)
                .bind(*name)
                .execute()
                .await?;
            applied.push(*version);
        }
        Ok(applied)
    }

    /// Inserts `rows` in one `INSERT` named `query_id`, so that an attempt
    /// whose outcome is unknown can be waited for ([`Store::wait_for_query`]).
    pub async fn insert(&self, rows: &[ClickRow], query_id: &str) -> Result<(), StoreError> {
        let mut insert = self
            .client
            .insert::<ClickRow>("clicks")
            .await?
            .with_setting("query_id", query_id)
            .with_timeouts(Some(Duration::from_secs(10)), Some(Duration::from_secs(30)));
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        Ok(())
    }

    /// Which of `rows` are already in `clicks` (by event id): rows being
    /// re-processed after a crash or a failed insert may have landed.
    pub async fn existing(&self, rows: &[ClickRow]) -> Result<Vec<uuid::Uuid>, StoreError> {
        let mut found = Vec::new();
        // Bounded chunks keep each query under ClickHouse's max_query_size.
        for chunk in rows.chunks(2_000) {
            let min = chunk.iter().map(|r| r.ts).min().unwrap_or(0);
            let max = chunk.iter().map(|r| r.ts).max().unwrap_or(0);
            let codes: Vec<&str> = {
                let mut c: Vec<&str> = chunk.iter().map(|r| r.code.as_str()).collect();
                c.sort_unstable();
                c.dedup();
                c
            };
            // An `IN` set is a hash lookup per row, where `has(array, ...)`
            // would scan the array. UUIDs print as hex and hyphens only, so
            // they are inlined safely; codes come from the stream and are
            // bound (escaped).
            let ids: Vec<String> = chunk.iter().map(|r| format!("'{}'", r.event_id)).collect();
            let rows = self
                .client
                .query(&format!(
                    "SELECT toString(event_id) AS id FROM clicks \
                     WHERE ts >= toDateTime(?) AND ts <= toDateTime(?) \
                     AND has(?, code) AND event_id IN ({})",
                    ids.join(",")
                ))
                .bind(min)
                .bind(max)
                .bind(codes)
                .fetch_all::<Id>()
                .await?;
            for row in rows {
                if let Ok(id) = uuid::Uuid::parse_str(&row.id) {
                    found.push(id);
                }
            }
        }
        Ok(found)
    }

    /// The newest click's time (Unix ms), 0 when there is none.
    pub async fn newest_ms(&self) -> Result<u64, StoreError> {
        Ok(self
            .client
            .query("SELECT max(ts_ms) AS n FROM clicks")
            .fetch_one::<Count>()
            .await?
            .n)
    }

    /// Returns once no query whose id matches `pattern` (a `LIKE` pattern)
    /// runs any more: ClickHouse goes on with an insert whose client gave
    /// up, so before checking which rows landed, the insert must be over.
    pub async fn wait_for_query(&self, pattern: &str) -> Result<(), StoreError> {
        self.client
            .clone()
            .with_database("system")
            .query("KILL QUERY WHERE query_id LIKE ? SYNC")
            .bind(pattern)
            .execute()
            .await?;
        Ok(())
    }

    /// Is ClickHouse answering?
    pub async fn ping(&self) -> bool {
        let query = self
            .client
            .clone()
            .with_database("system")
            .query("SELECT toUInt64(1) AS n")
            .fetch_one::<Count>();
        matches!(
            tokio::time::timeout(Duration::from_secs(1), query).await,
            Ok(Ok(_))
        )
    }
}

/// The statements of a migration file: split at a semicolon that ends a
/// line, with `--` comment lines dropped.
pub fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let code = line.split("--").next().unwrap_or("").trim_end();
        if code.trim().is_empty() {
            continue;
        }
        current.push_str(code);
        current.push('\n');
        if code.ends_with(';') {
            let statement = current.trim().trim_end_matches(';').trim().to_owned();
            if !statement.is_empty() {
                out.push(statement);
            }
            current.clear();
        }
    }
    let rest = current.trim();
    if !rest.is_empty() {
        out.push(rest.to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_split_into_statements() {
        let statements = statements(MIGRATIONS[0].2);
        assert_eq!(statements.len(), 5);
        assert!(statements[0].starts_with("CREATE TABLE IF NOT EXISTS clicks"));
        assert!(statements.iter().all(|s| !s.contains("--")));
        assert!(statements.iter().all(|s| !s.ends_with(';')));
    }

    #[test]
    fn errors_are_sorted_into_data_and_unavailable() {
        let bad = clickhouse::error::Error::BadResponse(
            "Code: 395, e.displayText() = DB::Exception: Value passed to 'throwIf' function is non zero".into(),
        );
        assert!(matches!(StoreError::from(bad), StoreError::Data(_)));
        let busy = clickhouse::error::Error::BadResponse(
            "Code: 202, e.displayText() = DB::Exception: Too many simultaneous queries".into(),
        );
        assert!(matches!(StoreError::from(busy), StoreError::Unavailable(_)));
        assert!(matches!(
            StoreError::from(clickhouse::error::Error::TimedOut),
            StoreError::Unavailable(_)
        ));
        assert_eq!(server_error_code("Code: 53. DB::Exception"), Some(53));
        assert_eq!(server_error_code("no code"), None);
    }
}
