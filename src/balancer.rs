//! Per-shard weighted server selection with passive health: ejection, probation, panic mode (SPEC §5).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::ejection_period;

/// Consecutive failures that eject a healthy server.
pub const FAILURES_TO_EJECT: u32 = 3;

/// Random draws from the table before `pick` falls back to a scan of the accepted servers.
/// On a first attempt the first draw is always accepted; more draws only help retries.
const FAST_DRAWS: usize = 4;

/// One server as the balancer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    /// `host:port` as the agent named it; with `addr` it identifies the server across sets.
    pub label: Arc<str>,
    pub addr: SocketAddr,
    /// Share of traffic relative to the other servers; 0 (or anything not finite and > 0)
    /// means draining.
    pub score: f64,
}

impl Backend {
    /// The score if it can take new requests, else 0.
    fn weight(&self) -> f64 {
        if self.score.is_finite() && self.score > 0.0 {
            self.score
        } else {
            0.0
        }
    }
}

/// How a request to a picked server went, for passive health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A connect failure, a reset before the response head, or a timeout.
    Failure,
}

/// A chosen server. Hand it back to [`Balancer::record`] when the request's fate is known,
/// even if the set was replaced meanwhile.
#[derive(Debug, Clone)]
pub struct Pick {
    /// Position in [`Balancer::backends`] of the generation the pick was made in.
    pub index: usize,
    pub generation: u64,
    pub backend: Backend,
    /// The end of the server's ejection when it was picked (panic mode sent the request
    /// anyway), which identifies that ejection; `None` when it was not ejected.
    pub ejected_until: Option<Instant>,
}

/// Passive-health state of one server.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Health {
    /// Taking traffic; `failures` in a row so far.
    Healthy { failures: u32 },
    /// Out of the table until `until`; `period` is what the next ejection doubles.
    Ejected { until: Instant, period: Duration },
    /// Back in the table after an ejection: one failure re-ejects, one success clears.
    Probation { period: Duration },
}

impl Health {
    const FRESH: Health = Health::Healthy { failures: 0 };

    fn is_ejected(&self) -> bool {
        matches!(self, Health::Ejected { .. })
    }

    /// The state after `outcome`, and whether the change matters to callers (an ejection
    /// began or a probation server recovered).
    fn after(self, outcome: Outcome, now: Instant) -> (Health, bool) {
        match (self, outcome) {
            (Health::Healthy { .. }, Outcome::Success) => (Health::FRESH, false),
            (Health::Healthy { failures }, Outcome::Failure)
                if failures + 1 >= FAILURES_TO_EJECT =>
            {
                (eject(None, now), true)
            }
            (Health::Healthy { failures }, Outcome::Failure) => (
                Health::Healthy {
                    failures: failures + 1,
                },
                false,
            ),
            // Requests that started before the ejection finish late; their outcomes say
            // nothing new, so they neither extend nor end it. Only time ends an ejection.
            (Health::Ejected { .. }, _) => (self, false),
            (Health::Probation { .. }, Outcome::Success) => (Health::FRESH, true),
            (Health::Probation { period }, Outcome::Failure) => (eject(Some(period), now), true),
        }
    }
}

fn eject(previous: Option<Duration>, now: Instant) -> Health {
    let period = ejection_period(previous);
    Health::Ejected {
        // An `Instant` that cannot be 60 s later is not a real clock; end the ejection at once.
        until: now.checked_add(period).unwrap_or(now),
        period,
    }
}

/// The immutable-between-rebuilds selection table: servers that can take traffic and the
/// running sum of their normalized scores, so a pick is one binary search.
#[derive(Debug, Default)]
struct Table {
    /// Indices into `Balancer::backends`.
    servers: Vec<usize>,
    /// `cumulative[i]` = sum of the weights of `servers[..=i]`, strictly positive steps.
    cumulative: Vec<f64>,
}

impl Table {
    /// The slot whose cumulative range holds `point` (in `0..total`).
    fn slot_at(&self, point: f64) -> usize {
        // Rounding can put `point` at `total`; that belongs to the last slot.
        let slot = self.cumulative.partition_point(|&c| c <= point);
        slot.min(self.cumulative.len() - 1)
    }
}

