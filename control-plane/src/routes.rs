//! The admin API routes. Each handler turns the request into domain types,
//! does its work on the blocking pool, and answers JSON or an `ApiError`.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use rocket::data::{Data, ToByteUnit};
use rocket::http::{ContentType, Header, Status};
use rocket::request::{FromRequest, Outcome, Request};
use rocket::response::{self, Responder, Response};
use rocket::{State, delete, get, patch, post};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::auth::Authenticated;
use crate::db::{self, Link, LinkChanges, NewLink};
use crate::domain::{Alias, Code, RedirectStatus, TargetUrl, parse_future_expiry};
use crate::error::ApiError;
use crate::relay::{self, Mapping};
use crate::{AppState, blocking};

/// Largest request body, in bytes.
pub const MAX_BODY: u64 = 64 * 1024;

/// A JSON response with a status and optional `Location`.
pub struct JsonResponse {
    status: Status,
    body: String,
    location: Option<String>,
}

impl JsonResponse {
    fn ok<T: Serialize>(value: &T) -> Self {
        Self {
            status: Status::Ok,
            body: serde_json::to_string(value).expect("response serialises"),
            location: None,
        }
    }
}

impl<'r> Responder<'r, 'static> for JsonResponse {
    fn respond_to(self, _: &'r Request<'_>) -> response::Result<'static> {
        let mut response = Response::build();
        response
            .status(self.status)
            .header(ContentType::JSON)
            .sized_body(self.body.len(), std::io::Cursor::new(self.body));
        if let Some(location) = self.location {
            response.header(Header::new("Location", location));
        }
        response.ok()
    }
}

fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[derive(Serialize)]
pub struct LinkBody {
    code: String,
    short_url: String,
    url: String,
    created_at: String,
    updated_at: String,
    expires_at: Option<String>,
    redirect_status: u16,
    disabled: bool,
}

impl LinkBody {
    fn new(link: &Link, base: &str) -> Self {
        Self {
            code: link.code.clone(),
            short_url: format!("{base}/{}", link.code),
            url: link.url.clone(),
            created_at: timestamp(link.created_at),
            updated_at: timestamp(link.updated_at),
            expires_at: link.expires_at.map(timestamp),
            redirect_status: link.redirect_status as u16,
            disabled: link.disabled,
        }
    }
}

async fn read_body(data: Data<'_>) -> Result<Vec<u8>, ApiError> {
    let bytes = data
        .open(MAX_BODY.bytes())
        .into_bytes()
        .await
        .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
    if !bytes.is_complete() {
        return Err(ApiError::PayloadTooLarge(MAX_BODY));
    }
    Ok(bytes.into_inner())
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest("invalid_json", format!("request body: {e}")))
}

/// The W3C trace context an upstream (the edge, a client) sent, if any.
pub struct TraceContext(http::HeaderMap);

impl TraceContext {
    /// A span for this request, a child of the upstream trace if there is
    /// one (a root otherwise).
    fn span(&self, name: &'static str) -> tracing::Span {
        let span = tracing::info_span!("request", otel.name = name);
        shortener_common::telemetry::set_parent_from(&span, &self.0);
        span
    }
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for TraceContext {
    type Error = std::convert::Infallible;
    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        let mut headers = http::HeaderMap::new();
        for name in ["traceparent", "tracestate"] {
            if let Some(value) = request
                .headers()
                .get_one(name)
                .and_then(|v| http::HeaderValue::from_str(v).ok())
            {
                headers.insert(name, value);
            }
        }
        Outcome::Success(Self(headers))
    }
}

/// The request's query string as sent.
pub struct RawQuery(Option<String>);

impl RawQuery {
    /// How many times the field `name` appears.
    fn count(&self, name: &str) -> usize {
        self.0
            .as_deref()
            .unwrap_or("")
            .split('&')
            .filter(|pair| pair.split('=').next() == Some(name))
            .count()
    }
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for RawQuery {
    type Error = std::convert::Infallible;
    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        Outcome::Success(Self(request.uri().query().map(|q| q.as_str().to_owned())))
    }
}

