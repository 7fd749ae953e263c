//! How the API watchers retry, and how they report an outage.
//!
//! A good client of a recovering API server (client-go's reflector is the
//! model): the first retry after a healthy period is fast; the next ones
//! grow exponentially, with jitter so that thousands of nodes do not come
//! back in step, up to [`RetryPolicy::cap`]; a `Retry-After` the server
//! sent is a floor. The delay starts over only once a watch is
//! established: a watch event arrived, or the stream ran without an error
//! for [`RetryPolicy::reset_after`]. A successful list alone does not reset
//! it: a server that lists but rejects every watch would otherwise be
//! relisted at the fastest rate forever.
//!
//! [`Outage`] keeps the logs quiet while a source is down: one line when it
//! starts failing, a summary with a count every [`Outage::SUMMARY_EVERY`],
//! one line when it recovers. The metrics carry every error.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::k8s::tracker::Kind;

/// The retry schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first delay after a healthy period.
    pub base: Duration,
    /// The longest delay (before `Retry-After`).
    pub cap: Duration,
    /// A stream that ran this long without an error counts as established.
    pub reset_after: Duration,
}

impl RetryPolicy {
    /// The delay after `n` failures in a row, before jitter: `base * 2^n`,
    /// at most `cap`.
    pub fn delay(&self, n: u32) -> Duration {
        self.base.saturating_mul(1u32 << n.min(20)).min(self.cap)
    }
}

impl Default for RetryPolicy {
    /// client-go's reflector: about 1 s growing to 30 s; here a faster
    /// first retry (a watch cut by a server restart is back at once).
    fn default() -> Self {
        Self {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(30),
            reset_after: Duration::from_secs(30),
        }
    }
}

/// The retry state of one watch.
#[derive(Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    /// Failures since the watch was last established.
    failures: u32,
    last_failure: Option<Instant>,
    /// xorshift state for the jitter.
    rng: u64,
}

impl Backoff {
    pub fn new(policy: RetryPolicy) -> Self {
        // A seed that differs per process and per watch.
        let seed = {
            use std::hash::{BuildHasher as _, Hasher as _};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0x6e65_746c_6200);
            h.finish()
        };
        Self::with_seed(policy, seed)
    }

    /// A backoff with a fixed jitter seed (tests).
    pub fn with_seed(policy: RetryPolicy, seed: u64) -> Self {
        Self {
            policy,
            failures: 0,
            last_failure: None,
            rng: seed | 1,
        }
    }

    fn random_unit(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The watch is established (a watch event arrived): the next failure
    /// starts the schedule over.
    pub fn established(&mut self) {
        self.failures = 0;
    }

    /// A request failed at `now`; `retry_after` is what the server asked
    /// for, if anything. Returns how long to wait before the next one:
    /// `base * 2^n` with equal jitter (between half and all of it), at most
    /// `cap`, at least `retry_after` (plus up to a tenth of it, to spread
    /// the clients it was said to).
    pub fn failed(&mut self, now: Instant, retry_after: Option<Duration>) -> Duration {
        if self
            .last_failure
            .is_some_and(|t| now.duration_since(t) >= self.policy.reset_after)
        {
            self.failures = 0;
        }
        self.last_failure = Some(now);
        let full = self.policy.delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        let jittered = full.mul_f64(0.5 + 0.5 * self.random_unit());
        match retry_after {
            Some(floor) => jittered.max(floor + floor.mul_f64(0.1 * self.random_unit())),
            None => jittered,
        }
    }
}

/// When the API server said to come back: the latest `Retry-After` of a
/// 429 or 503, captured by a layer of the client (kube's errors carry the
/// status, not the headers) as a moment no watch retries before. Shared by
/// the watches: they talk to the same server, so a delay it asked of one
/// request holds for all of them.
#[derive(Clone, Debug, Default)]
pub struct RetryAfter(Arc<Mutex<Option<Instant>>>);

impl RetryAfter {
    /// Records the header of a response that arrived at `now`.
    pub fn observe(&self, status: http::StatusCode, headers: &http::HeaderMap, now: Instant) {
        if status != http::StatusCode::TOO_MANY_REQUESTS
            && status != http::StatusCode::SERVICE_UNAVAILABLE
        {
            return;
        }
        // Seconds, as the API server sends it (an HTTP date is not used by
        // it and is ignored).
        let seconds = headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(seconds) = seconds {
            let until = now + Duration::from_secs(seconds.min(600));
            let mut slot = crate::support::lock(&self.0);
            if slot.is_none_or(|t| t < until) {
                *slot = Some(until);
            }
        }
    }

    /// How long a request at `now` must still wait, if at all.
    pub fn floor(&self, now: Instant) -> Option<Duration> {
        let until = (*crate::support::lock(&self.0))?;
        (until > now).then(|| until - now)
    }
}