/// One shard's view of the server set: weighted random selection over the servers that can
/// take traffic, and passive health that ejects failing servers.
#[derive(Debug)]
pub struct Balancer {
    backends: Vec<Backend>,
    health: Vec<Health>,
    by_key: HashMap<(Arc<str>, SocketAddr), usize>,
    generation: u64,
    table: Table,
    ejected: usize,
    panic: bool,
    /// When the earliest ejection ends: `release_due` rebuilds then, not at the next tick.
    next_release: Option<Instant>,
}

impl Balancer {
    /// A balancer over `backends` (generation 0), all healthy.
    pub fn new(backends: Vec<Backend>, now: Instant) -> Self {
        let mut balancer = Self {
            health: vec![Health::FRESH; backends.len()],
            by_key: index_by_key(&backends),
            backends,
            generation: 0,
            table: Table::default(),
            ejected: 0,
            panic: false,
            next_release: None,
        };
        balancer.rebuild(now);
        balancer
    }

    /// Swap in a new set and rebuild the table. Health state (failures, ejection, probation)
    /// carries over for servers with the same label and addr; other servers start healthy.
    /// Returns the addrs of the previous set that can no longer take new requests (absent
    /// from the new set, or present only with score 0), so the caller can close their idle
    /// pooled connections.
    pub fn replace(&mut self, backends: Vec<Backend>, now: Instant) -> Vec<SocketAddr> {
        let serving: HashSet<SocketAddr> = backends
            .iter()
            .filter(|b| b.weight() > 0.0)
            .map(|b| b.addr)
            .collect();
        let mut reported = HashSet::new();
        let closed = self
            .backends
            .iter()
            .map(|b| b.addr)
            .filter(|addr| !serving.contains(addr) && reported.insert(*addr))
            .collect();
        self.health = backends
            .iter()
            .map(|b| {
                self.by_key
                    .get(&(Arc::clone(&b.label), b.addr))
                    .map_or(Health::FRESH, |&old| self.health[old])
            })
            .collect();
        self.by_key = index_by_key(&backends);
        self.backends = backends;
        self.generation += 1;
        self.rebuild(now);
        closed
    }

    /// Increments on every [`replace`](Self::replace); picks carry it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// End ejections whose time has passed (those servers enter probation) and recompute the
    /// selection table. Call it every second; `replace` calls it itself.
    pub fn rebuild(&mut self, now: Instant) {
        for health in &mut self.health {
            if let Health::Ejected { until, period } = *health {
                if until <= now {
                    *health = Health::Probation { period };
                }
            }
        }
        self.rebuild_table();
    }

    /// `rebuild` if an ejection has ended by `now`; true if it did (ejections changed). Cheap
    /// enough for every request, so an ejection lasts its period, not up to a tick more.
    pub fn release_due(&mut self, now: Instant) -> bool {
        if self.next_release.is_some_and(|release| release <= now) {
            self.rebuild(now);
            return true;
        }
        false
    }

    /// A random server, chosen in proportion to score among the servers that can take
    /// traffic and that `accept` approves (e.g. not yet tried for this request). O(log n)
    /// unless `accept` rejects several draws in a row; then one weighted scan over the
    /// accepted servers. `accept` may be called more than once per server.
    /// `None` when no acceptable server has a score > 0.
    pub fn pick(
        &self,
        rng: &mut fastrand::Rng,
        mut accept: impl FnMut(&Backend) -> bool,
    ) -> Option<Pick> {
        let total = *self.table.cumulative.last()?;
        for _ in 0..FAST_DRAWS {
            let index = self.table.servers[self.table.slot_at(rng.f64() * total)];
            if accept(&self.backends[index]) {
                return Some(self.pick_of(index));
            }
        }
        // Weighted reservoir sampling: one pass, no allocation, each accepted server kept
        // with probability weight / (weight seen so far), which ends proportional to weight.
        let mut chosen = None;
        let mut seen = 0.0;
        let mut previous = 0.0;
        for (&index, &cumulative) in self.table.servers.iter().zip(&self.table.cumulative) {
            let weight = cumulative - previous;
            previous = cumulative;
            if weight > 0.0 && accept(&self.backends[index]) {
                seen += weight;
                if rng.f64() * seen < weight {
                    chosen = Some(index);
                }
            }
        }
        chosen.map(|index| self.pick_of(index))
    }

