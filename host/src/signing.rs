//! Payload signing, as the seeds' `STEM_SIGNING_*` variables describe it: producers sign every
//! envelope they publish; a worker that holds verification keys runs only envelopes signed by
//! one of them, and sends the rest to the dead-letter queue with the reason
//! `signature-invalid: …`, without running them.
//!
//! - `STEM_SIGNING_ALGORITHM`: `hmac-sha256` (the default) or `ed25519`.
//! - `STEM_SIGNING_KEYS`: HMAC secrets, `ID:BASE64,ID:BASE64` (both sides hold them).
//! - `STEM_SIGNING_PRIVATE_KEYS` / `STEM_SIGNING_PUBLIC_KEYS`: Ed25519 seeds (32 bytes) and
//!   public keys, `ID:BASE64,…`. Workers need the public keys only; a worker also signs the
//!   sub-tasks it enqueues when it holds a private key (or the HMAC secrets).
//! - `STEM_SIGNING_ACTIVE_KEY`: the key new signatures use [default: the first listed]. Every
//!   listed key verifies, so keys rotate by adding the new one, making it active, and dropping
//!   the old one once nothing signed with it is queued.
//!
//! What is signed is what a task means and no retry changes: id, task, arguments, queue,
//! priority, limits, expiry, headers, lineage and creation time. The attempt and the
//! not-before time are not: retries and releases change them on the worker, which may hold no
//! private key. The signature travels in [`Envelope::signature`] as `KEY-ID:BASE64`. A worker
//! also refuses an entry found on another queue than the one it was signed for.
//!
//! Signing gives integrity, not replay protection: a signed envelope published again runs
//! again unless its task id's recorded end says it finished (for as long as results are kept).

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use ring::{hmac, rand};
use serde::Serialize;

use crate::codec::Payload;
use crate::envelope::Envelope;
use crate::time::Timestamp;

/// The reason (prefix) a worker dead-letters an envelope with when its signature fails.
pub const SIGNATURE_INVALID: &str = "signature-invalid";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigningError {
    #[error("STEM_SIGNING_ALGORITHM `{0}` is not one of hmac-sha256, ed25519")]
    Algorithm(String),
    #[error("{variable}: `{entry}` is not ID:BASE64")]
    Entry {
        variable: &'static str,
        entry: String,
    },
    #[error("{variable}: key `{id}`: {reason}")]
    Key {
        variable: &'static str,
        id: String,
        reason: String,
    },
    #[error("STEM_SIGNING_ACTIVE_KEY `{0}` is not among the signing keys")]
    ActiveKey(String),
    #[error("{variable} is set, but the algorithm is {algorithm}: it would be ignored")]
    OtherAlgorithm {
        variable: &'static str,
        algorithm: &'static str,
    },
    #[error("STEM_SIGNING_ALGORITHM is set, but no key is: nothing would be signed or verified")]
    NoKeys,
    #[error("{variable}: key `{id}` is listed twice")]
    Duplicate { variable: &'static str, id: String },
}

/// Why an envelope's signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("the envelope is not signed")]
    Missing,
    #[error("the signature is not KEY-ID:BASE64")]
    Malformed,
    #[error("key `{0}` is not one this worker knows")]
    UnknownKey(String),
    #[error("the signature does not match the envelope (signed by `{0}`): it was changed")]
    Mismatch(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    #[value(name = "hmac-sha256")]
    HmacSha256,
    Ed25519,
}

impl Algorithm {
    /// As `STEM_SIGNING_ALGORITHM` names it.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::HmacSha256 => "hmac-sha256",
            Algorithm::Ed25519 => "ed25519",
        }
    }
}

/// Keys for signing, verifying, or both.
pub struct Keys {
    algorithm: Algorithm,
    /// The key new signatures use, if this side can sign.
    active: Option<String>,
    hmac: BTreeMap<String, hmac::Key>,
    private: BTreeMap<String, Ed25519KeyPair>,
    public: BTreeMap<String, Vec<u8>>,
}

