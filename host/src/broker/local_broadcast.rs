//! Broadcast fan-out inside one process, for adapters without a cross-process channel.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::mpsc;

use super::{SUBSCRIPTION_BUFFER, Subscription};

/// Subscribers by channel name.
#[derive(Default)]
pub(crate) struct LocalChannels {
    subscribers: Mutex<HashMap<String, Vec<mpsc::Sender<String>>>>,
}

impl LocalChannels {
    pub(crate) fn subscribe(&self, channel: &str) -> Subscription {
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_BUFFER);
        self.lock()
            .entry(channel.to_owned())
            .or_default()
            .push(sender);
        Subscription::new(receiver)
    }

    /// Sends to every live subscriber and forgets the ones that were dropped; a subscriber
    /// whose buffer is full misses the message.
    pub(crate) fn send(&self, channel: &str, message: &str) {
        if let Some(senders) = self.lock().get_mut(channel) {
            senders.retain(|sender| match sender.try_send(message.to_owned()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(
                        channel,
                        "a broadcast subscriber is too far behind; it misses a message"
                    );
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        }
    }

    /// Whether `channel` has a live subscriber here.
    pub(crate) fn has_subscribers(&self, channel: &str) -> bool {
        self.lock()
            .get(channel)
            .is_some_and(|senders| senders.iter().any(|sender| !sender.is_closed()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<mpsc::Sender<String>>>> {
        self.subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
