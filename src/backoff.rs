//! Delay arithmetic: exponential backoff with a cap and jitter, and passive-health ejection periods.

use std::time::Duration;

/// Jitter applied to every backoff delay: each delay lands within ±20 % of its base.
pub const JITTER_FRACTION: f64 = 0.2;

/// How long a server is ejected the first time it fails too often.
pub const FIRST_EJECTION: Duration = Duration::from_secs(5);

/// The longest ejection, however often a server fails its probation.
pub const MAX_EJECTION: Duration = Duration::from_secs(60);

/// Exponential backoff: the base delay starts at `initial`, doubles after every delay handed
/// out, and never exceeds `max`; every delay is jittered so that many clients do not retry in
/// lockstep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`. If `max < initial`, the first delay
    /// is already `max`: the cap wins because it is the operator's promise.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay: the current base with uniform jitter within ±20 %, never above `max`.
    /// Afterwards the base doubles, capped at `max`.
    pub fn next_delay(&mut self, rng: &mut fastrand::Rng) -> Duration {
        let drawn = jitter(self.current, JITTER_FRACTION, rng);
        // Above the cap, reflect rather than clip: clipping would give half of all capped
        // delays the exact same value, and a fleet would retry in lockstep.
        let delay = if drawn > self.max {
            self.max.saturating_sub(drawn - self.max)
        } else {
            drawn
        };
        self.current = self.current.saturating_mul(2).min(self.max);
        delay
    }

    /// Start again from `initial` (after a connection that proved the peer is healthy).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// A duration drawn uniformly from `[base * (1 - fraction), base * (1 + fraction)]`.
///
/// `fraction` is clamped to `0..=1` (NaN counts as 0) so the result is never negative, and the
/// upper end saturates at `Duration::MAX` instead of overflowing.
pub fn jitter(base: Duration, fraction: f64, rng: &mut fastrand::Rng) -> Duration {
    let fraction = if fraction.is_nan() {
        0.0
    } else {
        fraction.clamp(0.0, 1.0)
    };
    let spread = scale(base, fraction).min(base);
    let low = base.saturating_sub(spread);
    let width = spread.saturating_mul(2);
    low.saturating_add(scale(width, rng.f64()))
}

/// `duration * factor` for a factor in `0..=1`, saturating instead of panicking where
/// `Duration::mul_f64` would (f64 rounding can push values near `Duration::MAX` past it).
fn scale(duration: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(duration.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

/// The length of the next ejection: 5 s the first time, then twice the previous period,
/// capped at 60 s.
pub fn ejection_period(previous: Option<Duration>) -> Duration {
    match previous {
        None => FIRST_EJECTION,
        Some(previous) => previous.saturating_mul(2).min(MAX_EJECTION),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn within(delay: Duration, base: Duration, fraction: f64) -> bool {
        delay >= base.mul_f64(1.0 - fraction) && delay <= base.mul_f64(1.0 + fraction)
    }

    #[test]
    fn first_delays_are_100_200_400_ms_within_20_percent() {
        for seed in 0..1_000 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut backoff = Backoff::new(100 * MS, Duration::from_secs(30));
            for base in [100, 200, 400, 800] {
                let delay = backoff.next_delay(&mut rng);
                assert!(
                    within(delay, base * MS, 0.2),
                    "seed {seed}: {delay:?} vs {base}ms"
                );
            }
        }
    }

    #[test]
    fn delay_is_never_above_max() {
        let mut rng = fastrand::Rng::with_seed(7);
        let max = Duration::from_millis(1_500);
        let mut backoff = Backoff::new(100 * MS, max);
        for i in 0..10_000 {
            if i % 37 == 0 {
                backoff.reset();
            }
            assert!(backoff.next_delay(&mut rng) <= max);
        }
    }

    #[test]
    fn cap_is_reached_and_stays() {
        let mut rng = fastrand::Rng::with_seed(11);
        let max = Duration::from_secs(30);
        let mut backoff = Backoff::new(100 * MS, max);
        // 100 ms doubles past 30 s after 9 steps; from then on every base is the cap.
        for _ in 0..9 {
            backoff.next_delay(&mut rng);
        }
        for _ in 0..1_000 {
            let delay = backoff.next_delay(&mut rng);
            assert!(delay <= max && delay >= max.mul_f64(0.8), "{delay:?}");
        }
    }

    #[test]
    fn reset_goes_back_to_initial() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut backoff = Backoff::new(100 * MS, Duration::from_secs(30));
        for _ in 0..20 {
            backoff.next_delay(&mut rng);
        }
        backoff.reset();
        let delay = backoff.next_delay(&mut rng);
        assert!(within(delay, 100 * MS, 0.2), "{delay:?}");
    }

    #[test]
    fn max_below_initial_starts_at_max() {
        let mut rng = fastrand::Rng::with_seed(5);
        let max = Duration::from_millis(50);
        let mut backoff = Backoff::new(100 * MS, max);
        for _ in 0..100 {
            let delay = backoff.next_delay(&mut rng);
            assert!(delay <= max && delay >= max.mul_f64(0.8), "{delay:?}");
        }
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let mut rng = fastrand::Rng::with_seed(42);
        let base = Duration::from_millis(1_000);
        let (mut low, mut high) = (Duration::MAX, Duration::ZERO);
        for _ in 0..10_000 {
            let delay = jitter(base, 0.2, &mut rng);
            assert!(within(delay, base, 0.2), "{delay:?}");
            low = low.min(delay);
            high = high.max(delay);
        }
        // Uniform over the whole band, not bunched at the base.
        assert!(low < 810 * MS && high > 1_190 * MS, "{low:?}..{high:?}");
    }

    #[test]
    fn jitter_handles_extreme_inputs() {
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(jitter(Duration::ZERO, 0.2, &mut rng), Duration::ZERO);
        assert_eq!(jitter(MS, f64::NAN, &mut rng), MS);
        assert_eq!(jitter(MS, 0.0, &mut rng), MS);
        assert!(jitter(MS, 5.0, &mut rng) <= 2 * MS);
        assert!(jitter(Duration::MAX, 0.2, &mut rng) >= Duration::MAX / 2);
        assert!(jitter(Duration::MAX, 1.0, &mut rng) <= Duration::MAX);
    }

    #[test]
    fn ejection_periods_go_5_10_20_40_60_60() {
        let mut previous = None;
        let mut seen = Vec::new();
        for _ in 0..6 {
            let period = ejection_period(previous);
            seen.push(period.as_secs());
            previous = Some(period);
        }
        assert_eq!(seen, [5, 10, 20, 40, 60, 60]);
    }

    #[test]
    fn ejection_period_never_exceeds_cap() {
        for secs in [0, 1, 29, 30, 31, 59, 60, 3_600, u64::MAX] {
            let period = ejection_period(Some(Duration::from_secs(secs)));
            assert!(period <= MAX_EJECTION, "{secs}: {period:?}");
        }
    }

    #[test]
    fn capped_delays_stay_spread_below_the_cap() {
        let mut rng = fastrand::Rng::with_seed(1);
        let max = Duration::from_millis(400);
        let mut b = Backoff::new(Duration::from_millis(100), max);
        b.next_delay(&mut rng);
        b.next_delay(&mut rng);
        let mut at_cap = 0;
        for _ in 0..10_000 {
            let d = b.next_delay(&mut rng);
            assert!(d <= max && d >= max.mul_f64(0.8), "{d:?}");
            at_cap += usize::from(d == max);
        }
        assert!(
            at_cap < 100,
            "{at_cap} of 10000 capped delays equal the cap"
        );
    }
}