/// What an outage of one source looks like in the logs.
#[derive(Debug, Default)]
pub struct Outage {
    /// When the current outage started, and its errors so far.
    since: Option<Instant>,
    errors: u64,
    errors_since_summary: u64,
    last_summary: Option<Instant>,
}

/// A log line an [`Outage`] asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutageLog {
    /// The first error of an outage.
    Started,
    /// Still failing: errors since the last line, and in all.
    Summary { recent: u64, total: u64 },
    /// Recovered after `errors` errors over `lasted`.
    Recovered { errors: u64, lasted: Duration },
}

impl Outage {
    /// A summary line at most this often while failing.
    pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

    /// An error at `now`: the line to log, if any.
    pub fn failed(&mut self, now: Instant) -> Option<OutageLog> {
        self.errors += 1;
        self.errors_since_summary += 1;
        if self.since.is_none() {
            self.since = Some(now);
            self.last_summary = Some(now);
            self.errors_since_summary = 0;
            return Some(OutageLog::Started);
        }
        if self
            .last_summary
            .is_some_and(|t| now.duration_since(t) >= Self::SUMMARY_EVERY)
        {
            self.last_summary = Some(now);
            let recent = std::mem::take(&mut self.errors_since_summary);
            return Some(OutageLog::Summary {
                recent,
                total: self.errors,
            });
        }
        None
    }

    /// A success at `now`: the recovery line, if there was an outage.
    pub fn succeeded(&mut self, now: Instant) -> Option<OutageLog> {
        let since = self.since.take()?;
        let errors = std::mem::take(&mut self.errors);
        self.errors_since_summary = 0;
        self.last_summary = None;
        Some(OutageLog::Recovered {
            errors,
            lasted: now.duration_since(since),
        })
    }

    /// Whether an outage is going on.
    pub fn failing(&self) -> bool {
        self.since.is_some()
    }
}

/// What the API server answered each kind's requests: the watchers'
/// failures (from the errors they get) and the server's answers (from a
/// layer of the client, which sees every response: a list answered, a
/// watch established, a `Retry-After`). One per source, shared by its
/// watchers; every outage is logged here (once when it starts, a summary a
/// minute, once when the server answers again).
#[derive(Clone, Debug, Default)]
pub struct SourceHealth {
    kinds: Arc<Mutex<BTreeMap<Kind, KindHealth>>>,
    retry_after: RetryAfter,
}

#[derive(Debug, Default)]
struct KindHealth {
    outage: Outage,
    /// Since when the current outage lasts.
    failing_since: Option<Instant>,
    /// When a watch of this kind was last established (answered 200).
    watch_established: Option<Instant>,
}

impl SourceHealth {
    fn with<T>(&self, kind: Kind, f: impl FnOnce(&mut KindHealth) -> T) -> T {
        let mut kinds = crate::support::lock(&self.kinds);
        f(kinds.entry(kind).or_default())
    }

    /// The server answered a request for `kind` (a watch if `watch`) at
    /// `now`.
    pub fn answered(
        &self,
        kind: Kind,
        watch: bool,
        status: http::StatusCode,
        headers: &http::HeaderMap,
        now: Instant,
    ) {
        self.retry_after.observe(status, headers, now);
        if !status.is_success() {
            return;
        }
        self.with(kind, |h| {
            if watch {
                h.watch_established = Some(now);
            }
            h.failing_since = None;
            if let Some(OutageLog::Recovered { errors, lasted }) = h.outage.succeeded(now) {
                log::info!(
                    "{} watch recovered after {errors} failed attempts in {lasted:.0?}",
                    kind.name()
                );
            }
        });
    }

    /// A watcher of `kind` got `error` at `now` and retries after `delay`.
    pub fn failed(&self, kind: Kind, error: &dyn std::fmt::Display, delay: Duration, now: Instant) {
        self.with(kind, |h| {
            h.failing_since.get_or_insert(now);
            match h.outage.failed(now) {
                Some(OutageLog::Started) => log::warn!(
                    "{} watch failing: {error}; retrying in {delay:.1?}, then less and less often (a summary a minute until it recovers)",
                    kind.name()
                ),
                Some(OutageLog::Summary { recent, total }) => log::warn!(
                    "{} watch still failing: {recent} failed attempts in the last minute, {total} in all; last: {error}; next attempt in {delay:.1?}",
                    kind.name()
                ),
                _ => {}
            }
        });
    }

    /// Whether a watch of `kind` was established after `since`.
    pub fn established_since(&self, kind: Kind, since: Instant) -> bool {
        self.with(kind, |h| h.watch_established.is_some_and(|t| t > since))
    }

    /// How long a request must still wait for the server's `Retry-After`.
    pub fn retry_floor(&self, now: Instant) -> Option<Duration> {
        self.retry_after.floor(now)
    }

    /// Since when the longest outage going on lasts, if one is.
    pub fn outage_since(&self) -> Option<Instant> {
        let kinds = crate::support::lock(&self.kinds);
        kinds.values().filter_map(|h| h.failing_since).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::default()
    }

