//! The request figures of `GET /metrics` (API §11): requests by surface and decision, and a
//! latency histogram per surface; and the reading of the store's gauges for it.
//!
//! Hand-written, like the rest of `/metrics` (a few counters do not need a registry): a
//! fixed-bucket histogram of atomics costs the gateway two relaxed additions per request,
//! where `prometheus-client`'s histogram takes a lock per observation.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use leash_store::{Store, StoreGauges, StoreResult};

use crate::audit::Trail;
use crate::error::ApiError;

/// Where a request came in.
#[derive(Debug, Clone, Copy)]
pub enum Surface {
    /// `/gw/{upstream}/…`.
    Gateway,
    /// A request in the forward proxy's tunnel.
    Proxy,
    /// An MCP message that is decided (`tools/call`, `resources/*`, `prompts/*`); the messages
    /// passed on without a decision (`initialize`, `tools/list`, notifications…) are not counted.
    Mcp,
}

const SURFACES: [(Surface, &str); 3] = [
    (Surface::Gateway, "gateway"),
    (Surface::Proxy, "proxy"),
    (Surface::Mcp, "mcp"),
];

/// What was decided for a request.
#[derive(Debug, Clone, Copy)]
pub enum Decision {
    /// Allowed: its allow event was committed (then forwarded, even if the upstream failed).
    Allow,
    /// Refused, at any step (or its approval was denied or not given in time).
    Deny,
    /// Refused until a human approves it.
    ApprovalRequired,
}

const DECISIONS: [(Decision, &str); 3] = [
    (Decision::Allow, "allow"),
    (Decision::Deny, "deny"),
    (Decision::ApprovalRequired, "approval_required"),
];

impl Decision {
    /// The decision a refusal stands for.
    pub fn of_refusal(error: &ApiError) -> Self {
        match error {
            ApiError::ApprovalRequired { .. } => Self::ApprovalRequired,
            _ => Self::Deny,
        }
    }
}

/// Upper bounds of the latency buckets, in microseconds (`le` is written in seconds): from a
/// decision made in memory to an upstream at its timeout.
const BOUNDS_MICROS: [u64; 15] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// One surface's latency histogram; `buckets` holds each bucket's own count (the last is
/// `+Inf`), made cumulative when written.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BOUNDS_MICROS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_MICROS.partition_point(|&bound| bound < micros);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// Requests by surface and decision, and how long Leash took to answer each: from its arrival
/// to the head of Leash's answer (the decision, and for a forwarded request the upstream's
/// answer head; not the streaming of the body).
#[derive(Debug, Default)]
pub struct RequestMetrics {
    decided: [[AtomicU64; DECISIONS.len()]; SURFACES.len()],
    latency: [Histogram; SURFACES.len()],
}

impl RequestMetrics {
    /// Counts one request of `surface` decided `decision`, answered after `took`.
    pub fn record(&self, surface: Surface, decision: Decision, took: Duration) {
        let surface = surface as usize;
        self.decided[surface][decision as usize].fetch_add(1, Ordering::Relaxed);
        self.latency[surface].observe(took);
    }

    /// The figures in Prometheus text format.
    pub fn write(&self, out: &mut String) {
        out.push_str(
            "# HELP leash_requests_total Requests decided, by surface and decision.\n\
             # TYPE leash_requests_total counter\n",
        );
        for (surface, surface_name) in SURFACES {
            for (decision, decision_name) in DECISIONS {
                let count =
                    self.decided[surface as usize][decision as usize].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "leash_requests_total{{surface=\"{surface_name}\",decision=\"{decision_name}\"}} {count}"
                );
            }
        }
        out.push_str(
            "# HELP leash_request_duration_seconds Time from a request's arrival to the head of \
             Leash's answer.\n\
             # TYPE leash_request_duration_seconds histogram\n",
        );
        for (surface, surface_name) in SURFACES {
            let histogram = &self.latency[surface as usize];
            let mut cumulative = 0u64;
            for (at, bucket) in histogram.buckets.iter().enumerate() {
                cumulative += bucket.load(Ordering::Relaxed);
                let le = BOUNDS_MICROS
                    .get(at)
                    .map_or_else(|| "+Inf".to_owned(), |&micros| seconds(micros));
                let _ = writeln!(
                    out,
                    "leash_request_duration_seconds_bucket{{surface=\"{surface_name}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = seconds(histogram.sum_micros.load(Ordering::Relaxed));
            let _ = writeln!(
                out,
                "leash_request_duration_seconds_sum{{surface=\"{surface_name}\"}} {sum}\n\
                 leash_request_duration_seconds_count{{surface=\"{surface_name}\"}} {cumulative}"
            );
        }
    }
}

/// A request of one surface, counted once when its handler ends, however it ends: a client
/// that hangs up drops the handler mid-way. One whose commit stored it as allowed counts as
/// allowed, whatever followed (the upstream failing or timing out, the client leaving: it was
/// forwarded, or was about to be, and the audit says allow); a refused one as its refusal; one
/// refused inside a successful answer (an MCP tool call refused in a `200`, as a tool result)
/// as denied, known by its stored refusal event; one that ended before any of these (the
/// client left while it was being decided, a message that needed no decision) is not counted.
pub struct Counted<'m> {
    requests: &'m RequestMetrics,
    surface: Surface,
    arrived: Instant,
    /// The request's audit trail, held here so that its commit is known when it ends.
    pub trail: Trail,
    refused: Option<Decision>,
}