/// `Idempotency-Key`, if sent: 1 to 255 visible ASCII characters.
pub struct IdempotencyKey(Option<String>);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for IdempotencyKey {
    type Error = ApiError;
    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        match request.headers().get_one("Idempotency-Key") {
            None => Outcome::Success(Self(None)),
            Some(key)
                if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Outcome::Success(Self(Some(key.to_owned())))
            }
            Some(_) => Outcome::Error((
                Status::BadRequest,
                ApiError::BadRequest(
                    "invalid_idempotency_key",
                    "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
                ),
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    url: String,
    alias: Option<String>,
    expires_at: Option<String>,
    redirect_status: Option<i64>,
}

struct CreateLink {
    url: TargetUrl,
    alias: Option<Alias>,
    expires_at: Option<DateTime<Utc>>,
    status: RedirectStatus,
}

impl CreateLink {
    fn parse(request: CreateRequest, own_host: &str) -> Result<Self, ApiError> {
        let invalid = |m: String| ApiError::BadRequest("invalid_request", m);
        Ok(Self {
            url: TargetUrl::parse(&request.url, own_host)
                .map_err(|m| ApiError::BadRequest("invalid_url", m))?,
            alias: request
                .alias
                .as_deref()
                .map(Alias::parse)
                .transpose()
                .map_err(|m| ApiError::BadRequest("invalid_alias", m))?,
            expires_at: request
                .expires_at
                .as_deref()
                .map(|raw| parse_future_expiry(raw, Utc::now()))
                .transpose()
                .map_err(invalid)?,
            status: request
                .redirect_status
                .map(RedirectStatus::parse)
                .transpose()
                .map_err(invalid)?
                .unwrap_or(RedirectStatus::DEFAULT),
        })
    }
}

enum Created {
    Fresh(String),
    Replayed(String),
}

#[post("/shorten", data = "<data>")]
pub async fn shorten(
    state: &State<Arc<AppState>>,
    auth: Result<Authenticated, ApiError>,
    idempotency: Result<IdempotencyKey, ApiError>,
    trace: TraceContext,
    data: Data<'_>,
) -> Result<JsonResponse, ApiError> {
    let span = trace.span("POST /shorten");
    create_link(state, auth, idempotency, data)
        .instrument(span)
        .await
}

async fn create_link(
    state: &State<Arc<AppState>>,
    auth: Result<Authenticated, ApiError>,
    idempotency: Result<IdempotencyKey, ApiError>,
    data: Data<'_>,
) -> Result<JsonResponse, ApiError> {
    let auth = auth?;
    let IdempotencyKey(idempotency) = idempotency?;
    let bytes = read_body(data).await?;
    let value: serde_json::Value = parse_json(&bytes)?;
    // serde_json's map is ordered, so this is a canonical form of the body.
    let request_hash: Vec<u8> = Sha256::digest(value.to_string().as_bytes()).to_vec();
    let request: CreateRequest = serde_json::from_value(value)
        .map_err(|e| ApiError::BadRequest("invalid_json", format!("request body: {e}")))?;
    let create = Arc::new(CreateLink::parse(request, &state.public_host)?);
    state.check_blocklist(create.url.as_str())?;

    // A generated code can collide with an alias someone chose; take another.
    for _ in 0..5 {
        let (code, is_alias) = match &create.alias {
            Some(alias) => (alias.clone().into_code().into_string(), true),
            None => (state.keys.take().await?, false),
        };
        let (create, idem, request_hash) =
            (create.clone(), idempotency.clone(), request_hash.clone());
        let (pool, base) = (state.pool.clone(), state.public_base_url.clone());
        let outcome = blocking(move || {
            let mut conn = pool.get()?;
            let conn: &mut diesel::PgConnection = &mut conn;
            let insert = |conn: &mut diesel::PgConnection| -> Result<Link, ApiError> {
                let new = NewLink {
                    code: &code,
                    url: create.url.as_str(),
                    redirect_status: create.status.get() as i16,
                    expires_at: create.expires_at,
                    is_alias,
                    created_by: Some(auth.key_id),
                };
                match db::insert_link(conn, &new) {
                    Ok(link) => Ok(link),
                    Err(diesel::result::Error::DatabaseError(
                        diesel::result::DatabaseErrorKind::UniqueViolation,
                        _,
                    )) => {
                        if is_alias {
                            Err(ApiError::Conflict(format!(
                                "alias {code:?} is already taken"
                            )))
                        } else {
                            // Rolls the transaction back; the caller retries
                            // with another code.
                            Err(code_collision())
                        }
                    }
                    Err(other) => Err(other.into()),
                }
            };
            let Some(key) = &idem else {
                // One statement, atomic by itself: no transaction needed.
                let link = insert(conn)?;
                return Ok(Created::Fresh(
                    serde_json::to_string(&LinkBody::new(&link, &base)).expect("serialises"),
                ));
            };
            diesel::Connection::transaction(conn, |conn| {
                if let Some((stored_hash, body)) = db::find_idempotent(conn, auth.key_id, key)? {
                    return if stored_hash == request_hash {
                        Ok(Created::Replayed(body))
                    } else {
                        Err(ApiError::Unprocessable(
                            "idempotency_key_reused",
                            "this Idempotency-Key was used with a different request body".into(),
                        ))
                    };
                }
                let link = insert(conn)?;
                let body = serde_json::to_string(&LinkBody::new(&link, &base)).expect("serialises");
                db::store_idempotent(conn, auth.key_id, key, &request_hash, &body)?;
                Ok(Created::Fresh(body))
            })
        })
        .await;
        let created = match outcome {
            Err(ApiError::Unavailable("code_collision", _)) => continue,
            // Two requests with one new Idempotency-Key raced: the loser
            // replays the winner's result on its next turn.
            Err(ApiError::Internal(detail))
                if idempotency.is_some() && detail.contains("idempotency_keys_pkey") =>
            {
                continue;
            }
            other => other?,
        };
        let body = match created {
            Created::Fresh(body) => {
                state.relay_kick.kick();
                metrics::counter!("control_plane_links_created_total").increment(1);
                body
            }
            Created::Replayed(body) => body,
        };
        let location = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["short_url"].as_str().map(str::to_owned));
        return Ok(JsonResponse {
            status: Status::Created,
            body,
            location,
        });
    }
    Err(code_collision())
}

fn code_collision() -> ApiError {
    ApiError::Unavailable(
        "code_collision",
        "could not find a free short code; retry".into(),
    )
}

/// A path code that is not a valid code names no link: 404, after the key
/// check, like any other unknown code (never a 400 or 422 that would tell a
/// caller without a key something).
fn known_code(code: Result<Code, &str>) -> Result<Code, ApiError> {
    code.map_err(|_| ApiError::NotFound("no link has this code".into()))
}

#[get("/links/<code>")]
pub async fn get_link(
    state: &State<Arc<AppState>>,
    auth: Result<Authenticated, ApiError>,
    code: Result<Code, &str>,
) -> Result<JsonResponse, ApiError> {
    auth?;
    let code = known_code(code)?;
    let pool = state.pool.clone();
    let link = blocking(move || Ok(db::find_link(&mut *pool.get()?, code.as_str())?))
        .await?
        .ok_or_else(|| ApiError::NotFound("no link has this code".into()))?;
    Ok(JsonResponse::ok(&LinkBody::new(
        &link,
        &state.public_base_url,
    )))
}

/// `Some(None)` for an explicit `null`, `None` when the field is absent.
fn explicit_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchRequest {
    url: Option<String>,
    #[serde(default, deserialize_with = "explicit_null")]
    expires_at: Option<Option<String>>,
    redirect_status: Option<i64>,
    disabled: Option<bool>,
}

#[patch("/links/<code>", data = "<data>")]
pub async fn patch_link(
    state: &State<Arc<AppState>>,
    auth: Result<Authenticated, ApiError>,
    code: Result<Code, &str>,
    data: Data<'_>,
) -> Result<JsonResponse, ApiError> {
    auth?;
    let code = known_code(code)?;
    let request: PatchRequest = parse_json(&read_body(data).await?)?;
    let changes = LinkChanges {
        url: request
            .url
            .as_deref()
            .map(|u| TargetUrl::parse(u, &state.public_host).map(TargetUrl::into_string))
            .transpose()
            .map_err(|m| ApiError::BadRequest("invalid_url", m))?,
        redirect_status: request
            .redirect_status
            .map(|s| RedirectStatus::parse(s).map(|s| s.get() as i16))
            .transpose()
            .map_err(ApiError::bad_request)?,
        expires_at: request
            .expires_at
            .map(|e| {
                e.as_deref()
                    .map(|raw| parse_future_expiry(raw, Utc::now()))
                    .transpose()
            })
            .transpose()
            .map_err(ApiError::bad_request)?,
        disabled: request.disabled,
    };
    if let Some(url) = &changes.url {
        state.check_blocklist(url)?;
    }
    let pool = state.pool.clone();
    let link = blocking(move || Ok(db::update_link(&mut *pool.get()?, code.as_str(), &changes)?))
        .await?
        .ok_or_else(|| ApiError::NotFound("no link has this code".into()))?;
    state.relay_kick.kick();
    Ok(JsonResponse::ok(&LinkBody::new(
        &link,
        &state.public_base_url,
    )))
}

#[delete("/links/<code>")]
pub async fn delete_link(
    state: &State<Arc<AppState>>,
    auth: Result<Authenticated, ApiError>,
    code: Result<Code, &str>,
) -> Result<Status, ApiError> {
    auth?;
    let code = known_code(code)?;
    let pool = state.pool.clone();
    let deleted = blocking(move || Ok(db::delete_link(&mut *pool.get()?, code.as_str())?)).await?;
    if !deleted {
        return Err(ApiError::NotFound("no link has this code".into()));
    }
    state.relay_kick.kick();
    Ok(Status::NoContent)
}

#[derive(Serialize)]
struct LinkPage {
    links: Vec<LinkBody>,
    next_cursor: Option<String>,
}

/// Cursors are opaque to clients: the id of the last link returned, in hex
/// behind a version letter, so the encoding can change later.
fn encode_cursor(id: i64) -> String {
    format!("v{id:x}")
}

fn decode_cursor(raw: &str) -> Option<i64> {
    i64::from_str_radix(raw.strip_prefix('v')?, 16)
        .ok()
        .filter(|id| *id > 0)
}

#[get("/links?<limit>&<cursor>")]
pub async fn list_links(
    state: &State<Arc<AppState>>,
    auth: Result<Authenticated, ApiError>,
    limit: Option<&str>,
    cursor: Option<&str>,
    query: RawQuery,
) -> Result<JsonResponse, ApiError> {
    auth?;
    // Rocket takes a repeated field as absent; say so instead of quietly
    // serving the default page.
    for name in ["limit", "cursor"] {
        if query.count(name) > 1 {
            return Err(ApiError::bad_request(format!(
                "{name} is given more than once"
            )));
        }
    }
    let limit = match limit {
        None => 20,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be from 1 to 100, got {raw:?}"))
            })?,
    };
    let before = cursor
        .map(|raw| {
            decode_cursor(raw)
                .ok_or_else(|| ApiError::bad_request("cursor is not one this API returned"))
        })
        .transpose()?;
    let pool = state.pool.clone();
    let mut links =
        blocking(move || Ok(db::list_links(&mut *pool.get()?, before, limit + 1)?)).await?;
    let next_cursor = if links.len() as i64 > limit {
        links.truncate(limit as usize);
        links.last().map(|l| encode_cursor(l.id))
    } else {
        None
    };
    Ok(JsonResponse::ok(&LinkPage {
        links: links
            .iter()
            .map(|l| LinkBody::new(l, &state.public_base_url))
            .collect(),
        next_cursor,
    }))
}

