//! Compiled components on local disk, keyed by the component's sha256 and the engine's
//! compatibility hash, so a worker compiles each component once per wasmtime build and
//! configuration, not once per process. The directory is held to a size budget: past it, the
//! artifacts used longest ago are deleted (a process that mapped one keeps its mapping).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

use super::error::LoadError;

pub(crate) struct DiskCache {
    dir: PathBuf,
    engine_key: String,
    max_bytes: u64,
}

const ARTIFACT_EXTENSION: &str = "cwasm";

impl DiskCache {
    pub fn new(dir: PathBuf, engine: &Engine, max_bytes: u64) -> Self {
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        DiskCache {
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
            max_bytes,
        }
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{digest}-{}.{ARTIFACT_EXTENSION}", self.engine_key))
    }

    /// Loads the compiled artifact for `digest`, compiling `bytes` and storing the result
    /// when there is none. A cache that cannot be written only costs a recompilation later.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        digest: &str,
        bytes: &[u8],
    ) -> Result<Component, LoadError> {
        let path = self.path(digest);
        if path.exists() {
            // SAFETY: the file was written by `store` below from `Engine::precompile_component`
            // under a name that carries the engine's compatibility hash; wasmtime checks its
            // header again and refuses an artifact from another version or configuration.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(component) => {
                    // Its modification time is when it was last used: eviction goes by it.
                    let _ = std::fs::File::open(&path)
                        .and_then(|file| file.set_modified(std::time::SystemTime::now()));
                    return Ok(component);
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), "discarding unusable compiled component: {error}");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let compiled = engine
            .precompile_component(bytes)
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        // Loaded before it is stored: an artifact this engine refuses (a component over the
        // pool's limits, say) is never written, so no later load deletes and compiles it again.
        // SAFETY: `compiled` was produced by this engine a moment ago.
        let component =
            unsafe { Component::deserialize(engine, &compiled) }.map_err(super::compile_error)?;
        match self.store(&path, &compiled) {
            Ok(()) => self.evict(&path),
            Err(error) => {
                tracing::warn!(dir = %self.dir.display(), "cannot cache the compiled component: {error}");
            }
        }
        Ok(component)
    }

    /// Writes through a temporary file and a rename, so a reader never sees half a file.
    fn store(&self, path: &Path, compiled: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let temporary = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&temporary, compiled)?;
        std::fs::rename(&temporary, path)
    }

    /// Deletes the artifacts used longest ago until the directory holds at most `max_bytes`,
    /// `keep` (the one just stored) aside.
    fn evict(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let entries: Vec<_> = entries.filter_map(Result::ok).collect();
        // A process that died while storing leaves its temporary file behind.
        for entry in &entries {
            let stale = entry
                .metadata()
                .and_then(|metadata| metadata.modified())
                .is_ok_and(|modified| modified.elapsed().is_ok_and(|age| age > STALE_TEMPORARY));
            if stale && is_temporary_name(&entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let mut artifacts: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .iter()
            .filter(|entry| is_artifact_name(&entry.file_name().to_string_lossy()))
            .filter_map(|entry| {
                let metadata = entry.metadata().ok()?;
                Some((metadata.modified().ok()?, metadata.len(), entry.path()))
            })
            .collect();
        let mut total: u64 = artifacts.iter().map(|(_, size, _)| size).sum();
        artifacts.sort();
        for (_, size, path) in artifacts {
            if total <= self.max_bytes {
                break;
            }
            if path != keep && std::fs::remove_file(&path).is_ok() {
                tracing::info!(path = %path.display(), "compiled-component cache over its budget: deleted the artifact used longest ago");
                total -= size;
            }
        }
    }
}

/// How old a temporary file must be to count as left behind by a process that died.
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(3600);

/// `SHA256-ENGINEKEY.cwasm`, the names [`DiskCache`] writes: nothing else in the directory is
/// counted or deleted.
fn is_artifact_name(name: &str) -> bool {
    name.strip_suffix(&format!(".{ARTIFACT_EXTENSION}"))
        .is_some_and(is_artifact_stem)
}

/// `SHA256-ENGINEKEY.tmpPID`, an artifact being written.
fn is_temporary_name(name: &str) -> bool {
    name.rsplit_once(".tmp").is_some_and(|(stem, pid)| {
        is_artifact_stem(stem) && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
    })
}

fn is_artifact_stem(stem: &str) -> bool {
    let hex = |part: &str, len: usize| {
        part.len() == len
            && part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    stem.split_once('-')
        .is_some_and(|(digest, engine)| hex(digest, 64) && hex(engine, 16))
}

#[cfg(test)]
mod tests {
    use super::{is_artifact_name, is_temporary_name};

    #[test]
    fn only_the_caches_own_files_are_counted_or_deleted() {
        let stem = format!("{}-{}", "a1".repeat(32), "0f".repeat(8));
        assert!(is_artifact_name(&format!("{stem}.cwasm")));
        assert!(is_temporary_name(&format!("{stem}.tmp4242")));
        assert!(!is_artifact_name("notes.cwasm"));
        assert!(!is_artifact_name(&format!("{stem}.cwasm.bak")));
        assert!(!is_artifact_name(&format!(
            "{}-{}.cwasm",
            "A1".repeat(32),
            "0f".repeat(8)
        )));
        assert!(!is_temporary_name(&format!("{stem}.tmp")));
        assert!(!is_temporary_name(&format!("{stem}.tmpx1")));
    }
}
