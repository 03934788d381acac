//! PostgreSQL: the pool, migrations, and every query the API and the relay
//! make. Functions here are blocking; callers run them on the blocking pool.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::schema::{api_keys, idempotency_keys, link_outbox, links};

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/postgres");

pub type PgPool = Pool<ConnectionManager<PgConnection>>;
pub type Conn = PooledConnection<ConnectionManager<PgConnection>>;

/// A pool that gives up on a connection after `checkout_timeout`, so a
/// request fails fast with 503 when PostgreSQL is down. Connections are
/// created on demand: the service starts even while PostgreSQL is away.
pub fn pool(url: &str, size: u32, checkout_timeout: Duration) -> PgPool {
    Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(checkout_timeout)
        // No round trip per checkout: diesel marks a connection broken when
        // a query finds it dead, and the pool then replaces it.
        .test_on_check_out(false)
        .build_unchecked(ConnectionManager::new(url))
}

/// Applies pending migrations, one instance at a time.
pub fn migrate(conn: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    // Any constant works; it only has to be the same in every instance.
    diesel::sql_query("SELECT pg_advisory_lock(7423901)").execute(conn)?;
    let applied = conn
        .run_pending_migrations(MIGRATIONS)
        .map(|versions| versions.iter().map(ToString::to_string).collect())
        .map_err(|e| anyhow::anyhow!("migration failed: {e}"));
    diesel::sql_query("SELECT pg_advisory_unlock(7423901)").execute(conn)?;
    applied
}

#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = links)]
pub struct Link {
    pub id: i64,
    pub code: String,
    pub url: String,
    pub redirect_status: i16,
    pub expires_at: Option<DateTime<Utc>>,
    pub disabled: bool,
    pub is_alias: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub struct NewLink<'a> {
    pub code: &'a str,
    pub url: &'a str,
    pub redirect_status: i16,
    pub expires_at: Option<DateTime<Utc>>,
    pub is_alias: bool,
    pub created_by: Option<i64>,
}

/// The change a PATCH asks for; `None` leaves a field alone.
#[derive(Debug, Default, AsChangeset)]
#[diesel(table_name = links)]
pub struct LinkChanges {
    pub url: Option<String>,
    pub redirect_status: Option<i16>,
    /// `Some(None)` clears the expiry.
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub disabled: Option<bool>,
}

impl LinkChanges {
    pub fn is_empty(&self) -> bool {
        self.url.is_none()
            && self.redirect_status.is_none()
            && self.expires_at.is_none()
            && self.disabled.is_none()
    }
}

fn record_change(conn: &mut PgConnection, code: &str) -> QueryResult<()> {
    diesel::insert_into(link_outbox::table)
        .values(link_outbox::code.eq(code))
        .execute(conn)
        .map(drop)
}

/// Inserts a link and its outbox row in one statement, so the two are
/// atomic even outside a transaction and cost one round trip.
pub fn insert_link(conn: &mut PgConnection, new: &NewLink<'_>) -> QueryResult<Link> {
    use diesel::sql_types::{BigInt, Bool, Nullable, SmallInt, Text, Timestamptz};
    diesel::sql_query(
        "WITH link AS ( \
           INSERT INTO links (code, url, redirect_status, expires_at, is_alias, created_by) \
           VALUES ($1, $2, $3, $4, $5, $6) \
           RETURNING id, code, url, redirect_status, expires_at, disabled, is_alias, created_at, updated_at \
         ), change AS (INSERT INTO link_outbox (code) SELECT code FROM link) \
         SELECT * FROM link",
    )
    .bind::<Text, _>(new.code)
    .bind::<Text, _>(new.url)
    .bind::<SmallInt, _>(new.redirect_status)
    .bind::<Nullable<Timestamptz>, _>(new.expires_at)
    .bind::<Bool, _>(new.is_alias)
    .bind::<Nullable<BigInt>, _>(new.created_by)
    .get_result(conn)
}

pub fn find_link(conn: &mut PgConnection, code: &str) -> QueryResult<Option<Link>> {
    links::table
        .filter(links::code.eq(code))
        .select(Link::as_select())
        .first(conn)
        .optional()
}

/// Applies `changes` and records the change; `None` when no such link.
pub fn update_link(
    conn: &mut PgConnection,
    code: &str,
    changes: &LinkChanges,
) -> QueryResult<Option<Link>> {
    conn.transaction(|conn| {
        if changes.is_empty() {
            return find_link(conn, code);
        }
        let link = diesel::update(links::table.filter(links::code.eq(code)))
            .set((changes, links::updated_at.eq(diesel::dsl::now)))
            .returning(Link::as_returning())
            .get_result(conn)
            .optional()?;
        if link.is_some() {
            record_change(conn, code)?;
        }
        Ok(link)
    })
}

