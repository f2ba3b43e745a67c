//! Secrets inside a run: what `context.secret` answers, and the masking of every value the run
//! read out of what leaves it (log lines, progress, stdout and stderr, errors and results).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::capabilities::SecretStore;

/// The secrets one run may read.
pub(crate) struct SecretAccess {
    pub granted: Arc<BTreeSet<String>>,
    pub ungranted: Arc<BTreeSet<String>>,
    pub store: SecretStore,
    pub revealed: Redactor,
}

impl SecretAccess {
    pub fn read(&self, task: &str, name: &str) -> Result<String, String> {
        if self.granted.contains(name) {
            return match self.store.get(name) {
                Some(value) => {
                    self.revealed.add(name, &value);
                    Ok(value)
                }
                None => Err(format!(
                    "secret `{name}` is granted, but this worker has no value for it (set \
                     STEM_SECRET_{name} or put a file `{name}` in its secrets directory)"
                )),
            };
        }
        if self.ungranted.contains(name) {
            return Err(format!(
                "secret `{name}` is declared but not granted to task `{task}` (stem-host task \
                 grant {task} --secret {name})"
            ));
        }
        Err(format!(
            "secret `{name}` is not declared by task `{task}` (#[task(secrets = [\"{name}\"])])"
        ))
    }
}

/// Secret values shorter than this are not masked: replacing every `1` or `a` in a run's output
/// would garble it and hide nothing.
pub(crate) const MIN_MASKED_LEN: usize = 4;

/// The secret values a run has read; clones share them. Masking replaces each value, and its
/// JSON-escaped form, with `[secret NAME]`.
#[derive(Clone, Default)]
pub(crate) struct Redactor {
    values: Arc<Mutex<Vec<(String, String)>>>,
}

impl Redactor {
    fn add(&self, name: &str, value: &str) {
        if value.len() < MIN_MASKED_LEN {
            return;
        }
        let mut values = self.lock();
        if !values.iter().any(|(_, v)| v == value) {
            values.push((name.to_string(), value.to_string()));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, String)>> {
        self.values.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// `text` with every secret value read so far masked.
    pub fn mask(&self, text: &str) -> String {
        let values = self.lock();
        let mut masked = text.to_string();
        // Longest first, so a value that contains another is masked whole.
        let mut sorted: Vec<&(String, String)> = values.iter().collect();
        sorted.sort_by_key(|(_, value)| std::cmp::Reverse(value.len()));
        for (name, value) in sorted {
            let mark = format!("[secret {name}]");
            masked = masked.replace(value.as_str(), &mark);
            let quoted = serde_json::to_string(value).unwrap_or_default();
            let escaped = quoted.get(1..quoted.len().saturating_sub(1)).unwrap_or("");
            if !escaped.is_empty() && escaped != value {
                masked = masked.replace(escaped, &mark);
            }
        }
        masked
    }

    /// A JSON document with the secrets masked inside its strings, so it stays JSON; text that
    /// is not JSON is returned as it is (the run fails for that anyway).
    pub fn mask_json(&self, json: &str) -> String {
        fn walk(value: &mut serde_json::Value, redactor: &Redactor) {
            match value {
                serde_json::Value::String(text) => *text = redactor.mask(text),
                serde_json::Value::Array(items) => items.iter_mut().for_each(|v| walk(v, redactor)),
                serde_json::Value::Object(fields) => {
                    let entries = std::mem::take(fields);
                    for (key, mut item) in entries {
                        walk(&mut item, redactor);
                        fields.insert(redactor.mask(&key), item);
                    }
                }
                _ => {}
            }
        }
        match serde_json::from_str::<serde_json::Value>(json) {
            Ok(mut value) => {
                walk(&mut value, self);
                serde_json::to_string(&value).unwrap_or_else(|_| json.to_string())
            }
            Err(_) => json.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(granted: &[&str], ungranted: &[&str], dir: &std::path::Path) -> SecretAccess {
        SecretAccess {
            granted: Arc::new(granted.iter().map(|s| s.to_string()).collect()),
            ungranted: Arc::new(ungranted.iter().map(|s| s.to_string()).collect()),
            store: SecretStore::new(Some(dir.to_path_buf())),
            revealed: Redactor::default(),
        }
    }

    #[test]
    fn only_granted_secrets_are_read_and_then_masked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("TOKEN"), "a\"quoted\"value").unwrap();
        std::fs::write(dir.path().join("OTHER"), "other-value").unwrap();
        let secrets = access(&["TOKEN"], &["OTHER"], dir.path());
        assert!(secrets.revealed.is_empty());
        assert_eq!(secrets.read("t", "TOKEN").unwrap(), "a\"quoted\"value");
        assert!(
            secrets
                .read("t", "OTHER")
                .unwrap_err()
                .contains("not granted")
        );
        assert!(
            secrets
                .read("t", "THIRD")
                .unwrap_err()
                .contains("not declared")
        );
        let masked = secrets
            .revealed
            .mask(r#"raw a"quoted"value, json "a\"quoted\"value", other-value"#);
        assert_eq!(
            masked, r#"raw [secret TOKEN], json "[secret TOKEN]", other-value"#,
            "only what the run read is masked"
        );
    }

    #[test]
    fn results_stay_json_and_short_values_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("TOKEN"), "12345").unwrap();
        std::fs::write(dir.path().join("PIN"), "42").unwrap();
        let secrets = access(&["TOKEN", "PIN"], &[], dir.path());
        secrets.read("t", "TOKEN").unwrap();
        secrets.read("t", "PIN").unwrap();
        let masked = secrets
            .revealed
            .mask_json(r#"{"n":12345,"s":"x12345y","12345":[42,"42"]}"#);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&masked).unwrap(),
            serde_json::json!({"n": 12345, "s": "x[secret TOKEN]y", "[secret TOKEN]": [42, "42"]})
        );
    }

    #[test]
    fn a_granted_secret_the_worker_lacks_says_where_to_put_it() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = access(&["ABSENT"], &[], dir.path());
        let error = secrets.read("t", "ABSENT").unwrap_err();
        assert!(error.contains("STEM_SECRET_ABSENT"), "{error}");
    }
}