    #[test]
    fn delays_grow_from_a_fast_first_retry_to_the_cap_with_jitter() {
        let mut b = Backoff::with_seed(policy(), 42);
        let start = Instant::now();
        let mut now = start;
        let mut delays = Vec::new();
        for _ in 0..12 {
            let d = b.failed(now, None);
            delays.push(d);
            now += d;
        }
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(200));
        for (n, d) in delays.iter().enumerate() {
            let full = Duration::from_millis(200)
                .saturating_mul(1 << n)
                .min(Duration::from_secs(30));
            assert!(*d >= full / 2 && *d <= full, "{n}: {d:?} vs {full:?}");
        }
        assert!(delays[11] >= Duration::from_secs(15));
        // Not in step: another seed gives other delays.
        let mut other = Backoff::with_seed(policy(), 7);
        let first: Vec<Duration> = (0..5).map(|_| other.failed(start, None)).collect();
        assert_ne!(first, delays[..5].to_vec());
    }

    #[test]
    fn retry_after_is_a_floor_and_never_shortened() {
        let mut b = Backoff::with_seed(policy(), 1);
        let d = b.failed(Instant::now(), Some(Duration::from_secs(7)));
        assert!(
            d >= Duration::from_secs(7) && d <= Duration::from_millis(7700),
            "{d:?}"
        );
    }

    #[test]
    fn only_an_established_watch_starts_the_schedule_over() {
        let mut b = Backoff::with_seed(policy(), 3);
        let mut now = Instant::now();
        for _ in 0..6 {
            now += b.failed(now, None);
        }
        // Failures that keep coming (a server that lists but rejects every
        // watch: a list succeeds between them) keep growing.
        let d = b.failed(now, None);
        assert!(d >= Duration::from_millis(6400), "{d:?}");
        // A watch event starts over.
        b.established();
        let d = b.failed(now, None);
        assert!(d <= Duration::from_millis(200), "{d:?}");
        // So does a stream that ran 30 s without an error.
        for _ in 0..5 {
            now += b.failed(now, None);
        }
        now += Duration::from_secs(31);
        let d = b.failed(now, None);
        assert!(d <= Duration::from_millis(200), "{d:?}");
    }

    #[test]
    fn an_outage_logs_once_then_a_summary_a_minute_then_its_recovery() {
        let mut o = Outage::default();
        let start = Instant::now();
        assert_eq!(o.failed(start), Some(OutageLog::Started));
        let mut lines = 0;
        for s in 1..=150u64 {
            if o.failed(start + Duration::from_secs(s)).is_some() {
                lines += 1;
            }
        }
        assert_eq!(lines, 2, "one summary per minute");
        assert_eq!(
            o.succeeded(start + Duration::from_secs(151)),
            Some(OutageLog::Recovered {
                errors: 151,
                lasted: Duration::from_secs(151)
            })
        );
        assert_eq!(o.succeeded(start + Duration::from_secs(152)), None);
    }

    /// The server answering a watch ends the outage (one recovery line) and
    /// counts as an established watch; an answered list ends the outage
    /// but establishes nothing.
    #[test]
    fn answers_end_outages_and_watches_establish() {
        let h = SourceHealth::default();
        let t0 = Instant::now();
        h.failed(Kind::Service, &"refused", Duration::from_secs(1), t0);
        assert_eq!(h.outage_since(), Some(t0));
        let ok = http::StatusCode::OK;
        let t1 = t0 + Duration::from_secs(2);
        h.answered(Kind::Service, false, ok, &http::HeaderMap::new(), t1);
        assert_eq!(h.outage_since(), None);
        assert!(!h.established_since(Kind::Service, t0));
        h.answered(Kind::Service, true, ok, &http::HeaderMap::new(), t1);
        assert!(h.established_since(Kind::Service, t0));
        assert!(!h.established_since(Kind::EndpointSlice, t0));
        // A 500 is no answer that counts.
        let t2 = t1 + Duration::from_secs(1);
        h.failed(Kind::EndpointSlice, &"500", Duration::from_secs(1), t2);
        let bad = http::StatusCode::INTERNAL_SERVER_ERROR;
        h.answered(Kind::EndpointSlice, true, bad, &http::HeaderMap::new(), t2);
        assert_eq!(h.outage_since(), Some(t2));
    }

    #[test]
    fn retry_after_is_read_from_429_and_503_only_and_holds_until_it_passed() {
        let r = RetryAfter::default();
        let now = Instant::now();
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::RETRY_AFTER, "5".parse().unwrap());
        r.observe(http::StatusCode::OK, &headers, now);
        assert_eq!(r.floor(now), None);
        r.observe(http::StatusCode::TOO_MANY_REQUESTS, &headers, now);
        assert_eq!(r.floor(now), Some(Duration::from_secs(5)));
        // Every watch sees it, until the moment has passed.
        assert_eq!(
            r.floor(now + Duration::from_secs(2)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(r.floor(now + Duration::from_secs(6)), None);
    }
}