impl<'m> Counted<'m> {
    /// A request of `surface` arriving now.
    pub fn new(requests: &'m RequestMetrics, surface: Surface) -> Self {
        Self {
            requests,
            surface,
            arrived: Instant::now(),
            trail: Trail::default(),
            refused: None,
        }
    }

    /// The request was refused: it counts as `decision` unless its commit allowed it first.
    pub fn refused(&mut self, decision: Decision) {
        self.refused = Some(decision);
    }

    /// The request was refused with `error` ([`Self::refused`]).
    pub fn refused_by(&mut self, error: &ApiError) {
        self.refused(Decision::of_refusal(error));
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let decision = if self.trail.allowed {
            Decision::Allow
        } else if let Some(refused) = self.refused {
            refused
        } else if self.trail.recorded {
            Decision::Deny
        } else {
            return;
        };
        self.requests
            .record(self.surface, decision, self.arrived.elapsed());
    }
}

/// Microseconds written as seconds, exactly (no float rounding: `0.00025`, `10`).
fn seconds(micros: u64) -> String {
    let (whole, fraction) = (micros / 1_000_000, micros % 1_000_000);
    if fraction == 0 {
        return whole.to_string();
    }
    let fraction = format!("{fraction:06}");
    format!("{whole}.{}", fraction.trim_end_matches('0'))
}

/// How long a reading of the store's gauges serves the scrapes after it.
const GAUGES_FRESH: Duration = Duration::from_secs(1);

/// How long a scrape waits for the store's gauges. A store that hangs (a table locked by a
/// migration, a database host gone silent) must not hang the scrape with it: the request
/// counters are what an operator needs then, and a scraper's own timeout (Prometheus' default
/// is 10 s) would drop them all.
const GAUGES_WAIT: Duration = Duration::from_secs(2);

/// The store's gauges as `/metrics` reads them: at most once per [`GAUGES_FRESH`] (`/metrics`
/// answers anyone, and counting live grants reads the grants table, so a client scraping in a
/// loop must not turn into as many table reads), and never waited on for longer than
/// [`GAUGES_WAIT`]. Scrapes meanwhile wait for that one reading, not one each; a reading that
/// outlasts the wait is kept, not dropped, and the next scrape waits on it instead of starting
/// another, so a hung store never holds more than one of the pool's connections for it.
#[derive(Debug, Default)]
pub struct GaugeReadings(tokio::sync::Mutex<Readings>);

#[derive(Debug, Default)]
struct Readings {
    /// The last reading (`None`: the store did not answer in time), and when it ended.
    last: Option<(Instant, Option<StoreGauges>)>,
    /// A reading still under way after the scrape that started it stopped waiting.
    under_way: Option<tokio::task::JoinHandle<StoreResult<StoreGauges>>>,
}

