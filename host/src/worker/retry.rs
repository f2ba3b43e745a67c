//! When a failed run is tried again, and how long it waits first.

use std::time::Duration;

use crate::runtime::RunError;
use crate::task::TaskOptions;

/// Retries after the first attempt when neither the task nor the enqueue says.
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// The first backoff delay; it doubles with each attempt.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
/// The longest backoff delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(600);

/// The retry settings of one task, from its declared options and the enqueue's overrides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub jitter: bool,
}

impl RetryPolicy {
    pub fn new(options: &TaskOptions, max_retries_override: Option<u32>) -> RetryPolicy {
        RetryPolicy {
            max_retries: max_retries_override
                .or(options.max_retries)
                .unwrap_or(DEFAULT_MAX_RETRIES),
            backoff: options
                .retry_backoff_ms
                .map_or(DEFAULT_BACKOFF, Duration::from_millis),
            backoff_max: options
                .retry_backoff_max_ms
                .map_or(DEFAULT_BACKOFF_MAX, Duration::from_millis),
            jitter: options.retry_jitter.unwrap_or(true),
        }
    }

    /// The delay before the next attempt after `attempt` (1-based) ended in `error`, or `None`
    /// when the task must not run again: it was rejected or revoked, or retries are used up.
    /// A retry the guest asked for waits as long as it asked.
    pub fn next_delay(&self, attempt: u32, error: &RunError) -> Option<Duration> {
        if attempt > self.max_retries {
            return None;
        }
        match error {
            RunError::Rejected(_) | RunError::Revoked => None,
            RunError::Retry { after, .. } => Some(*after),
            _ => Some(self.backoff(attempt)),
        }
    }

    /// Exponential backoff: `backoff * 2^(attempt-1)`, capped; with jitter, a random delay
    /// between half of that and all of it, so that retries of many tasks spread out.
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(31));
        let delay = self.backoff.saturating_mul(factor).min(self.backoff_max);
        if self.jitter {
            delay / 2 + delay.mul_f64(fastrand::f64() / 2.0)
        } else {
            delay
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: bool) -> RetryPolicy {
        RetryPolicy {
            max_retries: 3,
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_millis(350),
            jitter,
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let failed = RunError::Failed("boom".into());
        let delays: Vec<_> = (1..=4)
            .map(|a| policy(false).next_delay(a, &failed))
            .collect();
        assert_eq!(
            delays,
            [Some(100), Some(200), Some(350), None].map(|ms| ms.map(Duration::from_millis))
        );
    }

    #[test]
    fn jitter_stays_within_half_and_all_of_the_delay() {
        let failed = RunError::Failed("boom".into());
        for _ in 0..100 {
            let delay = policy(true).next_delay(2, &failed).unwrap();
            assert!((100..=200).contains(&delay.as_millis()), "{delay:?}");
        }
    }

    #[test]
    fn guest_retry_after_is_honoured_and_rejections_never_retry() {
        let retry = RunError::Retry {
            after: Duration::from_secs(7),
            message: "busy".into(),
        };
        assert_eq!(
            policy(true).next_delay(1, &retry),
            Some(Duration::from_secs(7))
        );
        assert_eq!(policy(true).next_delay(4, &retry), None);
        assert_eq!(
            policy(true).next_delay(1, &RunError::Rejected("bad".into())),
            None
        );
        assert_eq!(policy(true).next_delay(1, &RunError::Revoked), None);
    }

    #[test]
    fn enqueue_overrides_the_declared_maximum() {
        let options = TaskOptions {
            max_retries: Some(5),
            ..TaskOptions::default()
        };
        assert_eq!(RetryPolicy::new(&options, None).max_retries, 5);
        assert_eq!(RetryPolicy::new(&options, Some(0)).max_retries, 0);
        assert_eq!(
            RetryPolicy::new(&TaskOptions::default(), None).max_retries,
            DEFAULT_MAX_RETRIES
        );
    }
}
