//! Token-bucket rate limits per kind of request and per requester.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::clock::Clock;
use super::error::{Error, Result};
use crate::config::{RateLimit, RateLimits};

/// Most requesters tracked at once; past it, full buckets are forgotten.
const MAX_TRACKED: usize = 100_000;

/// The kinds of request that are limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Login,
    Registration,
    RegistrationTokenValidity,
    ThreepidValidation,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated_ms: u64,
}

pub struct RateLimiter {
    settings: RateLimits,
    clock: Arc<dyn Clock>,
    buckets: Mutex<HashMap<(Kind, String), Bucket>>,
}

impl RateLimiter {
    pub fn new(settings: RateLimits, clock: Arc<dyn Clock>) -> Self {
        RateLimiter {
            settings,
            clock,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request of `kind` from `requester`'s bucket, or says how
    /// long to wait.
    pub fn check(&self, kind: Kind, requester: &str) -> Result<()> {
        self.take(kind, requester, true)
    }

    /// Says whether a request would pass, without using up any of the
    /// bucket: for the early steps of a multi-request exchange.
    pub fn peek(&self, kind: Kind, requester: &str) -> Result<()> {
        self.take(kind, requester, false)
    }

    fn take(&self, kind: Kind, requester: &str, consume: bool) -> Result<()> {
        if !self.settings.enabled {
            return Ok(());
        }
        let limit = limit_of(&self.settings, kind);
        let now = self.clock.now_ms();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED {
            // A full bucket carries no information: forget it.
            buckets.retain(|(kind, _), bucket| {
                let limit = limit_of(&self.settings, *kind);
                refill(*bucket, limit, now).tokens < f64::from(limit.burst)
            });
        }
        let key = (kind, requester.to_owned());
        let bucket = buckets.get(&key).copied().unwrap_or(Bucket {
            tokens: f64::from(limit.burst),
            updated_ms: now,
        });
        let mut bucket = refill(bucket, limit, now);
        if bucket.tokens >= 1.0 {
            if consume {
                bucket.tokens -= 1.0;
                buckets.insert(key, bucket);
            }
            Ok(())
        } else {
            let missing = 1.0 - bucket.tokens;
            let retry_after_ms = (missing / limit.per_second * 1000.0).ceil() as u64;
            buckets.insert(key, bucket);
            Err(Error::LimitExceeded {
                retry_after_ms: retry_after_ms.max(1),
            })
        }
    }
}

fn limit_of(settings: &RateLimits, kind: Kind) -> RateLimit {
    match kind {
        Kind::Login => settings.login,
        Kind::Registration => settings.registration,
        Kind::RegistrationTokenValidity => settings.registration_token_validity,
        Kind::ThreepidValidation => settings.threepid_validation,
    }
}

fn refill(bucket: Bucket, limit: RateLimit, now_ms: u64) -> Bucket {
    let elapsed_s = now_ms.saturating_sub(bucket.updated_ms) as f64 / 1000.0;
    Bucket {
        tokens: (bucket.tokens + elapsed_s * limit.per_second).min(f64::from(limit.burst)),
        updated_ms: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::clock::ManualClock;

    fn limiter(enabled: bool, clock: Arc<ManualClock>) -> RateLimiter {
        let settings = RateLimits {
            enabled,
            login: RateLimit {
                per_second: 0.5,
                burst: 2,
            },
            ..RateLimits::default()
        };
        RateLimiter::new(settings, clock)
    }

    #[test]
    fn bursts_then_waits_for_refill() {
        let clock = Arc::new(ManualClock::new(0));
        let limiter = limiter(true, clock.clone());
        assert!(limiter.check(Kind::Login, "1.2.3.4").is_ok());
        assert!(limiter.peek(Kind::Login, "1.2.3.4").is_ok());
        assert!(limiter.check(Kind::Login, "1.2.3.4").is_ok());
        assert!(limiter.peek(Kind::Login, "1.2.3.4").is_err());
        match limiter.check(Kind::Login, "1.2.3.4") {
            Err(Error::LimitExceeded { retry_after_ms }) => assert_eq!(retry_after_ms, 2000),
            other => panic!("expected a limit, got {other:?}"),
        }
        // Other requesters and other kinds have their own buckets.
        assert!(limiter.check(Kind::Login, "5.6.7.8").is_ok());
        assert!(limiter.check(Kind::Registration, "1.2.3.4").is_ok());
        clock.advance_ms(2000);
        assert!(limiter.check(Kind::Login, "1.2.3.4").is_ok());
        assert!(limiter.check(Kind::Login, "1.2.3.4").is_err());
    }

    #[test]
    fn switched_off_means_unlimited() {
        let limiter = limiter(false, Arc::new(ManualClock::new(0)));
        for _ in 0..100 {
            assert!(limiter.check(Kind::Login, "x").is_ok());
        }
    }
}
