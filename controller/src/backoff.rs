//! Exponential backoff for API server outages: the controllers retry forever and never exit,
//! so a restarting API server never turns into a crash loop. Each delay carries random jitter
//! (backon's), so a fleet of nodes that lost the API server together does not come back in step.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// Delays from `min`, doubling up to `max`, each plus up to as much again of jitter: the
    /// k-th delay lies in `[b, 2b)` with `b = min(min · 2^k, max)`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self::from_builder(
            ExponentialBuilder::default()
                .with_min_delay(min)
                .with_max_delay(max)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times(),
            max,
        )
    }

    fn from_builder(builder: ExponentialBuilder, max: Duration) -> Self {
        Backoff {
            delays: builder.build(),
            builder,
            max,
        }
    }

    /// The delay to wait now.
    pub fn next_delay(&mut self) -> Duration {
        // Without a limit on attempts the iterator never ends; the cap is the fallback anyway.
        self.delays.next().unwrap_or(self.max)
    }

    /// Back to the minimum, after a success.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

impl Default for Backoff {
    /// 0.5 s doubling to 30 s; with jitter no wait exceeds a minute.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_and_resets() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(5));
        let bases = [1, 2, 4, 5, 5, 5].map(Duration::from_secs);
        let mut sequences = std::collections::BTreeSet::new();
        for seed in 0..32 {
            let mut b = Backoff::from_builder(
                ExponentialBuilder::default()
                    .with_min_delay(min)
                    .with_max_delay(max)
                    .with_factor(2.0)
                    .with_jitter()
                    .with_jitter_seed(seed)
                    .without_max_times(),
                max,
            );
            let delays: Vec<Duration> = bases.iter().map(|_| b.next_delay()).collect();
            for (d, base) in delays.iter().zip(bases) {
                assert!(*d >= base && *d < base * 2, "seed {seed}: {delays:?}");
            }
            b.reset();
            let first = b.next_delay();
            assert!(first >= min && first < min * 2, "reset: {first:?}");
            sequences.insert(delays);
        }
        assert!(
            sequences.len() > 16,
            "the delays are jittered: {} distinct",
            sequences.len()
        );
        // The default's worst wait stays under a minute.
        let mut b = Backoff::default();
        assert!(
            (0..20)
                .map(|_| b.next_delay())
                .all(|d| d < Duration::from_secs(60))
        );
    }
}