    /// Passive health: count `outcome` against the picked server. Returns true when the
    /// change matters (an ejection began, which also rebuilds the table, or a probation
    /// server recovered). A pick from an older generation is matched by label and addr, and
    /// ignored if that server is gone.
    pub fn record(&mut self, pick: &Pick, outcome: Outcome, now: Instant) -> bool {
        let Some(index) = self.locate(pick) else {
            return false;
        };
        let before = self.health[index];
        let same_ejection =
            matches!(before, Health::Ejected { until, .. } if pick.ejected_until == Some(until));
        let (next, changed) = match (before, outcome) {
            // Panic mode sent this request to an ejected server, so its answer is news: a
            // success clears that ejection (SPEC §5), and panic mode ends as soon as one
            // server answers again rather than when its ejection runs out.
            (_, Outcome::Success) if same_ejection => (Health::FRESH, true),
            // Picked under an ejection that has ended since: a late answer to it is old news,
            // which must neither end a later ejection nor cut a probation short.
            _ if pick.ejected_until.is_some() && !same_ejection => (before, false),
            _ => before.after(outcome, now),
        };
        self.health[index] = next;
        // A recovered probation server is already in the table; only ejections change it.
        if changed && (next.is_ejected() || before.is_ejected()) {
            self.rebuild_table();
        }
        changed
    }

    /// Number of servers in the set (any score).
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// True when the set has no servers at all.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// The servers of the current set, in the order given (a pick's `index` points here).
    pub fn backends(&self) -> impl Iterator<Item = &Backend> {
        self.backends.iter()
    }

    /// Whether server `index` is ejected right now (whether or not panic mode ignores it).
    /// An ejection whose time has passed counts until `rebuild` notices it.
    pub fn is_ejected(&self, index: usize) -> bool {
        self.health.get(index).is_some_and(Health::is_ejected)
    }

    /// Number of servers ejected right now.
    pub fn ejected_count(&self) -> usize {
        self.ejected
    }

    /// True when every server with a score > 0 is ejected, so ejections are being ignored.
    pub fn panic_mode(&self) -> bool {
        self.panic
    }

    fn pick_of(&self, index: usize) -> Pick {
        Pick {
            index,
            generation: self.generation,
            backend: self.backends[index].clone(),
            ejected_until: match self.health[index] {
                Health::Ejected { until, .. } => Some(until),
                _ => None,
            },
        }
    }

    /// Whether the picked server still takes new requests: in the current set with a score
    /// above 0. A connection to one that was drained or removed since is not worth pooling.
    pub fn still_routes(&self, pick: &Pick) -> bool {
        if pick.generation == self.generation {
            return true; // picks come from the table, which holds servers with a score only
        }
        self.locate(pick)
            .is_some_and(|index| self.backends[index].weight() > 0.0)
    }

    fn locate(&self, pick: &Pick) -> Option<usize> {
        if pick.generation == self.generation {
            let current = self.backends.get(pick.index)?;
            let same = current.label == pick.backend.label && current.addr == pick.backend.addr;
            return same.then_some(pick.index);
        }
        let key = (Arc::clone(&pick.backend.label), pick.backend.addr);
        self.by_key.get(&key).copied()
    }

