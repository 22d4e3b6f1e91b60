//! What a caller may ask of the server over time: per-caller rates of authenticated callers
//! (governor's GCRA, per node), the refusals of callers nobody could be identified for, per
//! source address, with their minutely summary, and the source address a request counts
//! against. The connection-level limits are the listener's ([`crate::listener`]).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::clock::Clock as _;

use crate::config::Rate;
use crate::error::{ApiError, ApiResult};
use crate::listener::Peer;

/// The address a request counts against: the TCP peer, or, when the peer is a trusted proxy,
/// the nearest address in `X-Forwarded-For` that is not one (a client can prepend anything to
/// that header, but not what the proxies after it appended).
pub fn source_address(
    peer: Option<&Peer>,
    headers: &axum::http::HeaderMap,
    trusted: &[IpAddr],
) -> Option<IpAddr> {
    let peer = peer?.0.ip();
    if !trusted.contains(&peer) {
        return Some(peer);
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for hop in forwarded.iter().rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) if trusted.contains(&ip) => continue,
            Ok(ip) => return Some(ip),
            // Garbage where an address should be: the hop before it is the last one known.
            Err(_) => return Some(peer),
        }
    }
    Some(peer)
}

/// Refusals of requests nobody could be identified for (no credential, a forged one, a
/// malformed request), per source address: within `[limits] unauthenticated_rate` each is
/// audited; beyond it they are answered 429 and only counted, and
/// [`UnauthenticatedRefusals::take_summary`] reports the count once a minute.
#[derive(Debug)]
pub struct UnauthenticatedRefusals {
    limiter: Option<governor::DefaultKeyedRateLimiter<IpAddr>>,
    suppressed: std::sync::Mutex<Suppressed>,
    /// Refusals answered 429 since start (`/metrics`).
    refused: AtomicU64,
}

/// Refusals answered 429 since the last summary.
#[derive(Debug, Default)]
struct Suppressed {
    requests: u64,
    /// Distinct addresses, counted up to [`MAX_SUMMARY_ADDRESSES`].
    addresses: std::collections::HashSet<IpAddr>,
}

/// Addresses a summary counts one by one; beyond it, "at least" this many.
const MAX_SUMMARY_ADDRESSES: usize = 4096;

/// What a summary says: requests refused without an event of their own, and from how many
/// addresses (at least).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalSummary {
    /// Requests.
    pub requests: u64,
    /// Source addresses.
    pub addresses: usize,
}

impl UnauthenticatedRefusals {
    /// Limits at `rate` per source address; `None` audits every refusal.
    pub fn new(rate: Option<Rate>) -> Self {
        Self {
            limiter: rate.map(|rate| {
                governor::RateLimiter::keyed(
                    governor::Quota::per_second(rate.per_second).allow_burst(rate.burst),
                )
            }),
            suppressed: std::sync::Mutex::default(),
            refused: AtomicU64::new(0),
        }
    }

    /// Whether a refusal from `source` is audited on its own (within the rate); otherwise it
    /// is counted for the summary and the caller answers 429. A request whose source is not
    /// known is audited.
    pub fn admit(&self, source: Option<IpAddr>) -> bool {
        let (Some(limiter), Some(source)) = (&self.limiter, source) else {
            return true;
        };
        if limiter.check_key(&source).is_ok() {
            return true;
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        let mut suppressed = self
            .suppressed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        suppressed.requests = suppressed.requests.saturating_add(1);
        if suppressed.addresses.len() < MAX_SUMMARY_ADDRESSES {
            suppressed.addresses.insert(source);
        }
        false
    }

    /// The refusals counted since the last call, if any; starts a new count.
    pub fn take_summary(&self) -> Option<RefusalSummary> {
        let taken = std::mem::take(
            &mut *self
                .suppressed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        (taken.requests > 0).then_some(RefusalSummary {
            requests: taken.requests,
            addresses: taken.addresses.len(),
        })
    }

    /// Refusals answered 429 since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Drops the entries of addresses back at full allowance (run periodically).
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// Requests per caller over time, by the generic cell rate algorithm (governor). Keys are
/// authenticated callers only (an agent whose assertion or token checked out, a human whose
/// key did), so the table holds at most one entry per registered caller, and
/// [`CallerRates::forget_idle`] drops those back at full allowance.
#[derive(Debug)]
pub struct CallerRates {
    limiter: Option<governor::DefaultKeyedRateLimiter<String>>,
    refused: AtomicU64,
}

impl CallerRates {
    /// Limits at `rate`; `None` allows everything.
    pub fn new(rate: Option<Rate>) -> Self {
        Self {
            limiter: rate.map(|rate| {
                governor::RateLimiter::keyed(
                    governor::Quota::per_second(rate.per_second).allow_burst(rate.burst),
                )
            }),
            refused: AtomicU64::new(0),
        }
    }

    /// Counts one request of `caller`; over the rate → 429 with the wait.
    pub fn check(&self, caller: &str) -> ApiResult<()> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(&caller.to_owned()).map_err(|not_until| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            let wait = not_until.wait_time_from(limiter.clock().now());
            ApiError::RateLimited {
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            }
        })
    }

    /// Drops the entries of callers back at full allowance (run periodically).
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Callers currently tracked.
    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }

    /// Requests refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn rate(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        })
    }

    #[test]
    fn a_burst_is_allowed_then_refused_with_a_wait_per_caller() {
        let rates = CallerRates::new(rate(1, 3));
        for _ in 0..3 {
            rates.check("spiffe://a").unwrap();
        }
        match rates.check("spiffe://a") {
            Err(ApiError::RateLimited { retry_after_secs }) => assert_eq!(retry_after_secs, 1),
            other => panic!("expected 429, got {other:?}"),
        }
        // Another caller has its own allowance.
        rates.check("spiffe://b").unwrap();
        assert_eq!(rates.refused(), 1);
        assert_eq!(rates.tracked(), 2);
    }

    #[test]
    fn the_source_is_the_peer_unless_a_trusted_proxy_names_the_client() {
        let peer = |ip: &str| Peer(format!("{ip}:4000").parse().unwrap());
        let mut headers = axum::http::HeaderMap::new();
        headers.append("x-forwarded-for", "6.6.6.6, 10.0.0.7".parse().unwrap());
        headers.append("x-forwarded-for", "10.0.0.8".parse().unwrap());
        let trusted: Vec<IpAddr> = vec!["10.0.0.8".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let source = |p: &Peer, headers: &axum::http::HeaderMap| {
            source_address(Some(p), headers, &trusted)
                .unwrap()
                .to_string()
        };
        // An untrusted peer is the source whatever it claims.
        assert_eq!(source(&peer("192.0.2.1"), &headers), "192.0.2.1");
        // Behind trusted proxies: the nearest hop none of them is; what the client prepended
        // (6.6.6.6) is never reached.
        assert_eq!(source(&peer("127.0.0.1"), &headers), "10.0.0.7");
        headers.insert("x-forwarded-for", "not-an-address".parse().unwrap());
        assert_eq!(source(&peer("127.0.0.1"), &headers), "127.0.0.1");
        assert_eq!(source_address(None, &headers, &trusted), None);
    }

    #[test]
    fn unidentified_refusals_over_the_rate_are_counted_for_the_summary() {
        let refusals = UnauthenticatedRefusals::new(rate(1, 2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(refusals.admit(Some(a)) && refusals.admit(Some(a)));
        assert!(!refusals.admit(Some(a)) && !refusals.admit(Some(a)));
        assert!(refusals.admit(Some(b)));
        assert!(
            refusals.admit(None),
            "a request of unknown source is audited"
        );
        assert_eq!(
            refusals.take_summary(),
            Some(RefusalSummary {
                requests: 2,
                addresses: 1
            })
        );
        assert_eq!(refusals.take_summary(), None);
    }

    #[test]
    fn no_rate_allows_everything_and_tracks_nobody() {
        let rates = CallerRates::new(None);
        for i in 0..1000 {
            rates.check(&format!("caller-{i}")).unwrap();
        }
        assert_eq!(rates.tracked(), 0);
    }

    #[test]
    fn callers_back_at_full_allowance_are_forgotten() {
        let rates = CallerRates::new(rate(1000, 1));
        for i in 0..100 {
            rates.check(&format!("caller-{i}")).unwrap();
        }
        assert_eq!(rates.tracked(), 100);
        std::thread::sleep(std::time::Duration::from_millis(20));
        rates.forget_idle();
        assert_eq!(rates.tracked(), 0);
    }
}