impl Keys {
    /// The keys the `STEM_SIGNING_*` variables name; `None` when none is set (nothing is
    /// signed or verified).
    pub fn from_env() -> Result<Option<Keys>, SigningError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Keys::parse(
            var("STEM_SIGNING_ALGORITHM").as_deref(),
            var("STEM_SIGNING_KEYS").as_deref(),
            var("STEM_SIGNING_PRIVATE_KEYS").as_deref(),
            var("STEM_SIGNING_PUBLIC_KEYS").as_deref(),
            var("STEM_SIGNING_ACTIVE_KEY").as_deref(),
        )
    }

    /// [`Keys::from_env`] from the variables' values.
    pub fn parse(
        algorithm: Option<&str>,
        hmac_keys: Option<&str>,
        private_keys: Option<&str>,
        public_keys: Option<&str>,
        active: Option<&str>,
    ) -> Result<Option<Keys>, SigningError> {
        let algorithm_named = algorithm.is_some();
        let algorithm = match algorithm.map(str::trim) {
            None | Some("hmac-sha256") => Algorithm::HmacSha256,
            Some("ed25519") => Algorithm::Ed25519,
            Some(other) => return Err(SigningError::Algorithm(other.to_owned())),
        };
        let mut keys = Keys {
            algorithm,
            active: None,
            hmac: BTreeMap::new(),
            private: BTreeMap::new(),
            public: BTreeMap::new(),
        };
        let mut signing_ids = Vec::new();
        let stray = match algorithm {
            Algorithm::HmacSha256 => [
                ("STEM_SIGNING_PRIVATE_KEYS", private_keys),
                ("STEM_SIGNING_PUBLIC_KEYS", public_keys),
            ]
            .into_iter()
            .find(|(_, value)| value.is_some()),
            Algorithm::Ed25519 => hmac_keys.map(|_| ("STEM_SIGNING_KEYS", hmac_keys)),
        };
        if let Some((variable, _)) = stray {
            return Err(SigningError::OtherAlgorithm {
                variable,
                algorithm: algorithm.name(),
            });
        }
        match algorithm {
            Algorithm::HmacSha256 => {
                const SECRETS: &str = "STEM_SIGNING_KEYS";
                for (id, secret) in entries(SECRETS, hmac_keys)? {
                    if secret.len() < MIN_SECRET_BYTES {
                        return Err(SigningError::Key {
                            variable: SECRETS,
                            id,
                            reason: format!("an HMAC secret is at least {MIN_SECRET_BYTES} bytes"),
                        });
                    }
                    keys.hmac
                        .insert(id.clone(), hmac::Key::new(hmac::HMAC_SHA256, &secret));
                    signing_ids.push(id);
                }
            }
            Algorithm::Ed25519 => {
                const PRIVATE: &str = "STEM_SIGNING_PRIVATE_KEYS";
                for (id, seed) in entries(PRIVATE, private_keys)? {
                    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| {
                        SigningError::Key {
                            variable: PRIVATE,
                            id: id.clone(),
                            reason: "an Ed25519 private key is a 32-byte seed".into(),
                        }
                    })?;
                    keys.public
                        .insert(id.clone(), pair.public_key().as_ref().to_vec());
                    keys.private.insert(id.clone(), pair);
                    signing_ids.push(id);
                }
                const PUBLIC: &str = "STEM_SIGNING_PUBLIC_KEYS";
                for (id, public) in entries(PUBLIC, public_keys)? {
                    if public.len() != 32 {
                        return Err(SigningError::Key {
                            variable: PUBLIC,
                            id,
                            reason: "an Ed25519 public key is 32 bytes".into(),
                        });
                    }
                    keys.public.insert(id, public);
                }
            }
        }
        if keys.hmac.is_empty() && keys.public.is_empty() {
            if algorithm_named {
                return Err(SigningError::NoKeys);
            }
            return Ok(None);
        }
        // A side with public keys only signs nothing, whatever key a shared file names active.
        keys.active = match active.map(str::trim) {
            _ if signing_ids.is_empty() => None,
            Some(id) if signing_ids.iter().any(|known| known == id) => Some(id.to_owned()),
            Some(id) => return Err(SigningError::ActiveKey(id.to_owned())),
            None => signing_ids.first().cloned(),
        };
        Ok(Some(keys))
    }

    /// The algorithm and the key ids, for logs.
    pub fn describe(&self) -> String {
        let algorithm = self.algorithm.name();
        let ids: Vec<&str> = match self.algorithm {
            Algorithm::HmacSha256 => self.hmac.keys().map(String::as_str).collect(),
            Algorithm::Ed25519 => self.public.keys().map(String::as_str).collect(),
        };
        format!("{algorithm}, keys {}", ids.join(","))
    }

    /// Whether this side can sign (it holds a secret or a private key).
    pub fn can_sign(&self) -> bool {
        self.active.is_some()
    }

    /// Signs `envelope` with the active key; does nothing on a side that cannot sign.
    pub fn sign(&self, envelope: &mut Envelope) {
        let Some(id) = &self.active else {
            return;
        };
        let message = signed_bytes(envelope);
        let signature = match self.algorithm {
            Algorithm::HmacSha256 => hmac::sign(&self.hmac[id], &message).as_ref().to_vec(),
            Algorithm::Ed25519 => self.private[id].sign(&message).as_ref().to_vec(),
        };
        envelope.signature = Some(format!("{id}:{}", BASE64.encode(signature)));
    }

    /// Checks `envelope`'s signature against every key this side knows.
    pub fn verify(&self, envelope: &Envelope) -> Result<(), SignatureError> {
        let signature = envelope
            .signature
            .as_deref()
            .ok_or(SignatureError::Missing)?;
        let (id, encoded) = signature
            .rsplit_once(':')
            .ok_or(SignatureError::Malformed)?;
        // Shown in dead-letter reasons and logs: whoever published it chose it.
        let shown = || -> String {
            let printable: String = id.chars().filter(|c| !c.is_control()).take(64).collect();
            printable
        };
        let bytes = BASE64
            .decode(encoded)
            .map_err(|_| SignatureError::Malformed)?;
        let message = signed_bytes(envelope);
        let valid = match self.algorithm {
            Algorithm::HmacSha256 => {
                let key = self
                    .hmac
                    .get(id)
                    .ok_or_else(|| SignatureError::UnknownKey(shown()))?;
                hmac::verify(key, &message, &bytes).is_ok()
            }
            Algorithm::Ed25519 => {
                let key = self
                    .public
                    .get(id)
                    .ok_or_else(|| SignatureError::UnknownKey(shown()))?;
                UnparsedPublicKey::new(&ED25519, key)
                    .verify(&message, &bytes)
                    .is_ok()
            }
        };
        match valid {
            true => Ok(()),
            false => Err(SignatureError::Mismatch(shown())),
        }
    }
}