    /// Recompute the ejected count, panic mode and the selection table from current state.
    fn rebuild_table(&mut self) {
        // First the facts the table depends on, in one pass.
        let (mut ejected, mut max_live, mut max_any) = (0, 0.0, 0.0);
        let mut next_release: Option<Instant> = None;
        for (backend, health) in self.backends.iter().zip(&self.health) {
            let weight = backend.weight();
            if let Health::Ejected { until, .. } = *health {
                ejected += 1;
                next_release = Some(next_release.map_or(until, |r| r.min(until)));
            } else if weight > max_live {
                max_live = weight;
            }
            if weight > max_any {
                max_any = weight;
            }
        }
        let panic = max_live == 0.0 && max_any > 0.0;
        // Normalize by the largest included score so that sums of scores near f64::MAX stay
        // finite.
        let max = if panic { max_any } else { max_live };
        let table = &mut self.table;
        table.servers.clear();
        table.cumulative.clear();
        let mut total = 0.0;
        for (i, (backend, health)) in self.backends.iter().zip(&self.health).enumerate() {
            let weight = backend.weight();
            if weight == 0.0 || (health.is_ejected() && !panic) {
                continue;
            }
            let next = total + weight / max;
            // A score too small to move the sum could never be drawn; leaving it out keeps
            // every slot's width positive.
            if next > total {
                total = next;
                table.servers.push(i);
                table.cumulative.push(total);
            }
        }
        self.ejected = ejected;
        self.panic = panic;
        self.next_release = next_release;
    }
}