#[derive(Serialize)]
struct Resolved {
    code: String,
    #[serde(flatten)]
    mapping: Mapping,
}

/// For the edge when Redis knows nothing of a code: PostgreSQL's answer,
/// written back to Redis (only if Redis still has nothing, so it can never
/// overwrite a newer state the relay wrote).
#[get("/internal/resolve/<code>")]
pub async fn resolve(
    state: &State<Arc<AppState>>,
    code: Result<Code, &str>,
    trace: TraceContext,
) -> Result<JsonResponse, ApiError> {
    let code = known_code(code)?;
    let span = trace.span("GET /internal/resolve");
    resolve_link(state, code).instrument(span).await
}

async fn resolve_link(state: &State<Arc<AppState>>, code: Code) -> Result<JsonResponse, ApiError> {
    let pool = state.pool.clone();
    let lookup = code.clone();
    let link = blocking(move || Ok(db::find_link(&mut *pool.get()?, lookup.as_str())?))
        .await?
        .ok_or_else(|| ApiError::NotFound("no link has this code".into()))?;
    metrics::counter!("control_plane_resolves_total").increment(1);
    if !relay::is_expired(&link) {
        let mapping = serde_json::to_string(&Mapping::from(&link)).expect("serialises");
        let mut cmd = redis::cmd("SET");
        cmd.arg(relay::redis_key(code.as_str()))
            .arg(mapping)
            .arg("NX");
        if let Some(at) = link.expires_at {
            cmd.arg("PXAT").arg(at.timestamp_millis());
        }
        if let Err(error) = state.redis.run::<Option<String>>(&cmd).await {
            tracing::warn!(%error, "could not repopulate Redis after a resolve");
        }
    }
    Ok(JsonResponse::ok(&Resolved {
        code: link.code.clone(),
        mapping: Mapping::from(&link),
    }))
}

