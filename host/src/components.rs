//! Components between the registry and the sandbox: uploading (validate, describe, store,
//! map task names) and fetching for a worker (by digest, verified, compiled once).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::capabilities::{Grant, RunCapabilities};
use crate::runtime::{LoadError, Runtime, TaskComponent};
use crate::signing::{ComponentSigner, TrustedKeys};
use crate::storage::StorageError;
use crate::stores::registry::{ComponentRegistry, TaskVersion};
use crate::sync::lock;

/// How long a worker trusts its last lookup of a task's current version. New uploads reach
/// running workers within this time.
pub const VERSION_CACHE_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("unknown task `{0}`: no uploaded component declares it (see `stem-host task list`)")]
    UnknownTask(String),
    #[error("component {0} is missing from the registry")]
    Missing(String),
    #[error(
        "the registry's copy of component {expected} has digest {actual}: it is corrupt or was \
         replaced; upload the component again"
    )]
    DigestMismatch { expected: String, actual: String },
    #[error("component {digest} could not be loaded a moment ago ({reason}); trying again shortly")]
    RecentlyFailed { digest: String, reason: String },
    #[error("this worker does not trust component {digest}: {reason}")]
    Untrusted { digest: String, reason: String },
}

/// How long a component that could not be fetched or loaded is not tried again, so a backlog
/// of its tasks does not fetch and compile it once per delivery.
const FAILURE_BACKOFF: Duration = Duration::from_secs(5);

/// What an upload did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Upload {
    pub digest: String,
    pub size: usize,
    /// Whether the registry did not hold these bytes yet.
    pub new_component: bool,
    /// The current version of each task the component declares.
    pub tasks: Vec<TaskVersion>,
    /// The id of the key that signed the digest, with `--sign`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
}

/// Validates a component (it must compile, fit the world and describe valid tasks), stores it
/// and maps its task names to it. Invalid bytes change nothing in the registry.
///
/// With a `signer`, the digest's signature is recorded before the tasks point at it, so a
/// worker that trusts only signed components never sees the new version unsigned.
pub async fn upload(
    registry: &dyn ComponentRegistry,
    runtime: &Arc<Runtime>,
    bytes: Vec<u8>,
    signer: Option<&ComponentSigner>,
) -> Result<Upload, ComponentError> {
    let component = load(runtime, bytes.clone()).await?;
    let definitions = component.describe().await?.to_vec();
    let digest = component.digest().to_owned();
    let new_component = registry.put_component(&digest, &bytes).await?;
    let signed_by = match signer {
        Some(signer) => {
            let (key_id, signature) = signer.sign(&digest);
            registry.add_signature(&digest, &key_id, &signature).await?;
            Some(key_id)
        }
        None => None,
    };
    let tasks = registry.register(&digest, &definitions).await?;
    Ok(Upload {
        digest,
        size: bytes.len(),
        new_component,
        tasks,
        signed_by,
    })
}

/// A task's current version, the grants the registry holds for its name, and what its runs
/// may do: the declarations of the component itself (not the registry's copy of them)
/// intersected with those grants.
pub struct CurrentTask {
    pub version: TaskVersion,
    grants: Vec<Grant>,
    capabilities: std::sync::OnceLock<RunCapabilities>,
}

impl CurrentTask {
    /// What runs of this version may do: nothing until [`ComponentSource::resolve`] has read
    /// the component's declarations.
    pub fn capabilities(&self) -> &RunCapabilities {
        // Not `get_or_init`: that would fix "nothing" for this version after one failed
        // describe, where the next delivery should read the declarations again.
        static NOTHING: std::sync::LazyLock<RunCapabilities> =
            std::sync::LazyLock::new(RunCapabilities::default);
        self.capabilities.get().unwrap_or(&NOTHING)
    }
}

/// Parses a task's grants as the registry holds them; an entry that does not parse (written
/// by hand, or by a newer release) grants nothing and is reported.
pub fn parse_grants(name: &str, texts: &[String]) -> Vec<Grant> {
    texts
        .iter()
        .filter_map(|text| match text.parse::<Grant>() {
            Ok(grant) => Some(grant),
            Err(error) => {
                tracing::warn!(task.name = name, grant = text, %error, "ignoring a grant that does not parse");
                None
            }
        })
        .collect()
}