impl GaugeReadings {
    /// The gauges at `now` (or at the time of the scrape that started a reading still under
    /// way), `None` when the store did not answer in time.
    pub async fn read(&self, store: &Arc<dyn Store>, now: i64) -> Option<StoreGauges> {
        let mut readings = self.0.lock().await;
        if let Some((ended, gauges)) = readings.last
            && ended.elapsed() < GAUGES_FRESH
        {
            return gauges;
        }
        let mut reading = readings.under_way.take().unwrap_or_else(|| {
            let store = Arc::clone(store);
            tokio::spawn(async move { store.gauges(now).await })
        });
        let gauges = match tokio::time::timeout(GAUGES_WAIT, &mut reading).await {
            Ok(read) => read.ok().and_then(Result::ok),
            Err(_) => {
                readings.under_way = Some(reading);
                None
            }
        };
        readings.last = Some((Instant::now(), gauges));
        gauges
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests abort loudly on failure")]

    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines().find(|l| l.starts_with(prefix)).unwrap()
    }

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let metrics = RequestMetrics::default();
        let gateway = Surface::Gateway;
        metrics.record(gateway, Decision::Allow, Duration::from_micros(250));
        metrics.record(gateway, Decision::Allow, Duration::from_micros(251));
        metrics.record(gateway, Decision::Deny, Duration::from_secs(11));
        metrics.record(
            Surface::Proxy,
            Decision::ApprovalRequired,
            Duration::from_millis(3),
        );
        let mut text = String::new();
        metrics.write(&mut text);
        let bucket = |surface: &str, le: &str| {
            line(
                &text,
                &format!(
                    "leash_request_duration_seconds_bucket{{surface=\"{surface}\",le=\"{le}\"}} "
                ),
            )
            .rsplit(' ')
            .next()
            .unwrap()
            .to_owned()
        };
        // `le` is inclusive: 250 µs is in the first bucket, 251 µs in the second.
        assert_eq!(bucket("gateway", "0.00025"), "1");
        assert_eq!(bucket("gateway", "0.0005"), "2");
        assert_eq!(bucket("gateway", "10"), "2");
        assert_eq!(bucket("gateway", "+Inf"), "3");
        assert_eq!(bucket("proxy", "0.0025"), "0");
        assert_eq!(bucket("proxy", "0.005"), "1");
        assert!(text.contains("leash_request_duration_seconds_count{surface=\"gateway\"} 3\n"));
        assert!(
            text.contains("leash_request_duration_seconds_sum{surface=\"gateway\"} 11.000501\n")
        );
        assert!(text.contains("leash_requests_total{surface=\"gateway\",decision=\"allow\"} 2\n"));
        assert!(text.contains("leash_requests_total{surface=\"gateway\",decision=\"deny\"} 1\n"));
        assert!(text.contains(
            "leash_requests_total{surface=\"proxy\",decision=\"approval_required\"} 1\n"
        ));
        assert!(text.contains("leash_requests_total{surface=\"proxy\",decision=\"allow\"} 0\n"));
    }

    #[test]
    fn a_request_counts_by_what_its_trail_and_refusal_say() {
        let metrics = RequestMetrics::default();
        let count = |decision: &str| {
            let mut text = String::new();
            metrics.write(&mut text);
            line(
                &text,
                &format!("leash_requests_total{{surface=\"mcp\",decision=\"{decision}\"}} "),
            )
            .rsplit(' ')
            .next()
            .unwrap()
            .to_owned()
        };
        // Refused in-band: only its stored refusal event tells.
        let mut refused_in_band = Counted::new(&metrics, Surface::Mcp);
        refused_in_band.trail.recorded = true;
        drop(refused_in_band);
        assert_eq!(count("deny"), "1");
        // Committed as allowed, then refused (the upstream failed): allowed.
        let mut committed = Counted::new(&metrics, Surface::Mcp);
        committed.trail.recorded = true;
        committed.trail.allowed = true;
        committed.refused(Decision::Deny);
        drop(committed);
        assert_eq!(count("allow"), "1");
        // Its approval request stored, then refused as such.
        let mut asked = Counted::new(&metrics, Surface::Mcp);
        asked.trail.recorded = true;
        asked.refused(Decision::ApprovalRequired);
        drop(asked);
        assert_eq!(count("approval_required"), "1");
        // Passed on without a decision, or left before one: not counted.
        drop(Counted::new(&metrics, Surface::Mcp));
        assert_eq!(
            (count("allow"), count("deny"), count("approval_required")),
            ("1".into(), "1".into(), "1".into())
        );
    }

    #[test]
    fn seconds_are_written_exactly() {
        assert_eq!(seconds(250), "0.00025");
        assert_eq!(seconds(1_000_000), "1");
        assert_eq!(seconds(2_500_000), "2.5");
        assert_eq!(seconds(0), "0");
    }
}
