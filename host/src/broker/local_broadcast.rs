//! Broadcast fan-out inside one process, for adapters without a cross-process channel.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::mpsc;

use super::Subscription;

/// Subscribers by channel name.
#[derive(Default)]
pub(crate) struct LocalChannels {
    subscribers: Mutex<HashMap<String, Vec<mpsc::UnboundedSender<String>>>>,
}

impl LocalChannels {
    pub(crate) fn subscribe(&self, channel: &str) -> Subscription {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.lock()
            .entry(channel.to_owned())
            .or_default()
            .push(sender);
        Subscription::new(receiver)
    }

    /// Sends to every live subscriber and forgets the ones that were dropped.
    pub(crate) fn send(&self, channel: &str, message: &str) {
        if let Some(senders) = self.lock().get_mut(channel) {
            senders.retain(|sender| sender.send(message.to_owned()).is_ok());
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Vec<mpsc::UnboundedSender<String>>>> {
        self.subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
