//! Autoscaling: the number of run slots follows the work at hand.
//!
//! Every [`TICK`], the worker looks at its slots. All busy and more work waiting (deliveries
//! held without a slot, or ready entries on its queues) grows the slots by what waits, at most
//! to `max`, once `up_cooldown` has passed since the last change. Slots left unused for `idle`
//! shrink back to what is in use, at least `min`; slots taken away leave as their runs end.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Shared;

/// How often the autoscaler looks.
const TICK: Duration = Duration::from_millis(250);

/// Bounds and pace of autoscaling (`worker start --autoscale MIN:MAX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Autoscale {
    pub min: usize,
    pub max: usize,
    /// Least time between two changes upwards.
    pub up_cooldown: Duration,
    /// How long slots stay unused before they are taken away (also the least time between a
    /// change and a shrink).
    pub idle: Duration,
}

impl Autoscale {
    /// Parses `MIN:MAX` (or `MAX`, meaning `1:MAX`), with the default pace.
    pub fn parse(text: &str) -> Result<Autoscale, String> {
        let (min, max) = match text.split_once(':') {
            Some((min, max)) => (min, max),
            None => ("1", text),
        };
        let number = |part: &str| {
            part.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{text}` is not MIN:MAX (two whole numbers)"))
        };
        let (min, max) = (number(min)?, number(max)?);
        if min == 0 || min > max {
            return Err(format!(
                "autoscale `{text}`: MIN must be at least 1 and at most MAX"
            ));
        }
        Ok(Autoscale {
            min,
            max,
            up_cooldown: Duration::from_secs(1),
            idle: Duration::from_secs(30),
        })
    }
}

pub(super) async fn run(shared: Arc<Shared>) {
    let Some(autoscale) = shared.config.autoscale else {
        return;
    };
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut changed_at = Instant::now();
    let mut idle_since: Option<Instant> = None;
    loop {
        ticks.tick().await;
        let concurrency = shared.concurrency.load(Ordering::SeqCst);
        let busy = shared.busy.load(Ordering::SeqCst);
        let held = shared.running().len();
        let waiting = held.saturating_sub(busy);
        if busy >= concurrency {
            idle_since = None;
            if concurrency >= autoscale.max || changed_at.elapsed() < autoscale.up_cooldown {
                continue;
            }
            let more = match waiting {
                0 => usize::from(backlog(&shared).await),
                waiting => waiting,
            };
            if more > 0 {
                shared.set_concurrency((concurrency + more).min(autoscale.max));
                changed_at = Instant::now();
            }
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if concurrency > autoscale.min
            && since.elapsed() >= autoscale.idle
            && changed_at.elapsed() >= autoscale.idle
        {
            shared.set_concurrency((busy + waiting).clamp(autoscale.min, autoscale.max));
            changed_at = Instant::now();
            idle_since = None;
        }
    }
}

/// Whether the worker's queues have entries ready (when nothing waits in the worker itself,
/// as without prefetch).
async fn backlog(shared: &Shared) -> bool {
    let queues: Vec<String> = {
        let paused = shared.paused.borrow();
        shared
            .config
            .fetched_queues()
            .into_iter()
            .filter(|queue| !paused.contains(queue))
            .collect()
    };
    for queue in &queues {
        match shared.broker.stats(queue).await {
            Ok(stats) if stats.ready > 0 => return true,
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, queue, "reading the queue's backlog failed"),
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bounds_and_refuses_nonsense() {
        let autoscale = Autoscale::parse("2:16").unwrap();
        assert_eq!((autoscale.min, autoscale.max), (2, 16));
        assert_eq!(Autoscale::parse("4").unwrap().min, 1);
        for bad in ["0:4", "5:2", "a:b", ":", "2:"] {
            assert!(Autoscale::parse(bad).is_err(), "{bad}");
        }
    }
}