async fn load(runtime: &Arc<Runtime>, bytes: Vec<u8>) -> Result<Arc<TaskComponent>, LoadError> {
    let runtime = runtime.clone();
    tokio::task::spawn_blocking(move || runtime.load(&bytes))
        .await
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()))
}

/// Finds the component for a task name, as a worker needs it: the current version from the
/// registry (cached for [`VERSION_CACHE_TTL`]), its bytes fetched once and verified against
/// the digest, compiled once: deliveries that need a component being fetched wait for that
/// one fetch (single flight).
pub struct ComponentSource {
    registry: Arc<dyn ComponentRegistry>,
    runtime: Arc<Runtime>,
    /// With keys, only components signed by one of them are loaded.
    trusted: Option<TrustedKeys>,
    versions: Mutex<HashMap<String, (Arc<CurrentTask>, Instant)>>,
    loaded: Mutex<HashMap<String, Arc<OnceCell<Arc<TaskComponent>>>>>,
    /// Digests that failed to fetch or load, with why and when.
    failures: Mutex<HashMap<String, (String, Instant)>>,
    /// Every task name resolved so far: registered names only, so it grows with the registry
    /// and not with what producers send.
    resolved: Mutex<std::collections::HashSet<String>>,
    /// Digests [`Self::prepare_registered`] tried, to try each once.
    prepared: Mutex<std::collections::HashSet<String>>,
}

impl ComponentSource {
    pub fn new(
        registry: Arc<dyn ComponentRegistry>,
        runtime: Arc<Runtime>,
        trusted: Option<TrustedKeys>,
    ) -> ComponentSource {
        ComponentSource {
            registry,
            runtime,
            trusted,
            versions: Mutex::default(),
            loaded: Mutex::default(),
            failures: Mutex::default(),
            resolved: Mutex::default(),
            prepared: Mutex::default(),
        }
    }

    pub fn registry(&self) -> &Arc<dyn ComponentRegistry> {
        &self.registry
    }

    /// Whether `name` was ever resolved to a registered version here.
    pub fn knows(&self, name: &str) -> bool {
        lock(&self.resolved).contains(name)
    }

    /// The digests of the components loaded so far.
    pub fn loaded(&self) -> std::collections::HashSet<String> {
        lock(&self.loaded)
            .iter()
            .filter(|(_, cell)| cell.initialized())
            .map(|(digest, _)| digest.clone())
            .collect()
    }

    /// The current version of `name` with its capabilities, and its loaded component.
    pub async fn resolve(
        &self,
        name: &str,
    ) -> Result<(Arc<CurrentTask>, Arc<TaskComponent>), ComponentError> {
        let current = self.current(name).await?;
        let digest = &current.version.digest;
        if let Some((reason, _)) = lock(&self.failures)
            .get(digest)
            .filter(|(_, at)| at.elapsed() < FAILURE_BACKOFF)
        {
            return Err(ComponentError::RecentlyFailed {
                digest: digest.clone(),
                reason: reason.clone(),
            });
        }
        let component = self.load_once(digest).await?;
        if current.capabilities.get().is_none() {
            // A component that cannot describe itself now (no memory left in the
            // worker's budget, say) runs with nothing granted this time, and its run
            // fails the way the description did.
            match component.describe().await {
                Ok(definitions) => {
                    let declared = definitions
                        .iter()
                        .find(|definition| definition.name == name)
                        .map(|definition| definition.capabilities.clone())
                        .unwrap_or_default();
                    let _ = current
                        .capabilities
                        .set(RunCapabilities::intersect(&declared, &current.grants));
                }
                Err(error) => {
                    tracing::warn!(task.name = name, %error, "cannot read the component's declarations; this run gets no capabilities");
                }
            }
        }
        Ok((current.clone(), component))
    }

