//! The restart policy of RELIABILITY.md §10: exponential backoff (250 ms doubling, 30 s cap,
//! ±20 % jitter); more than 5 restarts within 120 s makes the replica `failed` until an admin
//! reload; 300 s without a failure resets the backoff. Time is tokio's clock, so tests can run
//! the policy in paused (virtual) time.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// First backoff delay.
pub const BASE_DELAY: Duration = Duration::from_millis(250);
/// Longest backoff delay.
pub const MAX_DELAY: Duration = Duration::from_secs(30);
/// Window in which restarts are counted.
pub const INTENSITY_WINDOW: Duration = Duration::from_secs(120);
/// Restarts allowed within the window; one more failure gives up.
pub const MAX_RESTARTS: usize = 5;
/// Quiet time after which the backoff starts over.
pub const QUIET_RESET: Duration = Duration::from_secs(300);
/// Relative jitter applied to each delay.
pub const JITTER: f64 = 0.2;

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Restart after this delay.
    RestartAfter(Duration),
    /// Too many restarts: mark the replica failed.
    GiveUp,
}

/// One replica's failure history.
#[derive(Debug, Clone, Default)]
pub struct RestartTracker {
    failures: VecDeque<Instant>,
    consecutive: u32,
    last_failure: Option<Instant>,
}

impl RestartTracker {
    /// Records a failure at `now`. `jitter` in [-1, 1] scales the ±20 % jitter (0 = none).
    pub fn on_failure(&mut self, now: Instant, jitter: f64) -> Decision {
        if self
            .last_failure
            .is_some_and(|last| now.duration_since(last) >= QUIET_RESET)
        {
            self.consecutive = 0;
        }
        self.last_failure = Some(now);
        while self
            .failures
            .front()
            .is_some_and(|at| now.duration_since(*at) > INTENSITY_WINDOW)
        {
            self.failures.pop_front();
        }
        self.failures.push_back(now);
        if self.failures.len() > MAX_RESTARTS {
            return Decision::GiveUp;
        }
        let exponent = self.consecutive.min(16);
        self.consecutive += 1;
        let delay = BASE_DELAY.saturating_mul(1 << exponent).min(MAX_DELAY);
        let factor = 1.0 + JITTER * jitter.clamp(-1.0, 1.0);
        Decision::RestartAfter(delay.mul_f64(factor))
    }

    /// Forgets every failure (after an admin reload).
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_250ms_and_the_sixth_failure_in_the_window_gives_up() {
        let start = Instant::now();
        let mut tracker = RestartTracker::default();
        let delays: Vec<Decision> = (0..6)
            .map(|i| tracker.on_failure(start + Duration::from_secs(i), 0.0))
            .collect();
        let ms = |n| Decision::RestartAfter(Duration::from_millis(n));
        assert_eq!(
            delays,
            vec![
                ms(250),
                ms(500),
                ms(1000),
                ms(2000),
                ms(4000),
                Decision::GiveUp
            ]
        );
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let mut tracker = RestartTracker::default();
        let now = Instant::now();
        assert_eq!(
            tracker.on_failure(now, 1.0),
            Decision::RestartAfter(Duration::from_millis(300))
        );
        let mut tracker = RestartTracker::default();
        assert_eq!(
            tracker.on_failure(now, -1.0),
            Decision::RestartAfter(Duration::from_millis(200))
        );
    }

    #[test]
    fn failures_spread_over_the_window_keep_restarting_and_the_delay_caps() {
        let start = Instant::now();
        let mut tracker = RestartTracker::default();
        let mut last = Decision::GiveUp;
        for i in 0..12 {
            last = tracker.on_failure(start + Duration::from_secs(60 * i), 0.0);
            assert_ne!(last, Decision::GiveUp, "failure {i}");
        }
        assert_eq!(last, Decision::RestartAfter(MAX_DELAY));
    }

    #[test]
    fn quiet_time_resets_the_backoff() {
        let start = Instant::now();
        let mut tracker = RestartTracker::default();
        tracker.on_failure(start, 0.0);
        tracker.on_failure(start + Duration::from_secs(1), 0.0);
        let after_quiet = tracker.on_failure(start + Duration::from_secs(400), 0.0);
        assert_eq!(after_quiet, Decision::RestartAfter(BASE_DELAY));
    }
}