/// Deletes a link and records the change; false when no such link.
pub fn delete_link(conn: &mut PgConnection, code: &str) -> QueryResult<bool> {
    conn.transaction(|conn| {
        let deleted = diesel::delete(links::table.filter(links::code.eq(code))).execute(conn)?;
        if deleted > 0 {
            record_change(conn, code)?;
        }
        Ok(deleted > 0)
    })
}

/// Newest first, strictly older than `before` (a link id) when given.
pub fn list_links(
    conn: &mut PgConnection,
    before: Option<i64>,
    limit: i64,
) -> QueryResult<Vec<Link>> {
    let mut query = links::table
        .select(Link::as_select())
        .order(links::id.desc())
        .limit(limit)
        .into_boxed();
    if let Some(id) = before {
        query = query.filter(links::id.lt(id));
    }
    query.load(conn)
}

/// The id of the live API key with this hash.
pub fn api_key_id(conn: &mut PgConnection, hash: &[u8]) -> QueryResult<Option<i64>> {
    api_keys::table
        .filter(api_keys::key_hash.eq(hash))
        .filter(api_keys::revoked_at.is_null())
        .select(api_keys::id)
        .first(conn)
        .optional()
}

/// Stores a key hash (idempotent: an existing hash keeps its row).
pub fn insert_api_key(conn: &mut PgConnection, name: &str, hash: &[u8]) -> QueryResult<i64> {
    diesel::insert_into(api_keys::table)
        .values((api_keys::name.eq(name), api_keys::key_hash.eq(hash)))
        .on_conflict(api_keys::key_hash)
        .do_nothing()
        .execute(conn)?;
    api_keys::table
        .filter(api_keys::key_hash.eq(hash))
        .select(api_keys::id)
        .first(conn)
}

/// A stored idempotent response: the request's hash and the body returned.
pub fn find_idempotent(
    conn: &mut PgConnection,
    api_key: i64,
    key: &str,
) -> QueryResult<Option<(Vec<u8>, String)>> {
    idempotency_keys::table
        .filter(idempotency_keys::api_key_id.eq(api_key))
        .filter(idempotency_keys::idem_key.eq(key))
        .select((
            idempotency_keys::request_hash,
            idempotency_keys::response_body,
        ))
        .first(conn)
        .optional()
}

pub fn store_idempotent(
    conn: &mut PgConnection,
    api_key: i64,
    key: &str,
    hash: &[u8],
    body: &str,
) -> QueryResult<()> {
    diesel::insert_into(idempotency_keys::table)
        .values((
            idempotency_keys::api_key_id.eq(api_key),
            idempotency_keys::idem_key.eq(key),
            idempotency_keys::request_hash.eq(hash),
            idempotency_keys::response_body.eq(body),
        ))
        .execute(conn)
        .map(drop)
}

/// Claims up to `limit` pending outbox rows (locked until the transaction
/// ends; other instances skip them) and returns `(row id, code)`.
pub fn claim_outbox(conn: &mut PgConnection, limit: i64) -> QueryResult<Vec<(i64, String)>> {
    link_outbox::table
        .filter(link_outbox::processed_at.is_null())
        .order(link_outbox::id)
        .limit(limit)
        .select((link_outbox::id, link_outbox::code))
        .for_update()
        .skip_locked()
        .load(conn)
}

pub fn links_by_code(conn: &mut PgConnection, codes: &[String]) -> QueryResult<Vec<Link>> {
    links::table
        .filter(links::code.eq_any(codes))
        .select(Link::as_select())
        .load(conn)
}

pub fn mark_processed(conn: &mut PgConnection, ids: &[i64]) -> QueryResult<()> {
    diesel::update(link_outbox::table.filter(link_outbox::id.eq_any(ids)))
        .set(link_outbox::processed_at.eq(diesel::dsl::now))
        .execute(conn)
        .map(drop)
}

pub fn pending_outbox(conn: &mut PgConnection) -> QueryResult<i64> {
    link_outbox::table
        .filter(link_outbox::processed_at.is_null())
        .count()
        .get_result(conn)
}

/// Deletes processed outbox rows older than `age`.
pub fn purge_outbox(conn: &mut PgConnection, age: Duration) -> QueryResult<usize> {
    let cutoff = Utc::now() - chrono::Duration::from_std(age).unwrap_or_default();
    diesel::delete(
        link_outbox::table
            .filter(link_outbox::processed_at.is_not_null())
            .filter(link_outbox::processed_at.lt(cutoff)),
    )
    .execute(conn)
}
