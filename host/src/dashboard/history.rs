//! What the dashboard remembers of the event stream: finished tasks counted in 10-second
//! buckets for the last ten minutes (the overview's chart, the queues' rates) and the latest
//! events. Everything is bounded: anyone with broker access can publish events.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use crate::control::events::{Event, EventKind};
use crate::envelope::is_valid_queue_name;
use crate::time::Timestamp;

/// Width of one bucket, in seconds.
pub const BUCKET_SECS: u64 = 10;

/// Buckets kept: ten minutes.
pub const BUCKETS: usize = 60;

/// Longest text field of an event kept; longer ones are cut.
const FIELD_BYTES: usize = 256;

/// Latest events kept.
const RECENT: usize = 100;

/// Distinct queues counted per bucket; more are counted under [`OTHER_QUEUES`].
const QUEUES_PER_BUCKET: usize = 256;

const OTHER_QUEUES: &str = "(other)";

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Bucket {
    /// Unix seconds at the start of the bucket.
    pub start: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    /// Tasks finished (succeeded or failed) per queue.
    #[serde(skip)]
    finished: BTreeMap<String, u64>,
}

#[derive(Default)]
pub struct History {
    buckets: VecDeque<Bucket>,
    recent: VecDeque<Event>,
}

impl History {
    /// Counts `event`, received at `now`.
    pub fn record(&mut self, mut event: Event, now: Timestamp) {
        if event
            .queue
            .as_deref()
            .is_some_and(|q| !is_valid_queue_name(q))
        {
            return;
        }
        for field in [
            &mut event.worker,
            &mut event.task_id,
            &mut event.task,
            &mut event.error,
        ]
        .into_iter()
        .flatten()
        {
            let kept = crate::runtime::head(field, FIELD_BYTES).len();
            field.truncate(kept);
        }
        let bucket = self.bucket_at(now);
        let finished = match event.event {
            EventKind::TaskSucceeded => {
                bucket.succeeded += 1;
                true
            }
            EventKind::TaskFailed => {
                bucket.failed += 1;
                true
            }
            EventKind::TaskRetried => {
                bucket.retried += 1;
                false
            }
            _ => false,
        };
        if finished && let Some(queue) = &event.queue {
            let key = if bucket.finished.contains_key(queue)
                || bucket.finished.len() < QUEUES_PER_BUCKET
            {
                queue.clone()
            } else {
                OTHER_QUEUES.to_owned()
            };
            *bucket.finished.entry(key).or_default() += 1;
        }
        if matches!(event.event, EventKind::WorkerHeartbeat) {
            return;
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(event);
    }

    fn bucket_at(&mut self, now: Timestamp) -> &mut Bucket {
        let start = bucket_start(now);
        if self.buckets.back().is_none_or(|last| last.start < start) {
            if self.buckets.len() == BUCKETS {
                self.buckets.pop_front();
            }
            self.buckets.push_back(Bucket {
                start,
                ..Bucket::default()
            });
        }
        self.buckets.back_mut().expect("a bucket was just ensured")
    }

    /// The last `count` buckets up to `now`, oldest first, empty ones included.
    pub fn series(&self, now: Timestamp, count: usize) -> Vec<Bucket> {
        let last = bucket_start(now);
        (0..count as u64)
            .rev()
            .map(|back| last.saturating_sub(back * BUCKET_SECS))
            .map(|start| {
                self.buckets
                    .iter()
                    .find(|bucket| bucket.start == start)
                    .cloned()
                    .unwrap_or(Bucket {
                        start,
                        ..Bucket::default()
                    })
            })
            .collect()
    }

    /// Tasks of `queue` finished in the last minute up to `now`.
    pub fn finished_last_minute(&self, queue: &str, now: Timestamp) -> u64 {
        let since = bucket_start(now).saturating_sub(60 - BUCKET_SECS);
        self.buckets
            .iter()
            .filter(|bucket| bucket.start >= since)
            .filter_map(|bucket| bucket.finished.get(queue))
            .sum()
    }

    /// The latest events, newest first.
    pub fn recent(&self) -> Vec<Event> {
        self.recent.iter().rev().cloned().collect()
    }
}

fn bucket_start(at: Timestamp) -> u64 {
    let seconds = at.as_millis() / 1000;
    seconds - seconds % BUCKET_SECS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, queue: &str) -> Event {
        Event {
            queue: Some(queue.to_owned()),
            ..Event::bare(kind)
        }
    }

    #[test]
    fn counts_finished_tasks_per_bucket_and_queue() {
        let mut history = History::default();
        let at = Timestamp::from_millis(1_000_000_000);
        history.record(event(EventKind::TaskSucceeded, "a"), at);
        history.record(event(EventKind::TaskFailed, "a"), at);
        history.record(event(EventKind::TaskRetried, "b"), at);
        let later = at.saturating_add(std::time::Duration::from_secs(20));
        history.record(event(EventKind::TaskSucceeded, "b"), later);

        let series = history.series(later, 3);
        assert_eq!(
            series
                .iter()
                .map(|b| (b.succeeded, b.failed, b.retried))
                .collect::<Vec<_>>(),
            vec![(1, 1, 1), (0, 0, 0), (1, 0, 0)]
        );
        assert_eq!(history.finished_last_minute("a", later), 2);
        assert_eq!(history.finished_last_minute("b", later), 1);
        let much_later = later.saturating_add(std::time::Duration::from_secs(120));
        assert_eq!(history.finished_last_minute("a", much_later), 0);
        assert_eq!(history.recent().len(), 4);
        assert_eq!(history.recent()[0].event, EventKind::TaskSucceeded);
    }

    #[test]
    fn stays_bounded_whatever_arrives() {
        let mut history = History::default();
        let mut at = Timestamp::from_millis(0);
        for n in 0..(BUCKETS * 2) {
            for q in 0..(QUEUES_PER_BUCKET + 10) {
                history.record(event(EventKind::TaskSucceeded, &format!("q{q}-{n}")), at);
            }
            at = at.saturating_add(std::time::Duration::from_secs(BUCKET_SECS));
        }
        assert_eq!(history.buckets.len(), BUCKETS);
        assert!(
            history
                .buckets
                .iter()
                .all(|b| b.finished.len() <= QUEUES_PER_BUCKET + 1)
        );
        assert_eq!(history.recent.len(), RECENT);
    }
}
