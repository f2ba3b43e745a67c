//! A task whose declared memory limit is below what any Rust component needs to start: the
//! registry must refuse it at upload, naming both sizes.

use stem_guest::TaskError;

/// Would run in 1MiB, if a component could start in that.
#[stem_guest::task(name = "tiny.noop", memory_limit = "1MiB")]
pub fn noop(_args: serde_json::Value) -> Result<(), TaskError> {
    Ok(())
}
