//! What the Redis adapters share: connecting, and naming keys inside a namespace.
//!
//! Every adapter talks through a [`ConnectionManager`]: one multiplexed connection per adapter
//! instance (no per-task connection setup) that reconnects by itself after a dropped
//! connection. Keys are `NAMESPACE:kind:...`, so namespaces never see each other's data.

use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::storage::StorageError;

/// The server's time as `now` (milliseconds), the first lines of every script that needs it.
pub(crate) const CLOCK: &str = include_str!("clock.lua");

/// How long a command may take before the connection counts as broken. Large enough for a
/// publish batch of several megabytes on a slow link; commands are never retried blindly.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting (or reconnecting) may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected adapter's client (for pub/sub connections) and its command connection.
pub(crate) struct RedisConnection {
    pub client: redis::Client,
    pub manager: ConnectionManager,
}

/// Connects to `url` (`redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS).
pub(crate) async fn connect(url: &str) -> Result<RedisConnection, StorageError> {
    let failed = |reason: String| StorageError::Open {
        location: format!("Redis at {}", redact(url)),
        reason,
    };
    let client = redis::Client::open(url).map_err(|e| failed(e.to_string()))?;
    // One plain connection first: it fails at once with the reason (refused, bad password),
    // where the manager would retry for seconds before saying so.
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECTION_TIMEOUT));
    let manager = client
        .get_connection_manager_with_config(config)
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok(RedisConnection { client, manager })
}

/// The URL without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("redis://app:s3cret@db:6379/2"),
            "redis://app:***@db:6379/2"
        );
        assert_eq!(redact("rediss://:s3cret@db"), "rediss://:***@db");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