fn index_by_key(backends: &[Backend]) -> HashMap<(Arc<str>, SocketAddr), usize> {
    backends
        .iter()
        .enumerate()
        .map(|(i, b)| ((Arc::clone(&b.label), b.addr), i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn backend(i: usize, score: f64) -> Backend {
        let addr = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 80));
        Backend {
            label: addr.to_string().into(),
            addr,
            score,
        }
    }

    fn balancer(scores: &[f64], now: Instant) -> Balancer {
        let backends = scores
            .iter()
            .enumerate()
            .map(|(i, &s)| backend(i, s))
            .collect();
        Balancer::new(backends, now)
    }

    /// Picks per server index over `picks` draws with a fixed seed.
    fn counts(b: &Balancer, picks: usize, accept: impl Fn(&Backend) -> bool) -> Vec<usize> {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let mut counts = vec![0; b.len()];
        for _ in 0..picks {
            let pick = b
                .pick(&mut rng, &accept)
                .expect("a server can take traffic");
            assert!(accept(&pick.backend), "picked a rejected server");
            counts[pick.index] += 1;
        }
        counts
    }

    fn assert_shares(counts: &[usize], expected: &[f64], tolerance: f64) {
        let total: usize = counts.iter().sum();
        for (i, (&count, &share)) in counts.iter().zip(expected).enumerate() {
            let seen = count as f64 / total as f64;
            assert!(
                (seen - share).abs() <= tolerance,
                "server {i}: share {seen:.4}, expected {share:.4} (counts {counts:?})"
            );
        }
    }

    fn pick_of(b: &Balancer, index: usize) -> Pick {
        b.pick_of(index)
    }

    fn fail(b: &mut Balancer, index: usize, times: usize, now: Instant) {
        let pick = pick_of(b, index);
        for _ in 0..times {
            b.record(&pick, Outcome::Failure, now);
        }
    }

    /// Eject `index`, then for each next period: let the ejection end, fail the probation,
    /// and return the periods observed (the first ejection included).
    fn observed_periods(rounds: usize) -> Vec<u64> {
        let start = Instant::now();
        let mut b = balancer(&[1.0, 1.0], start);
        fail(&mut b, 0, 3, start);
        let mut now = start;
        let mut periods = Vec::new();
        for _ in 0..rounds {
            let Health::Ejected { until, period } = b.health[0] else {
                panic!("not ejected: {:?}", b.health[0]);
            };
            assert_eq!(until - now, period);
            b.rebuild(until - Duration::from_millis(1));
            assert!(b.is_ejected(0), "ended early");
            b.rebuild(until);
            assert!(!b.is_ejected(0), "did not end at {period:?}");
            periods.push(period.as_secs());
            now = until + SECOND;
            assert!(b.record(&pick_of(&b, 0), Outcome::Failure, now));
        }
        periods
    }

    #[test]
    fn picks_in_proportion_to_score_one_to_three() {
        let b = balancer(&[1.0, 3.0], Instant::now());
        assert_shares(&counts(&b, 100_000, |_| true), &[0.25, 0.75], 0.01);
    }

    #[test]
    fn picks_three_servers_in_proportion_to_score() {
        let b = balancer(&[1.0, 2.0, 5.0], Instant::now());
        assert_shares(&counts(&b, 100_000, |_| true), &[0.125, 0.25, 0.625], 0.01);
    }

    #[test]
    fn huge_scores_do_not_overflow() {
        let b = balancer(&[1e300, 3e300], Instant::now());
        assert_shares(&counts(&b, 100_000, |_| true), &[0.25, 0.75], 0.01);
        // Without normalization this sum would be infinite.
        let b = balancer(&[f64::MAX, f64::MAX], Instant::now());
        assert_shares(&counts(&b, 100_000, |_| true), &[0.5, 0.5], 0.01);
    }

    #[test]
    fn zero_score_server_is_never_picked() {
        let b = balancer(&[1.0, 0.0, 2.0, 0.0], Instant::now());
        let counts = counts(&b, 10_000, |_| true);
        assert_eq!((counts[1], counts[3]), (0, 0), "{counts:?}");
    }

    #[test]
    fn scores_that_are_not_finite_and_positive_count_as_draining() {
        let b = balancer(&[f64::NAN, -1.0, f64::INFINITY, 1.0], Instant::now());
        assert_eq!(counts(&b, 1_000, |_| true), [0, 0, 0, 1_000]);
    }

    #[test]
    fn empty_set_picks_nothing() {
        let b = balancer(&[], Instant::now());
        assert!(b.is_empty());
        assert!(b.pick(&mut fastrand::Rng::with_seed(1), |_| true).is_none());
    }

    #[test]
    fn all_zero_scores_pick_nothing() {
        let b = balancer(&[0.0, 0.0], Instant::now());
        assert!(b.pick(&mut fastrand::Rng::with_seed(1), |_| true).is_none());
        assert!(!b.panic_mode());
    }

    #[test]
    fn accept_filter_excludes_tried_servers_and_keeps_weights() {
        let b = balancer(&[1.0, 2.0, 3.0, 4.0], Instant::now());
        let tried = backend(3, 4.0).label;
        let counts = counts(&b, 100_000, |s| s.label != tried);
        assert_eq!(counts[3], 0);
        assert_shares(&counts, &[1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0, 0.0], 0.01);
    }

    #[test]
    fn fallback_scan_keeps_weights_when_the_heavy_server_was_tried() {
        // The tried server holds almost all weight, so nearly every pick takes the scan.
        let b = balancer(&[1.0, 2.0, 3.0, 10_000.0], Instant::now());
        let tried = backend(3, 0.0).label;
        let counts = counts(&b, 100_000, |s| s.label != tried);
        assert_shares(&counts, &[1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0, 0.0], 0.01);
    }

    #[test]
    fn accept_rejecting_everything_picks_nothing() {
        let b = balancer(&[1.0, 2.0], Instant::now());
        assert!(b
            .pick(&mut fastrand::Rng::with_seed(1), |_| false)
            .is_none());
    }

    #[test]
    fn three_consecutive_failures_eject() {
        let now = Instant::now();
        let mut b = balancer(&[1.0, 1.0], now);
        let pick = pick_of(&b, 0);
        assert!(!b.record(&pick, Outcome::Failure, now));
        assert!(!b.record(&pick, Outcome::Failure, now));
        assert!(b.record(&pick, Outcome::Failure, now));
        assert!(b.is_ejected(0));
        assert_eq!(b.ejected_count(), 1);
        assert_eq!(counts(&b, 1_000, |_| true), [0, 1_000]);
    }

    #[test]
    fn two_failures_do_not_eject() {
        let now = Instant::now();
        let mut b = balancer(&[1.0, 1.0], now);
        fail(&mut b, 0, 2, now);
        assert!(!b.is_ejected(0));
        assert_eq!(b.ejected_count(), 0);
    }

    #[test]
    fn success_resets_consecutive_failures() {
        let now = Instant::now();
        let mut b = balancer(&[1.0, 1.0], now);
        let pick = pick_of(&b, 0);
        for outcome in [
            Outcome::Failure,
            Outcome::Success,
            Outcome::Failure,
            Outcome::Failure,
        ] {
            assert!(!b.record(&pick, outcome, now));
        }
        assert!(!b.is_ejected(0));
        assert!(b.record(&pick, Outcome::Failure, now));
        assert!(b.is_ejected(0));
    }

    #[test]
    fn ejection_ends_after_five_seconds_via_rebuild() {
        let start = Instant::now();
        let mut b = balancer(&[1.0, 1.0], start);
        fail(&mut b, 0, 3, start);
        b.rebuild(start + 4 * SECOND);
        assert!(b.is_ejected(0));
        assert_eq!(counts(&b, 1_000, |_| true), [0, 1_000]);
        b.rebuild(start + 5 * SECOND);
        assert!(!b.is_ejected(0));
        assert_eq!(b.ejected_count(), 0);
        assert!(counts(&b, 1_000, |_| true)[0] > 0);
    }

    #[test]
    fn an_ejection_is_released_when_it_ends_not_at_the_next_rebuild() {
        let start = Instant::now();
        let mut b = balancer(&[1.0, 1.0, 1.0], start);
        assert!(!b.release_due(start + 60 * SECOND), "nothing ejected");
        fail(&mut b, 0, 3, start);
        fail(&mut b, 1, 3, start + SECOND);
        assert!(!b.release_due(start + 5 * SECOND - Duration::from_millis(1)));
        assert!(b.is_ejected(0));
        assert!(
            b.release_due(start + 5 * SECOND),
            "the first ejection ends at 5 s"
        );
        assert!(!b.is_ejected(0));
        assert!(b.is_ejected(1));
        assert!(counts(&b, 1_000, |_| true)[0] > 0, "back in the table");
        assert!(!b.release_due(start + 5 * SECOND + Duration::from_millis(500)));
        assert!(
            b.release_due(start + 6 * SECOND),
            "then the second, 5 s after its own"
        );
        assert_eq!(b.ejected_count(), 0);
        assert!(!b.release_due(start + 60 * SECOND), "none left");
    }

    #[test]
    fn probation_failures_eject_for_twice_the_period_up_to_60_seconds() {
        assert_eq!(observed_periods(6), [5, 10, 20, 40, 60, 60]);
    }

    #[test]
    fn probation_success_clears_completely() {
        let start = Instant::now();
        let mut b = balancer(&[1.0, 1.0], start);
        fail(&mut b, 0, 3, start);
        b.rebuild(start + 5 * SECOND);
        let now = start + 6 * SECOND;
        assert!(b.record(&pick_of(&b, 0), Outcome::Success, now));
        // Healthy again: two failures are tolerated, and the third ejects for 5 s, not 10 s.
        fail(&mut b, 0, 2, now);
        assert!(!b.is_ejected(0));
        fail(&mut b, 0, 1, now);
        assert_eq!(
            b.health[0],
            Health::Ejected {
                until: now + 5 * SECOND,
                period: 5 * SECOND
            }
        );
    }

    #[test]
    fn failures_while_ejected_do_not_extend_it() {
        let start = Instant::now();
        let mut b = balancer(&[1.0, 1.0], start);
        // Picked before the ejection, finished after it.
        let pick = pick_of(&b, 0);
        fail(&mut b, 0, 3, start);
        assert!(!b.record(&pick, Outcome::Failure, start + 4 * SECOND));
        assert!(!b.record(&pick, Outcome::Success, start + 4 * SECOND));
        b.rebuild(start + 5 * SECOND);
        assert!(!b.is_ejected(0));
    }

    #[test]
    fn panic_mode_when_every_scored_server_is_ejected() {
        let now = Instant::now();
        let mut b = balancer(&[1.0, 3.0, 0.0], now);
        fail(&mut b, 0, 3, now);
        assert!(!b.panic_mode());
        fail(&mut b, 1, 3, now);
        assert!(b.panic_mode());
        assert_eq!(b.ejected_count(), 2);
        assert!(b.is_ejected(0) && b.is_ejected(1));
        // Picks still succeed, in proportion, and never reach the draining server.
        assert_shares(&counts(&b, 100_000, |_| true), &[0.25, 0.75, 0.0], 0.01);
    }

    #[test]
    fn panic_mode_ends_when_one_server_recovers() {
        let start = Instant::now();
        let mut b = balancer(&[1.0, 1.0], start);
        fail(&mut b, 0, 3, start);
        fail(&mut b, 1, 3, start + 2 * SECOND);
        assert!(b.panic_mode());
        b.rebuild(start + 5 * SECOND);
        assert!(!b.panic_mode());
        assert_eq!(b.ejected_count(), 1);
        assert_eq!(counts(&b, 1_000, |_| true), [1_000, 0]);
    }

    #[test]
    fn a_success_in_panic_mode_clears_that_ejection_and_ends_panic_mode() {
        let start = Instant::now();
        let mut b = balancer(&[1.0, 1.0], start);
        fail(&mut b, 0, 3, start);
        fail(&mut b, 1, 3, start);
        assert!(b.panic_mode());
        let in_panic = pick_of(&b, 1);
        assert!(in_panic.ejected_until.is_some());
        // A failure of a panic pick does not extend the ejection; a success ends it.
        assert!(!b.record(&pick_of(&b, 0), Outcome::Failure, start + SECOND));
        assert!(b.record(&in_panic, Outcome::Success, start + SECOND));
        assert!(!b.is_ejected(1));
        assert!(!b.panic_mode());
        assert_eq!(b.ejected_count(), 1);
        assert_eq!(counts(&b, 1_000, |_| true), [0, 1_000]);
        b.rebuild(start + 5 * SECOND);
        assert!(!b.is_ejected(0), "server 0's period was not extended");
    }

    #[test]
    fn a_late_answer_to_a_panic_pick_says_nothing_about_a_later_state() {
        let start = Instant::now();
        let mut b = balancer(&[1.0, 1.0], start);
        fail(&mut b, 0, 3, start);
        fail(&mut b, 1, 3, start);
        let old_pick = pick_of(&b, 0);
        // Server 0's ejection runs out; it fails in probation and is ejected again (10 s).
        b.rebuild(start + 5 * SECOND);
        assert!(!b.is_ejected(0));
        assert!(b.record(&pick_of(&b, 0), Outcome::Failure, start + 6 * SECOND));
        assert!(b.is_ejected(0));
        // The request picked under the first ejection succeeds late: the second one stays.
        assert!(!b.record(&old_pick, Outcome::Success, start + 7 * SECOND));
        assert!(b.is_ejected(0));
        b.rebuild(start + 16 * SECOND);
        assert!(!b.is_ejected(0), "ended at its own time");
        // In probation now: a late failure of the old pick does not eject it again.
        assert!(!b.record(&old_pick, Outcome::Failure, start + 17 * SECOND));
        assert!(!b.is_ejected(0));
        assert!(b.record(&pick_of(&b, 0), Outcome::Success, start + 17 * SECOND));
    }

    #[test]
    fn a_pick_still_routes_until_its_server_is_drained_or_removed() {
        let now = Instant::now();
        let mut b = balancer(&[1.0, 1.0, 1.0], now);
        let picks: Vec<Pick> = (0..3).map(|i| pick_of(&b, i)).collect();
        assert!(picks.iter().all(|p| b.still_routes(p)));
        // Server 0 keeps its score, 1 drains, 2 leaves the set.
        b.replace(vec![backend(0, 2.0), backend(1, 0.0)], now);
        assert!(b.still_routes(&picks[0]));
        assert!(!b.still_routes(&picks[1]));
        assert!(!b.still_routes(&picks[2]));
    }

    #[test]
    fn replace_carries_health_for_same_label_and_addr() {
        let now = Instant::now();
        let mut b = balancer(&[1.0, 1.0], now);
        fail(&mut b, 0, 3, now);
        fail(&mut b, 1, 2, now);
        b.replace(vec![backend(5, 1.0), backend(1, 7.0), backend(0, 2.0)], now);
        assert_eq!(b.generation(), 1);
        assert!(b.is_ejected(2), "server 0 (now index 2) stays ejected");
        assert!(!b.is_ejected(1));
        // Server 1 kept its two failures: one more ejects it.
        assert!(b.record(&pick_of(&b, 1), Outcome::Failure, now));
    }

    #[test]
    fn replace_drops_health_when_addr_changes() {
        let now = Instant::now();
        let mut b = balancer(&[1.0, 1.0], now);
        fail(&mut b, 0, 3, now);
        let moved = Backend {
            addr: SocketAddr::from(([10, 9, 9, 9], 80)),
            ..backend(0, 1.0)
        };
        b.replace(vec![moved, backend(1, 1.0)], now);
        assert!(!b.is_ejected(0));
        assert_eq!(b.ejected_count(), 0);
    }

    #[test]
    fn replace_returns_removed_and_zero_score_addrs() {
        let now = Instant::now();
        let mut b = balancer(&[1.0, 1.0, 1.0, 1.0], now);
        let closed = b.replace(
            vec![
                backend(0, 1.0),
                backend(1, 0.0),
                backend(3, 2.0),
                backend(9, 1.0),
            ],
            now,
        );
        assert_eq!(closed, [backend(1, 0.0).addr, backend(2, 0.0).addr]);
        assert_eq!(b.len(), 4);
        assert_eq!(counts(&b, 1_000, |_| true)[1], 0);
    }

    #[test]
    fn generation_increments_on_every_replace() {
        let now = Instant::now();
        let mut b = balancer(&[1.0], now);
        for expected in 1..=3 {
            b.replace(vec![backend(0, 1.0)], now);
            assert_eq!(b.generation(), expected);
        }
    }

    #[test]
    fn stale_pick_after_replace_records_by_label() {
        let now = Instant::now();
        let mut b = balancer(&[1.0, 1.0], now);
        let stale = pick_of(&b, 0);
        b.replace(vec![backend(7, 1.0), backend(1, 1.0), backend(0, 1.0)], now);
        for _ in 0..3 {
            b.record(&stale, Outcome::Failure, now);
        }
        assert!(b.is_ejected(2), "the server moved to index 2");
        assert!(!b.is_ejected(0));
    }

    #[test]
    fn stale_pick_for_removed_server_is_ignored() {
        let now = Instant::now();
        let mut b = balancer(&[1.0, 1.0], now);
        let stale = pick_of(&b, 0);
        b.replace(vec![backend(1, 1.0)], now);
        for _ in 0..3 {
            assert!(!b.record(&stale, Outcome::Failure, now));
        }
        assert_eq!(b.ejected_count(), 0);
    }

    #[test]
    fn pick_reports_generation_and_backend() {
        let now = Instant::now();
        let mut b = balancer(&[1.0], now);
        b.replace(vec![backend(4, 2.0)], now);
        let pick = b
            .pick(&mut fastrand::Rng::with_seed(1), |_| true)
            .expect("one server");
        assert_eq!((pick.index, pick.generation), (0, 1));
        assert_eq!(pick.backend, backend(4, 2.0));
        assert_eq!(b.backends().collect::<Vec<_>>(), [&backend(4, 2.0)]);
    }

    #[test]
    fn ten_thousand_servers_stay_proportional() {
        let scores: Vec<f64> = (0..10_000).map(|i| (i % 4 + 1) as f64).collect();
        let b = balancer(&scores, Instant::now());
        let counts = counts(&b, 200_000, |_| true);
        let mut by_score = [0; 4];
        for (i, count) in counts.iter().enumerate() {
            by_score[i % 4] += count;
        }
        assert_shares(&by_score, &[0.1, 0.2, 0.3, 0.4], 0.01);
        // A sample of single servers: score 4 of 25,000 total gets 32 of 200,000 on average.
        let sample: Vec<usize> = (3..10_000).step_by(400).map(|i| counts[i]).collect();
        let mean = sample.iter().sum::<usize>() as f64 / sample.len() as f64;
        assert!((mean - 32.0).abs() < 4.0, "{mean} {sample:?}");
    }
}