    /// Fetches and compiles, one after the other, the current version of every registered task
    /// declared for one of `queues` (or for the default queue) that is not loaded yet, so that
    /// its first delivery finds it compiled (a Python component takes seconds). Each digest is
    /// tried once this way: one that fails is left to its deliveries, as before.
    pub async fn prepare_registered(&self, queues: &[String]) -> Result<(), StorageError> {
        let mut digests: Vec<String> = self
            .registry
            .tasks()
            .await?
            .into_iter()
            .filter(|version| {
                let queue = version.definition.options.queue.as_deref();
                queues
                    .iter()
                    .any(|q| q == queue.unwrap_or(crate::envelope::DEFAULT_QUEUE))
            })
            .map(|version| version.digest)
            .collect();
        digests.sort_unstable();
        digests.dedup();
        for digest in digests {
            if !lock(&self.prepared).insert(digest.clone()) {
                continue;
            }
            match self.load_once(&digest).await {
                // Instantiated once to read its declarations, as its first delivery would.
                Ok(component) => {
                    let _ = component.describe().await;
                }
                // Refused again at each delivery, with its reason in the task's status.
                Err(ComponentError::Untrusted { .. }) => {}
                Err(error) => {
                    tracing::warn!(digest, %error, "cannot prepare a registered component")
                }
            }
        }
        Ok(())
    }

    /// The component with `digest`, fetched and compiled once however many deliveries ask at
    /// the same time; a failure is remembered for [`FAILURE_BACKOFF`].
    async fn load_once(&self, digest: &str) -> Result<Arc<TaskComponent>, ComponentError> {
        let cell = lock(&self.loaded)
            .entry(digest.to_owned())
            .or_default()
            .clone();
        match cell.get_or_try_init(|| self.fetch(digest)).await {
            Ok(component) => Ok(component.clone()),
            Err(error @ ComponentError::Untrusted { .. }) => Err(error),
            Err(error) => {
                let mut failures = lock(&self.failures);
                failures.retain(|_, (_, at)| at.elapsed() < FAILURE_BACKOFF);
                failures.insert(digest.to_owned(), (error.to_string(), Instant::now()));
                Err(error)
            }
        }
    }

    async fn current(&self, name: &str) -> Result<Arc<CurrentTask>, ComponentError> {
        if let Some((current, seen)) = lock(&self.versions).get(name)
            && seen.elapsed() < VERSION_CACHE_TTL
        {
            return Ok(current.clone());
        }
        let version = self
            .registry
            .task(name)
            .await?
            .ok_or_else(|| ComponentError::UnknownTask(name.to_owned()))?;
        let grants = parse_grants(name, &self.registry.grants(name).await?);
        let current = Arc::new(CurrentTask {
            version,
            grants,
            capabilities: std::sync::OnceLock::new(),
        });
        let mut versions = lock(&self.versions);
        versions.retain(|_, (_, seen)| seen.elapsed() < VERSION_CACHE_TTL);
        versions.insert(name.to_owned(), (current.clone(), Instant::now()));
        drop(versions);
        let mut resolved = lock(&self.resolved);
        if !resolved.contains(name) {
            resolved.insert(name.to_owned());
        }
        Ok(current)
    }

    async fn fetch(&self, digest: &str) -> Result<Arc<TaskComponent>, ComponentError> {
        // Before the bytes: an untrusted component costs one small read per delivery.
        if let Some(trusted) = &self.trusted {
            let signatures = self.registry.signatures(digest).await?;
            let key =
                trusted
                    .check(digest, &signatures)
                    .map_err(|reason| ComponentError::Untrusted {
                        digest: digest.to_owned(),
                        reason,
                    })?;
            tracing::debug!(digest, key, "component signature verified");
        }
        let bytes = self
            .registry
            .component(digest)
            .await?
            .ok_or_else(|| ComponentError::Missing(digest.to_owned()))?;
        let actual = crate::digest::sha256_hex(&bytes);
        if actual != digest {
            return Err(ComponentError::DigestMismatch {
                expected: digest.to_owned(),
                actual,
            });
        }

        Ok(load(&self.runtime, bytes).await?)
    }
}
