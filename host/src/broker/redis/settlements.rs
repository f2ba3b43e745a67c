//! Settlements in one step, for a Redis result backend on the Redis broker's server: one
//! script checks each lease, records the statuses of the entries whose lease held and settles
//! those entries. Half the round trips of writing statuses and settling separately, and a
//! status is never recorded by a worker that lost its lease.

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::{GROUP, add_settles, millis, settle_script};
use crate::backend::Ttls;
use crate::backend::redis::listed_for;
use crate::broker::validate_settles;
use crate::settlement::{Settlement, SettlementStore};
use crate::storage::StorageError;

/// Writes settlements where a [`super::RedisBroker`] and a
/// [`crate::backend::redis::RedisBackend`] of the same namespace keep their data.
pub struct RedisSettlements {
    manager: ConnectionManager,
    namespace: String,
    ttls: Ttls,
    script: redis::Script,
}

impl RedisSettlements {
    /// Connects to the server at `url`; `ttls` must be the result backend's.
    pub async fn connect(
        url: &str,
        namespace: &str,
        ttls: Ttls,
    ) -> Result<RedisSettlements, StorageError> {
        Ok(RedisSettlements {
            manager: crate::redis::connect(url).await?.manager,
            namespace: namespace.to_owned(),
            ttls,
            script: settle_script(),
        })
    }
}

#[async_trait]
impl SettlementStore for RedisSettlements {
    async fn settle_many(&self, batch: &[Settlement]) -> Result<Vec<bool>, StorageError> {
        validate_settles(batch.iter().map(|s| (&s.receipt, &s.settle)))?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = self.ttls.result.map_or(0, millis);
        let mut invocation = self.script.prepare_invoke();
        invocation
            .arg(&self.namespace)
            .arg(GROUP)
            .arg(ttl)
            .arg(listed_for(&self.ttls, ttl));
        add_settles(
            &mut invocation,
            batch
                .iter()
                .map(|s| (&s.receipt, &s.settle, s.status.as_ref())),
        );
        let held: Vec<i64> = invocation.invoke_async(&mut self.manager.clone()).await?;
        Ok(held.into_iter().map(|done| done == 1).collect())
    }
}
