//! Shared fixtures: the guest components and one runtime for every test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use stem_host::runtime::{Runtime, RuntimeConfig, TaskComponent};

/// `target/` of this build, found from the test binary's own path (`target/debug/deps/...`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.ancestors()
        .nth(3)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// The directory of built guest components, building them on first use.
pub fn guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("STEM_GUEST_DIR") {
            return PathBuf::from(dir);
        }
        let output = Command::new(workspace_root().join("scripts/build-guests"))
            .env("CARGO_TARGET_DIR", target_dir())
            .output()
            .expect("cannot run scripts/build-guests");
        assert!(
            output.status.success(),
            "building the guest components failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("build-guests prints the directory"),
        )
    })
}

/// Path of a guest component, e.g. `guest("hello")`.
pub fn guest(crate_name: &str) -> PathBuf {
    let path = guest_dir().join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(path.exists(), "missing guest component {}", path.display());
    path
}

/// The compiled-component cache the tests share across runs.
pub fn cache_dir() -> PathBuf {
    target_dir().join("stem-test-cache")
}

/// One runtime for the whole test binary, as one worker process has.
pub fn runtime() -> Arc<Runtime> {
    static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            Arc::new(
                Runtime::new(RuntimeConfig {
                    cache_dir: Some(cache_dir()),
                    ..RuntimeConfig::default()
                })
                .expect("runtime"),
            )
        })
        .clone()
}

pub fn component(crate_name: &str) -> Arc<TaskComponent> {
    runtime()
        .load_file(&guest(crate_name))
        .unwrap_or_else(|e| panic!("cannot load {crate_name}: {e}"))
}

/// The Redis server the tests use: `STEM_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`.
/// The Postgres server the tests use (`STEM_TEST_POSTGRES_URL`); each test works in a schema
/// of its own.
pub fn postgres_url() -> String {
    std::env::var("STEM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("STEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Drops a test's Postgres schema, from a thread of its own: drops run where the test's
/// runtime may be shutting down.
pub fn drop_schema(base: &str, schema: &str) {
    let base = base.to_owned();
    let statement = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
    let dropped = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            use sqlx::{Connection, Executor};
            let mut conn = sqlx::PgConnection::connect(&base).await?;
            conn.execute(statement.as_str()).await?;
            Ok::<(), sqlx::Error>(())
        })
    });
    if let Ok(Err(error)) = dropped.join() {
        eprintln!("could not drop the test schema {schema}: {error}");
    }
}
