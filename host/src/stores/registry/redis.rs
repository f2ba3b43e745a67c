//! The Redis component registry: component bytes by digest, and per task name a list of its
//! versions (JSON), appended in Lua so concurrent uploads get distinct version numbers.

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::{ComponentRegistry, TaskVersion};
use crate::broker::DEFAULT_NAMESPACE;
use crate::storage::StorageError;
use crate::task::TaskDefinition;
use crate::time::Timestamp;

/// Stores the bytes unless the same bytes are there; 1 if written.
const PUT_COMPONENT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
";

/// KEYS[1]: the set of task names; KEYS[i+1]: task i's version list. ARGV[1]: the digest;
/// ARGV[2i], ARGV[2i+1]: task i's name and its version JSON without the `version` field.
/// Appends a version where the last one has another digest; returns every current version.
const REGISTER: &str = r#"
local current = {}
for i = 2, #KEYS do
  local name = ARGV[2 * (i - 1)]
  local entry = redis.call('LINDEX', KEYS[i], -1)
  if not entry or cjson.decode(entry).digest ~= ARGV[1] then
    local version = redis.call('LLEN', KEYS[i]) + 1
    entry = '{"version":' .. version .. ',' .. string.sub(ARGV[2 * (i - 1) + 1], 2)
    redis.call('RPUSH', KEYS[i], entry)
    redis.call('SADD', KEYS[1], name)
  end
  current[#current + 1] = entry
end
return current
"#;

/// Components in Redis. Clones share the connection.
#[derive(Clone)]
pub struct RedisRegistry {
    manager: ConnectionManager,
    namespace: String,
    put_component: redis::Script,
    register: redis::Script,
}

impl RedisRegistry {
    pub async fn connect(
        url: &str,
        namespace: Option<&str>,
    ) -> Result<RedisRegistry, StorageError> {
        Ok(RedisRegistry {
            manager: crate::redis::connect(url).await?.manager,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
            put_component: redis::Script::new(PUT_COMPONENT),
            register: redis::Script::new(REGISTER),
        })
    }

    fn versions_key(&self, name: &str) -> String {
        format!("{}:task:{name}:versions", self.namespace)
    }

    fn names_key(&self) -> String {
        format!("{}:tasks", self.namespace)
    }

    fn grants_key(&self, name: &str) -> String {
        format!("{}:task:{name}:grants", self.namespace)
    }

    fn signatures_key(&self, digest: &str) -> String {
        format!("{}:component:{digest}:signatures", self.namespace)
    }
}

fn decode(text: &str) -> Result<TaskVersion, StorageError> {
    serde_json::from_str(text).map_err(|e| StorageError::corrupt("task version", e))
}

/// A version's JSON without its `version` field, which the Lua script fills in.
#[derive(serde::Serialize)]
struct Unnumbered<'a> {
    name: &'a str,
    digest: &'a str,
    definition: &'a TaskDefinition,
    uploaded_at: Timestamp,
}

#[async_trait]
impl ComponentRegistry for RedisRegistry {
    async fn put_component(&self, digest: &str, bytes: &[u8]) -> Result<bool, StorageError> {
        let written: i64 = self
            .put_component
            .key(format!("{}:component:{digest}", self.namespace))
            .arg(bytes)
            .invoke_async(&mut self.manager.clone())
            .await?;
        Ok(written == 1)
    }

    async fn component(&self, digest: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(redis::cmd("GET")
            .arg(format!("{}:component:{digest}", self.namespace))
            .query_async(&mut self.manager.clone())
            .await?)
    }

    async fn register(
        &self,
        digest: &str,
        definitions: &[TaskDefinition],
    ) -> Result<Vec<TaskVersion>, StorageError> {
        let uploaded_at = Timestamp::now();
        let mut invocation = self.register.key(self.names_key());
        invocation.arg(digest);
        for definition in definitions {
            let entry = Unnumbered {
                name: &definition.name,
                digest,
                definition,
                uploaded_at,
            };
            invocation
                .key(self.versions_key(&definition.name))
                .arg(&definition.name)
                .arg(serde_json::to_string(&entry).expect("a version always serialises"));
        }
        let current: Vec<String> = invocation.invoke_async(&mut self.manager.clone()).await?;
        current.iter().map(|text| decode(text)).collect()
    }

    async fn task(&self, name: &str) -> Result<Option<TaskVersion>, StorageError> {
        let text: Option<String> = redis::cmd("LINDEX")
            .arg(self.versions_key(name))
            .arg(-1)
            .query_async(&mut self.manager.clone())
            .await?;
        text.map(|text| decode(&text)).transpose()
    }

    async fn tasks(&self) -> Result<Vec<TaskVersion>, StorageError> {
        let mut conn = self.manager.clone();
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.names_key())
            .query_async(&mut conn)
            .await?;
        names.sort();
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.cmd("LINDEX").arg(self.versions_key(name)).arg(-1);
        }
        let texts: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
        texts.iter().flatten().map(|text| decode(text)).collect()
    }

    async fn versions(&self, name: &str) -> Result<Vec<TaskVersion>, StorageError> {
        let texts: Vec<String> = redis::cmd("LRANGE")
            .arg(self.versions_key(name))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.manager.clone())
            .await?;
        texts.iter().map(|text| decode(text)).collect()
    }

    async fn grant(&self, name: &str, grant: &str) -> Result<bool, StorageError> {
        let added: i64 = redis::cmd("SADD")
            .arg(self.grants_key(name))
            .arg(grant)
            .query_async(&mut self.manager.clone())
            .await?;
        Ok(added == 1)
    }

    async fn revoke_grant(&self, name: &str, grant: &str) -> Result<bool, StorageError> {
        let removed: i64 = redis::cmd("SREM")
            .arg(self.grants_key(name))
            .arg(grant)
            .query_async(&mut self.manager.clone())
            .await?;
        Ok(removed == 1)
    }

    async fn grants(&self, name: &str) -> Result<Vec<String>, StorageError> {
        let mut grants: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.grants_key(name))
            .query_async(&mut self.manager.clone())
            .await?;
        grants.sort();
        Ok(grants)
    }

    async fn add_signature(
        &self,
        digest: &str,
        key_id: &str,
        signature: &str,
    ) -> Result<(), StorageError> {
        let _: i64 = redis::cmd("HSET")
            .arg(self.signatures_key(digest))
            .arg(key_id)
            .arg(signature)
            .query_async(&mut self.manager.clone())
            .await?;
        Ok(())
    }

    async fn signatures(&self, digest: &str) -> Result<Vec<(String, String)>, StorageError> {
        let signatures: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(self.signatures_key(digest))
            .query_async(&mut self.manager.clone())
            .await?;
        Ok(signatures.into_iter().collect())
    }
}
