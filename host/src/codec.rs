//! Payload encoders: how task arguments and results are stored in brokers and backends.
//!
//! Producers encode arguments before publishing, workers decode them once before the guest sees
//! them, and results are encoded before they reach the result backend. Every stored payload
//! carries the id of its encoder ([`Payload::encoder`]), so any process can decode it without
//! guessing. Guests always see plain JSON text.
//!
//! Three encoders ship: `json` (the default: stored as is), `base64` and `gzip` (gzip then
//! base64, for large payloads). More can be registered with [`Codecs::register`].

use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

/// The encoder used when nothing else is configured.
pub const DEFAULT_ENCODER: &str = "json";

/// Encoded JSON text and the id of the encoder that made it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub encoder: String,
    pub data: String,
}

impl Payload {
    /// A payload stored as plain JSON.
    pub fn json(text: impl Into<String>) -> Payload {
        Payload {
            encoder: DEFAULT_ENCODER.to_owned(),
            data: text.into(),
        }
    }
}

/// Payloads can be megabytes; debug output shows their size, not their bytes.
impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.data.len() <= 200 {
            write!(f, "Payload({}: {})", self.encoder, self.data)
        } else {
            write!(f, "Payload({}: {} bytes)", self.encoder, self.data.len())
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unknown payload encoder `{0}` (known: {1})")]
    UnknownEncoder(String, String),
    #[error("payload is not valid {encoder} data: {reason}")]
    Invalid {
        encoder: &'static str,
        reason: String,
    },
}

/// Turns JSON text into its stored form and back.
pub trait PayloadEncoder: Send + Sync {
    /// The id stored beside every payload this encoder makes.
    fn id(&self) -> &'static str;
    fn encode(&self, json: &str) -> Result<String, CodecError>;
    fn decode(&self, stored: &str) -> Result<String, CodecError>;
}

/// Stores the JSON text unchanged.
pub struct JsonEncoder;

impl PayloadEncoder for JsonEncoder {
    fn id(&self) -> &'static str {
        "json"
    }

    fn encode(&self, json: &str) -> Result<String, CodecError> {
        Ok(json.to_owned())
    }

    fn decode(&self, stored: &str) -> Result<String, CodecError> {
        Ok(stored.to_owned())
    }
}

/// Stores the JSON text as standard base64.
pub struct Base64Encoder;

impl PayloadEncoder for Base64Encoder {
    fn id(&self) -> &'static str {
        "base64"
    }

    fn encode(&self, json: &str) -> Result<String, CodecError> {
        Ok(BASE64.encode(json))
    }

    fn decode(&self, stored: &str) -> Result<String, CodecError> {
        let bytes = BASE64.decode(stored).map_err(|e| invalid("base64", e))?;
        String::from_utf8(bytes).map_err(|e| invalid("base64", e))
    }
}

/// Stores the JSON text gzip-compressed, then base64-encoded so payloads stay text.
pub struct GzipEncoder;

impl PayloadEncoder for GzipEncoder {
    fn id(&self) -> &'static str {
        "gzip"
    }

    fn encode(&self, json: &str) -> Result<String, CodecError> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder
            .write_all(json.as_bytes())
            .and_then(|()| encoder.finish())
            .map(|compressed| BASE64.encode(compressed))
            .map_err(|e| invalid("gzip", e))
    }

    fn decode(&self, stored: &str) -> Result<String, CodecError> {
        let compressed = BASE64.decode(stored).map_err(|e| invalid("gzip", e))?;
        let mut json = String::new();
        flate2::read::GzDecoder::new(compressed.as_slice())
            .read_to_string(&mut json)
            .map_err(|e| invalid("gzip", e))?;
        Ok(json)
    }
}

fn invalid(encoder: &'static str, reason: impl fmt::Display) -> CodecError {
    CodecError::Invalid {
        encoder,
        reason: reason.to_string(),
    }
}

/// The encoders a process knows, and which ones it uses by default for arguments and results.
#[derive(Clone)]
pub struct Codecs {
    encoders: HashMap<&'static str, Arc<dyn PayloadEncoder>>,
    args_default: &'static str,
    result_default: &'static str,
}