/// A fresh key for `algorithm`: the secret (HMAC) or private seed (Ed25519), base64, and for
/// Ed25519 the public key, base64.
pub fn generate(algorithm: Algorithm) -> (String, Option<String>) {
    let mut secret = [0u8; 32];
    rand::SecureRandom::fill(&rand::SystemRandom::new(), &mut secret)
        .expect("the system has randomness");
    let public = match algorithm {
        Algorithm::HmacSha256 => None,
        Algorithm::Ed25519 => {
            let pair =
                Ed25519KeyPair::from_seed_unchecked(&secret).expect("any 32 bytes are a seed");
            Some(BASE64.encode(pair.public_key().as_ref()))
        }
    };
    (BASE64.encode(secret), public)
}

/// The shortest HMAC secret accepted.
const MIN_SECRET_BYTES: usize = 16;

/// `ID:BASE64,ID:BASE64` decoded, in order; an id listed twice is refused.
fn entries(
    variable: &'static str,
    text: Option<&str>,
) -> Result<Vec<(String, Vec<u8>)>, SigningError> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    let mut seen = std::collections::HashSet::new();
    text.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            // Only the id is shown: the rest may be a secret.
            let malformed = || SigningError::Entry {
                variable,
                entry: match entry.split_once(':') {
                    Some((id, _)) => format!("{id}:…"),
                    None => "(an entry without `:`)".to_owned(),
                },
            };
            let (id, encoded) = entry.split_once(':').ok_or_else(malformed)?;
            if id.is_empty() || id.contains(char::is_whitespace) {
                return Err(malformed());
            }
            let bytes = BASE64.decode(encoded.trim()).map_err(|_| malformed())?;
            if bytes.is_empty() {
                return Err(malformed());
            }
            if !seen.insert(id.to_owned()) {
                return Err(SigningError::Duplicate {
                    variable,
                    id: id.to_owned(),
                });
            }
            Ok((id.to_owned(), bytes))
        })
        .collect()
}

