//! Broadcast tasks: one task, run once on every worker subscribed to a broadcast.
//!
//! A broadcast (`enqueue broadcast://NAME`, or a route whose target is `broadcast: NAME`) is
//! not published to a shared queue. The producer reads the workers alive now from their
//! heartbeats, keeps those subscribed to `NAME` (`worker start --broadcasts NAME`), and
//! publishes one copy per worker to that worker's direct queue
//! ([`crate::worker::direct_queue`]), under the task id `ID@WORKER`. Each copy is an ordinary
//! delivery from then on: leased, retried, recorded, and waiting in the queue while its worker
//! is disconnected, so a worker that was away briefly still runs it when it is back.
//!
//! Delivery, from the routing file's `broadcasts` (fanout when the name is not declared):
//!
//! - `fanout`: at least once per worker; a copy whose run was interrupted is delivered again.
//! - `at_most_once`: a copy's run begins at most once. Its `started` status is recorded before
//!   the run; a copy delivered again after its run began (the worker died, or stopped it at
//!   shutdown) is recorded as revoked instead, and a failing copy is not retried. A copy that
//!   never began (given back before it ran) still runs.
//!
//! Workers that start after the broadcast was sent do not get it, as with Celery's broadcast
//! queues. Tasks running in the sandbox cannot broadcast: a fan-out to every worker is the
//! operator's or a producer's call, not a guest's.

use crate::backend::WorkerHeartbeat;
use crate::envelope::Envelope;
use crate::routing::Delivery;
use crate::time::Timestamp;
use std::time::Duration;

/// Marks a copy that must not be delivered twice.
pub const AT_MOST_ONCE_HEADER: &str = "stem-at-most-once";
/// The broadcast a copy belongs to.
pub const BROADCAST_HEADER: &str = "stem-broadcast";

/// How long a copy waits for its worker unless the enqueue sets an expiry: a worker gone for
/// longer is not coming back under the same id.
pub const COPY_EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// One copy of `envelope` per worker, for the broadcast `name`.
pub fn copies(
    envelope: &Envelope,
    name: &str,
    delivery: Delivery,
    workers: &[&WorkerHeartbeat],
) -> Vec<Envelope> {
    let expires_at = envelope
        .expires_at
        .unwrap_or_else(|| Timestamp::now().saturating_add(COPY_EXPIRY));
    workers
        .iter()
        .map(|worker| {
            let mut copy = envelope.clone();
            copy.id = format!("{}@{}", envelope.id, worker.worker_id);
            copy.queue = crate::worker::direct_queue(&worker.worker_id);
            copy.expires_at = Some(expires_at);
            copy.headers
                .insert(BROADCAST_HEADER.to_owned(), name.to_owned());
            if delivery == Delivery::AtMostOnce {
                copy.headers
                    .insert(AT_MOST_ONCE_HEADER.to_owned(), "1".to_owned());
                copy.max_retries = Some(0);
            }
            copy
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str) -> WorkerHeartbeat {
        WorkerHeartbeat {
            worker_id: id.into(),
            hostname: "h".into(),
            pid: 1,
            queues: Vec::new(),
            broadcasts: vec!["maintenance".into()],
            concurrency: 1,
            in_flight: 0,
            processed: 0,
            started_at: Timestamp::now(),
            last_seen: Timestamp::now(),
        }
    }

    #[test]
    fn one_copy_per_worker_on_its_direct_queue() {
        let envelope = Envelope::new(
            "maintenance",
            crate::codec::Payload::json(r#"{"action":"restart"}"#),
        );
        let (a, b) = (worker("node-a:1"), worker("node-b:2"));
        let copies = copies(&envelope, "maintenance", Delivery::AtMostOnce, &[&a, &b]);
        assert_eq!(copies.len(), 2);
        assert_eq!(copies[0].id, format!("{}@node-a:1", envelope.id));
        assert_eq!(copies[0].queue, crate::worker::direct_queue("node-a:1"));
        assert_ne!(copies[0].queue, copies[1].queue);
        for copy in &copies {
            copy.validate().unwrap();
            assert_eq!(copy.headers[BROADCAST_HEADER], "maintenance");
            assert!(copy.headers.contains_key(AT_MOST_ONCE_HEADER));
            assert!(copy.expires_at.is_some());
            assert_eq!(
                copy.max_retries,
                Some(0),
                "an at-most-once copy is not retried"
            );
        }
        let fanout = super::copies(&envelope, "maintenance", Delivery::Fanout, &[&a]);
        assert!(!fanout[0].headers.contains_key(AT_MOST_ONCE_HEADER));
    }
}
