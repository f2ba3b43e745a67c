//! Content addresses of components.

use sha2::{Digest, Sha256};

/// The sha256 of `bytes` in lower-case hex: the id of a component everywhere in Stem.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