/// The fields a signature covers, in a fixed order.
#[derive(Serialize)]
struct Signed<'a> {
    id: &'a str,
    task: &'a str,
    args: &'a Payload,
    queue: &'a str,
    priority: u8,
    max_retries: Option<u32>,
    soft_time_limit_ms: Option<u64>,
    time_limit_ms: Option<u64>,
    expires_at: Option<Timestamp>,
    result_encoder: Option<&'a str>,
    headers: &'a BTreeMap<String, String>,
    parent_id: Option<&'a str>,
    root_id: Option<&'a str>,
    depth: u32,
    group_id: Option<&'a str>,
    created_at: Timestamp,
}

fn signed_bytes(envelope: &Envelope) -> Vec<u8> {
    let signed = Signed {
        id: &envelope.id,
        task: &envelope.task,
        args: &envelope.args,
        queue: &envelope.queue,
        priority: envelope.priority,
        max_retries: envelope.max_retries,
        soft_time_limit_ms: envelope.soft_time_limit_ms,
        time_limit_ms: envelope.time_limit_ms,
        expires_at: envelope.expires_at,
        result_encoder: envelope.result_encoder.as_deref(),
        headers: &envelope.headers,
        parent_id: envelope.parent_id.as_deref(),
        root_id: envelope.root_id.as_deref(),
        depth: envelope.depth,
        group_id: envelope.group_id.as_deref(),
        created_at: envelope.created_at,
    };
    serde_json::to_vec(&signed).expect("signed fields always serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope::new("reports.generate", Payload::json(r#"{"customerId":42}"#))
    }

    fn hmac_keys(keys: &str, active: Option<&str>) -> Keys {
        Keys::parse(None, Some(keys), None, None, active)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn hmac_signatures_verify_and_catch_tampering() {
        let keys = hmac_keys("k1:c2VjcmV0LW9uZS1mb3ItdGVzdHM=", None);
        let mut signed = envelope();
        keys.sign(&mut signed);
        assert!(signed.signature.as_deref().unwrap().starts_with("k1:"));
        keys.verify(&signed).unwrap();

        let mut retried = signed.clone();
        retried.attempt = 3;
        retried.not_before = Some(Timestamp::now());
        keys.verify(&retried)
            .expect("a retry keeps the signature valid");

        let mut tampered = signed.clone();
        tampered.args = Payload::json(r#"{"customerId":43}"#);
        assert_eq!(
            keys.verify(&tampered),
            Err(SignatureError::Mismatch("k1".into()))
        );
        assert_eq!(keys.verify(&envelope()), Err(SignatureError::Missing));
        let other = hmac_keys("k9:b3RoZXItc2VjcmV0LWtleS1ub2JvZHk=", None);
        let mut foreign = envelope();
        other.sign(&mut foreign);
        assert_eq!(
            keys.verify(&foreign),
            Err(SignatureError::UnknownKey("k9".into()))
        );
    }

    #[test]
    fn two_keys_rotate() {
        let old = hmac_keys("k1:c2VjcmV0LW9uZS1mb3ItdGVzdHM=", None);
        let both = hmac_keys(
            "k1:c2VjcmV0LW9uZS1mb3ItdGVzdHM=,k2:c2VjcmV0LXR3by1mb3ItdGVzdHM=",
            Some("k2"),
        );
        let mut before = envelope();
        old.sign(&mut before);
        let mut after = envelope();
        both.sign(&mut after);
        assert!(after.signature.as_deref().unwrap().starts_with("k2:"));
        both.verify(&before).unwrap();
        both.verify(&after).unwrap();
        let k1 = "k1:c2VjcmV0LW9uZS1mb3ItdGVzdHM=";
        assert!(Keys::parse(None, Some(k1), None, None, Some("k3")).is_err());
    }

    #[test]
    fn ed25519_verifies_with_public_keys_only() {
        let (seed, public) = generate(Algorithm::Ed25519);
        let producer = Keys::parse(
            Some("ed25519"),
            None,
            Some(&format!("p1:{seed}")),
            None,
            None,
        )
        .unwrap()
        .unwrap();
        let worker = Keys::parse(
            Some("ed25519"),
            None,
            None,
            Some(&format!("p1:{}", public.unwrap())),
            None,
        )
        .unwrap()
        .unwrap();
        assert!(!worker.can_sign(), "public keys only");
        let mut signed = envelope();
        producer.sign(&mut signed);
        worker.verify(&signed).unwrap();
        let mut tampered = signed.clone();
        tampered.task = "reports.other".into();
        assert!(worker.verify(&tampered).is_err());
        let mut unsigned = envelope();
        worker.sign(&mut unsigned);
        assert_eq!(unsigned.signature, None);
    }

    #[test]
    fn bad_configuration_is_refused_clearly() {
        assert_eq!(
            Keys::parse(Some("rsa"), None, None, None, None).err(),
            Some(SigningError::Algorithm("rsa".into()))
        );
        let error = Keys::parse(None, Some("nocolon"), None, None, None)
            .err()
            .unwrap();
        assert!(error.to_string().contains("is not ID:BASE64"), "{error}");
        assert!(
            !error.to_string().contains("nocolon:"),
            "the secret is not echoed"
        );
        assert!(Keys::parse(None, None, None, None, None).unwrap().is_none());
        let short = Keys::parse(None, Some("k1:c2hvcnQ="), None, None, None);
        assert!(
            matches!(short, Err(SigningError::Key { .. })),
            "a short secret"
        );
        let public_only = Keys::parse(None, None, None, Some("p1:AAAA"), None);
        assert!(
            matches!(public_only, Err(SigningError::OtherAlgorithm { .. })),
            "public keys without STEM_SIGNING_ALGORITHM=ed25519 would verify nothing"
        );
        assert_eq!(
            Keys::parse(Some("ed25519"), None, None, None, None).err(),
            Some(SigningError::NoKeys)
        );
        let twice = "k1:c2VjcmV0LW9uZS1mb3ItdGVzdHM=,k1:c2VjcmV0LXR3by1mb3ItdGVzdHM=";
        assert!(matches!(
            Keys::parse(None, Some(twice), None, None, None),
            Err(SigningError::Duplicate { .. })
        ));
    }
}

/// What a component signature covers: this prefix and the component's sha256 in hex.
const COMPONENT_CONTEXT: &str = "stem-component-v1:";

/// The comments `signing keygen --out` writes at the top of each key file, so one is not
/// taken for the other (any 32 bytes are both a valid seed and a valid public key).
pub const PRIVATE_KEY_MARK: &str = "stem component signing key (private)";
pub const PUBLIC_KEY_MARK: &str = "stem component signing key (public)";

/// Why a component signing key or a trusted-keys file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ComponentKeyError {
    #[error(transparent)]
    Entry(#[from] SigningError),
    #[error(
        "{0}: expected one Ed25519 private key, ID:BASE64 (from `signing keygen --algorithm ed25519 --out DIR`)"
    )]
    NotOneKey(&'static str),
    #[error("{source_name}: key `{id}` is not a 32-byte Ed25519 key")]
    BadKey {
        source_name: &'static str,
        id: String,
    },
    #[error("{0}: no key")]
    Empty(&'static str),
    #[error("{0}")]
    WrongFile(&'static str),
}

/// Entries of a key file: one `ID:BASE64` per line or comma-separated; `#` starts a comment.
fn file_entries(
    source_name: &'static str,
    text: &str,
) -> Result<Vec<(String, Vec<u8>)>, ComponentKeyError> {
    let joined: Vec<&str> = text
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .collect();
    Ok(entries(source_name, Some(&joined.join(",")))?)
}

/// Signs component digests with one Ed25519 private key (`task upload --sign KEY_FILE`).
pub struct ComponentSigner {
    id: String,
    pair: Ed25519KeyPair,
}

impl ComponentSigner {
    /// The key in a key file's text: one `ID:BASE64` private seed.
    pub fn parse(text: &str) -> Result<ComponentSigner, ComponentKeyError> {
        const SOURCE: &str = "the signing key file";
        if text.contains(PUBLIC_KEY_MARK) {
            return Err(ComponentKeyError::WrongFile(
                "this is a public key file (ID.pub): --sign takes the private one (ID.key)",
            ));
        }
        let mut keys = file_entries(SOURCE, text)?;
        let (Some((id, seed)), true) = (keys.pop(), keys.is_empty()) else {
            return Err(ComponentKeyError::NotOneKey(SOURCE));
        };
        let pair =
            Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| ComponentKeyError::BadKey {
                source_name: SOURCE,
                id: id.clone(),
            })?;
        Ok(ComponentSigner { id, pair })
    }

    /// The key id and the base64 signature of `digest`.
    pub fn sign(&self, digest: &str) -> (String, String) {
        let message = format!("{COMPONENT_CONTEXT}{digest}");
        let signature = self.pair.sign(message.as_bytes());
        (self.id.clone(), BASE64.encode(signature.as_ref()))
    }
}

/// The Ed25519 public keys a worker started with `--trusted-keys` accepts components from.
#[derive(Debug)]
pub struct TrustedKeys {
    keys: BTreeMap<String, Vec<u8>>,
}

impl TrustedKeys {
    /// Public keys, `ID:BASE64`, one per line or comma-separated.
    pub fn parse(text: &str) -> Result<TrustedKeys, ComponentKeyError> {
        const SOURCE: &str = "--trusted-keys";
        if text.contains(PRIVATE_KEY_MARK) {
            return Err(ComponentKeyError::WrongFile(
                "this is a private key file (ID.key): --trusted-keys takes public ones (ID.pub)",
            ));
        }
        let keys: BTreeMap<String, Vec<u8>> = file_entries(SOURCE, text)?.into_iter().collect();
        if keys.is_empty() {
            return Err(ComponentKeyError::Empty(SOURCE));
        }
        if let Some((id, _)) = keys.iter().find(|(_, key)| key.len() != 32) {
            return Err(ComponentKeyError::BadKey {
                source_name: SOURCE,
                id: id.clone(),
            });
        }
        Ok(TrustedKeys { keys })
    }

    /// The id of a trusted key that signed `digest`, or why none did.
    pub fn check(&self, digest: &str, signatures: &[(String, String)]) -> Result<String, String> {
        let message = format!("{COMPONENT_CONTEXT}{digest}");
        let mut untrusted = Vec::new();
        let mut mismatched = Vec::new();
        for (id, signature) in signatures {
            let Some(key) = self.keys.get(id) else {
                untrusted.push(id.as_str());
                continue;
            };
            let valid = BASE64.decode(signature).is_ok_and(|signature| {
                UnparsedPublicKey::new(&ED25519, key)
                    .verify(message.as_bytes(), &signature)
                    .is_ok()
            });
            if valid {
                return Ok(id.clone());
            }
            mismatched.push(id.as_str());
        }
        Err(if !mismatched.is_empty() {
            format!(
                "its signature by key {} does not match the component",
                mismatched.join(", ")
            )
        } else if untrusted.is_empty() {
            "it is not signed (upload it with `task upload --sign KEY_FILE`)".to_string()
        } else {
            format!(
                "it is signed only by keys this worker does not trust: {}",
                untrusted.join(", ")
            )
        })
    }
}