#[get("/healthz")]
pub fn healthz() -> JsonResponse {
    JsonResponse::ok(&serde_json::json!({"status": "ok"}))
}

#[get("/readyz")]
pub async fn readyz(state: &State<Arc<AppState>>) -> Result<JsonResponse, ApiError> {
    let pool = state.pool.clone();
    let postgres = blocking(move || {
        diesel::RunQueryDsl::execute(diesel::sql_query("SELECT 1"), &mut *pool.get()?)?;
        Ok(())
    })
    .await
    .is_ok();
    let redis = state.redis.run::<String>(&redis::cmd("PING")).await.is_ok();
    let keygen = state.keygen_dependency.reachable().await;
    let down: Vec<&str> = [("postgres", postgres), ("redis", redis), ("keygen", keygen)]
        .into_iter()
        .filter_map(|(name, up)| (!up).then_some(name))
        .collect();
    if down.is_empty() {
        Ok(JsonResponse::ok(&serde_json::json!({"status": "ready"})))
    } else {
        Err(ApiError::Unavailable(
            "dependency_unavailable",
            format!("unreachable: {}", down.join(", ")),
        ))
    }
}

#[get("/metrics")]
pub fn metrics_text() -> (ContentType, String) {
    (
        ContentType::new("text", "plain").with_params(("version", "0.0.4")),
        shortener_common::telemetry::metrics_handle().render(),
    )
}

pub const OPENAPI: &str = include_str!("../openapi.json");

#[get("/openapi.json")]
pub fn openapi() -> (ContentType, &'static str) {
    (ContentType::JSON, OPENAPI)
}

#[rocket::catch(default)]
pub fn default_catcher(status: Status, _: &Request<'_>) -> ApiError {
    match status.code {
        401 => ApiError::Unauthorized,
        404 => ApiError::NotFound("no such route or link".into()),
        413 => ApiError::PayloadTooLarge(MAX_BODY),
        400 | 422 => ApiError::bad_request("the request is malformed"),
        503 => ApiError::Unavailable(
            "unavailable",
            "a dependency is unavailable; retry shortly".into(),
        ),
        _ => ApiError::Internal(format!("unhandled status {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        for id in [1, 42, i64::MAX] {
            assert_eq!(decode_cursor(&encode_cursor(id)), Some(id));
        }
        for bad in ["", "v", "42", "vzz", "v-1", "v0"] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }
}
