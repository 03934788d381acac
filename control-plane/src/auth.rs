//! API keys: `Authorization: Bearer <key>`. Keys are stored as SHA-256
//! hashes (keys are 256-bit random strings, so a slow hash adds nothing);
//! the bootstrap key from `ADMIN_API_KEY` is compared in constant time, and
//! stored keys are found by their hash, so the time taken reveals nothing
//! about any key. Valid keys are cached for 30 s: revoking one takes effect
//! within that.
//!
//! Each key also has a request rate (`API_KEY_RATE_LIMIT` per second, bursts
//! of twice that; the `governor` crate's GCRA): a key over it gets 429
//! `rate_limited` with `Retry-After`, before any work is done. The gateway
//! limits per client address as well; this limit follows the key wherever
//! it comes from.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;
use rocket::http::Status;
use rocket::request::{FromRequest, Outcome, Request};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::db::{self, PgPool};
use crate::error::ApiError;

const CACHE_TTL: Duration = Duration::from_secs(30);

pub type KeyHash = [u8; 32];

pub fn hash_key(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// A new random API key: `sk_` and 64 hex digits.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("sk_{}", hex::encode(bytes))
}

type KeyLimiter = governor::DefaultKeyedRateLimiter<i64>;

pub struct ApiKeys {
    pool: PgPool,
    limiter: Option<KeyLimiter>,
    last_trim: Mutex<Instant>,
    bootstrap: Option<KeyHash>,
    bootstrap_id: tokio::sync::OnceCell<i64>,
    cache: Mutex<HashMap<KeyHash, (i64, Instant)>>,
}

impl ApiKeys {
    /// `rate_limit`: requests per second per key; 0 for no limit.
    pub fn new(pool: PgPool, bootstrap: Option<&str>, rate_limit: u32) -> Self {
        let limiter = std::num::NonZeroU32::new(rate_limit).map(|per_second| {
            let burst = per_second.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(1));
            governor::RateLimiter::keyed(governor::Quota::per_second(per_second).allow_burst(burst))
        });
        Self {
            pool,
            limiter,
            last_trim: Mutex::new(Instant::now()),
            bootstrap: bootstrap.map(hash_key),
            bootstrap_id: tokio::sync::OnceCell::new(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from the key's allowance.
    fn admit(&self, key_id: i64) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(&key_id).map_err(|not_until| {
            use governor::clock::Clock;
            let wait = not_until.wait_time_from(limiter.clock().now());
            metrics::counter!("control_plane_rate_limited_total").increment(1);
            // Whole seconds, rounded up, at least one.
            ApiError::RateLimited((wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1))
        })?;
        // Forget idle keys now and then (at most once a minute) so the table
        // stays small.
        if limiter.len() > 10_000
            && let Ok(mut last) = self.last_trim.try_lock()
            && last.elapsed() > Duration::from_secs(60)
        {
            limiter.retain_recent();
            *last = Instant::now();
        }
        Ok(())
    }

    /// The key id behind a presented key, if it is valid.
    pub async fn authenticate(&self, presented: &str) -> Result<Option<i64>, ApiError> {
        let hash = hash_key(presented);
        if let Some(bootstrap) = &self.bootstrap
            && bool::from(bootstrap.ct_eq(&hash))
        {
            let id = self
                .bootstrap_id
                .get_or_try_init(|| {
                    let pool = self.pool.clone();
                    let hash = *bootstrap;
                    crate::blocking(move || {
                        let mut conn = pool.get()?;
                        Ok(db::insert_api_key(
                            &mut conn,
                            "bootstrap (ADMIN_API_KEY)",
                            &hash,
                        )?)
                    })
                })
                .await?;
            return Ok(Some(*id));
        }
        if let Some((id, at)) = self.cache.lock().expect("cache lock").get(&hash).copied()
            && at.elapsed() < CACHE_TTL
        {
            return Ok(Some(id));
        }
        let pool = self.pool.clone();
        let found = crate::blocking(move || {
            let mut conn = pool.get()?;
            Ok(db::api_key_id(&mut conn, &hash)?)
        })
        .await?;
        if let Some(id) = found {
            let mut cache = self.cache.lock().expect("cache lock");
            // Bounded: valid keys only, and stale entries go when it grows.
            if cache.len() > 10_000 {
                cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
            }
            cache.insert(hash, (id, Instant::now()));
        }
        Ok(found)
    }
}

/// A request that presented a valid API key.
pub struct Authenticated {
    pub key_id: i64,
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for Authenticated {
    type Error = ApiError;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        let Some(keys) = request.rocket().state::<ApiKeys>() else {
            return Outcome::Error((
                Status::InternalServerError,
                ApiError::Internal("no key store".into()),
            ));
        };
        let presented = request
            .headers()
            .get_one("Authorization")
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        let Some(token) = presented.filter(|t| !t.is_empty()) else {
            return Outcome::Error((Status::Unauthorized, ApiError::Unauthorized));
        };
        match keys.authenticate(token).await {
            Ok(Some(key_id)) => match keys.admit(key_id) {
                Ok(()) => Outcome::Success(Self { key_id }),
                Err(error) => Outcome::Error((error.status(), error)),
            },
            Ok(None) => Outcome::Error((Status::Unauthorized, ApiError::Unauthorized)),
            Err(error) => Outcome::Error((error.status(), error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_long_random_and_distinct() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), 3 + 64);
        assert!(a.starts_with("sk_"));
        assert_ne!(hash_key(&a), hash_key(&b));
    }
}