impl Default for Codecs {
    fn default() -> Codecs {
        let mut codecs = Codecs {
            encoders: HashMap::new(),
            args_default: DEFAULT_ENCODER,
            result_default: DEFAULT_ENCODER,
        };
        codecs.register(Arc::new(JsonEncoder));
        codecs.register(Arc::new(Base64Encoder));
        codecs.register(Arc::new(GzipEncoder));
        codecs
    }
}

impl Codecs {
    /// Adds an encoder, replacing one with the same id.
    pub fn register(&mut self, encoder: Arc<dyn PayloadEncoder>) {
        self.encoders.insert(encoder.id(), encoder);
    }

    /// Sets the encoders used when a task does not choose its own.
    pub fn set_defaults(&mut self, args: &str, result: &str) -> Result<(), CodecError> {
        self.args_default = self.encoder(args)?.id();
        self.result_default = self.encoder(result)?.id();
        Ok(())
    }

    /// Encodes task arguments with `encoder`, or the default arguments encoder.
    pub fn encode_args(&self, encoder: Option<&str>, json: &str) -> Result<Payload, CodecError> {
        self.encode(encoder.unwrap_or(self.args_default), json)
    }

    /// Encodes a task result with `encoder`, or the default result encoder.
    pub fn encode_result(&self, encoder: Option<&str>, json: &str) -> Result<Payload, CodecError> {
        self.encode(encoder.unwrap_or(self.result_default), json)
    }

    /// The JSON text a payload was made from, whichever encoder made it.
    pub fn decode(&self, payload: &Payload) -> Result<String, CodecError> {
        self.encoder(&payload.encoder)?.decode(&payload.data)
    }

    fn encode(&self, id: &str, json: &str) -> Result<Payload, CodecError> {
        let encoder = self.encoder(id)?;
        Ok(Payload {
            encoder: encoder.id().to_owned(),
            data: encoder.encode(json)?,
        })
    }

    fn encoder(&self, id: &str) -> Result<&Arc<dyn PayloadEncoder>, CodecError> {
        self.encoders.get(id).ok_or_else(|| {
            let mut known: Vec<_> = self.encoders.keys().copied().collect();
            known.sort_unstable();
            CodecError::UnknownEncoder(id.to_owned(), known.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"customerId":42,"note":"naïve ✓"}"#;

    #[test]
    fn every_encoder_round_trips_and_records_its_id() {
        let codecs = Codecs::default();
        for id in ["json", "base64", "gzip"] {
            let payload = codecs.encode_args(Some(id), SAMPLE).unwrap();
            assert_eq!(payload.encoder, id);
            assert_eq!(codecs.decode(&payload).unwrap(), SAMPLE);
        }
        assert_eq!(
            codecs.encode_args(Some("json"), SAMPLE).unwrap().data,
            SAMPLE
        );
        assert_ne!(
            codecs.encode_args(Some("base64"), SAMPLE).unwrap().data,
            SAMPLE
        );
    }

    #[test]
    fn gzip_shrinks_repetitive_payloads() {
        let big = format!("[{}]", vec!["\"same text\""; 1000].join(","));
        let payload = Codecs::default().encode_result(Some("gzip"), &big).unwrap();
        assert!(
            payload.data.len() < big.len() / 10,
            "{}",
            payload.data.len()
        );
    }

    #[test]
    fn defaults_apply_when_a_task_does_not_choose() {
        let mut codecs = Codecs::default();
        codecs.set_defaults("base64", "gzip").unwrap();
        assert_eq!(codecs.encode_args(None, "1").unwrap().encoder, "base64");
        assert_eq!(codecs.encode_result(None, "1").unwrap().encoder, "gzip");
        assert_eq!(
            codecs.encode_result(Some("json"), "1").unwrap().encoder,
            "json"
        );
    }

    #[test]
    fn unknown_and_corrupt_payloads_are_clear_errors() {
        let mut codecs = Codecs::default();
        let unknown = codecs.decode(&Payload {
            encoder: "msgpack".into(),
            data: "x".into(),
        });
        assert_eq!(
            unknown.unwrap_err().to_string(),
            "unknown payload encoder `msgpack` (known: base64, gzip, json)"
        );
        let corrupt = codecs.decode(&Payload {
            encoder: "gzip".into(),
            data: "bm90IGd6aXA=".into(),
        });
        assert!(
            corrupt
                .unwrap_err()
                .to_string()
                .starts_with("payload is not valid gzip data"),
        );
        assert!(codecs.set_defaults("nope", "json").is_err());
    }
}
