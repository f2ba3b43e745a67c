//! Traces. Every envelope carries a W3C trace context in its `traceparent` header, set by the
//! producer and kept through retries; sub-tasks and canvas steps continue their parent's
//! trace. With `STEM_OTLP_ENDPOINT` set, producers and workers also record spans
//! (`stem.enqueue`, `stem.consume`, `stem.run`) and export them over OTLP/HTTP (protobuf);
//! without it no span is recorded, and the header only names the trace in log lines.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use wasmtime_wasi_http::io::TokioIo;

/// The envelope header that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// How long one export may take, connecting included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping process waits to export what it still holds: a collector that does
/// not answer must not hold up every command.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// The largest collector response read.
const MAX_RESPONSE_BYTES: usize = 64 << 10;

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("STEM_OTLP_ENDPOINT `{0}` is not an http:// or https:// URL")]
    Endpoint(String),
    #[error("cannot set up the OTLP exporter: {0}")]
    Exporter(String),
    #[error("tracing was already set up in this process")]
    AlreadySet,
}

/// The exporter set up by [`export_to`]; [`Exporter::shutdown`] sends what is still buffered.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Exports the spans still buffered, waiting at most [`SHUTDOWN_TIMEOUT`].
    pub async fn shutdown(self) {
        let provider = self.provider;
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT))
                .await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "exporting the last spans failed");
        }
    }
}

/// Records spans in this process from now on and exports them in batches to the OTLP/HTTP
/// collector at `endpoint` (its base URL, e.g. `http://127.0.0.1:4318`; `/v1/traces` is
/// added). Must be called within a Tokio runtime, which sends the exports.
pub fn export_to(endpoint: &str, service: &str) -> Result<Exporter, TelemetryError> {
    if TRACER.get().is_some() {
        return Err(TelemetryError::AlreadySet);
    }
    let base = endpoint.trim_end_matches('/');
    let uri: http::Uri = base
        .parse()
        .map_err(|_| TelemetryError::Endpoint(endpoint.to_owned()))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(TelemetryError::Endpoint(endpoint.to_owned()));
    }
    let traces = if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    };
    let client = Collector {
        runtime: tokio::runtime::Handle::current(),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces)
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(client)
        .build()
        .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "stem");
    TRACER.set(tracer).map_err(|_| TelemetryError::AlreadySet)?;
    Ok(Exporter { provider })
}

/// The trace context `headers` carry, if they carry a valid one.
pub fn parent(headers: &BTreeMap<String, String>) -> Option<SpanContext> {
    parse(headers.get(TRACEPARENT)?)
}

/// Parses a `traceparent` value: `VERSION-TRACEID-SPANID-FLAGS` in lowercase hex, with
/// neither id all zeros; a version above 00 may add fields after these.
pub fn parse(value: &str) -> Option<SpanContext> {
    let mut parts = value.split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    let rest = parts.next();
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if !hex(version, 2) || version == "ff" || (version == "00" && rest.is_some()) {
        return None;
    }
    if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        TraceState::NONE,
    );
    context.is_valid().then_some(context)
}

/// The `traceparent` value naming `context`.
pub fn format(context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

/// One span of a task's trace; it ends when dropped. When spans are not recorded it only
/// names the trace: its parent's context, or a new trace's when there is no parent.
pub struct TaskSpan {
    span: Option<opentelemetry_sdk::trace::Span>,
    context: SpanContext,
}

impl TaskSpan {
    /// Starts `name` as a child of `parent`, or as the root of a new trace.
    pub fn start(
        name: &'static str,
        kind: SpanKind,
        parent: Option<&SpanContext>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> TaskSpan {
        let Some(tracer) = TRACER.get() else {
            let context = parent.cloned().unwrap_or_else(new_trace);
            return TaskSpan {
                span: None,
                context,
            };
        };
        let parent = match parent {
            Some(parent) => Context::new().with_remote_span_context(parent.clone()),
            None => Context::new(),
        };
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes())
            .start_with_context(tracer, &parent);
        let context = span.span_context().clone();
        TaskSpan {
            span: Some(span),
            context,
        }
    }

    /// The `traceparent` that makes what follows a child of this span.
    pub fn traceparent(&self) -> String {
        format(&self.context)
    }

    pub fn trace_id(&self) -> TraceId {
        self.context.trace_id()
    }

    pub fn context(&self) -> &SpanContext {
        &self.context
    }

    /// Marks the span as failed with `message`.
    pub fn fail(&mut self, message: impl FnOnce() -> String) {
        if let Some(span) = &mut self.span {
            span.set_status(Status::error(message()));
        }
    }
}

/// A sampled context with fresh random ids.
fn new_trace() -> SpanContext {
    SpanContext::new(
        TraceId::from(fastrand::u128(1..)),
        SpanId::from(fastrand::u64(1..)),
        TraceFlags::SAMPLED,
        false,
        TraceState::NONE,
    )
}

/// Sends the exporter's requests on the process's Tokio runtime (the SDK's batch thread
/// waits for them), over HTTP/1.1, with or without TLS.
#[derive(Debug)]
struct Collector {
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for Collector {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        // The timer is made on the runtime: the SDK's thread has none.
        let sent = self
            .runtime
            .spawn(async move { tokio::time::timeout(EXPORT_TIMEOUT, post(request)).await });
        match sent.await? {
            Ok(response) => response,
            Err(_) => Err("the OTLP export timed out".into()),
        }
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

async fn post(request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
    let uri = request.uri().clone();
    let host = uri
        .host()
        .ok_or("the OTLP endpoint has no host")?
        .to_owned();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let stream = tokio::net::TcpStream::connect((unbracketed(&host), port)).await?;
    let io: Box<dyn Stream> = if https {
        let name = tls_name(&host)?;
        let tls = tokio_rustls::TlsConnector::from(crate::capabilities::outbound::tls_config());
        Box::new(tls.connect(name, stream).await?)
    } else {
        Box::new(stream)
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(connection);
    let (mut parts, body) = request.into_parts();
    let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
    parts.headers.insert(http::header::HOST, authority.parse()?);
    parts.uri = uri.path_and_query().map_or("/", |p| p.as_str()).parse()?;
    let response = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await?
        .to_bytes();
    Ok(Response::from_parts(parts, body))
}

/// A URI's host without the brackets of an IPv6 literal (`[::1]` is `::1`).
fn unbracketed(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The name a TLS connection to `host` (as a URI writes it) checks: a DNS name, or an IP
/// address (an IPv6 one without its brackets, which no name may contain).
fn tls_name(
    host: &str,
) -> Result<rustls::pki_types::ServerName<'static>, rustls::pki_types::InvalidDnsNameError> {
    rustls::pki_types::ServerName::try_from(unbracketed(host).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_names_take_ipv6_literals_without_brackets() {
        use rustls::pki_types::ServerName;
        assert!(matches!(tls_name("[::1]"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(
            tls_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            tls_name("otel.example"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(tls_name("[otel.example").is_err());
        assert_eq!(unbracketed("[fe80::1]"), "fe80::1");
        assert_eq!(unbracketed("host"), "host");
    }

    #[test]
    fn traceparent_round_trips_and_refuses_malformed_values() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = parse(value).expect("valid");
        assert!(context.is_sampled());
        assert_eq!(format(&context), value);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra";
        assert!(
            !parse(future)
                .expect("a later version may add fields")
                .is_sampled()
        );
    }

    #[test]
    fn without_export_a_span_names_its_parent_or_a_new_trace() {
        let root = TaskSpan::start("stem.enqueue", SpanKind::Producer, None, Vec::new);
        assert!(root.context().is_valid());
        let child = TaskSpan::start(
            "stem.consume",
            SpanKind::Consumer,
            Some(root.context()),
            Vec::new,
        );
        assert_eq!(child.traceparent(), root.traceparent());
        let other = TaskSpan::start("stem.enqueue", SpanKind::Producer, None, Vec::new);
        assert_ne!(other.trace_id(), root.trace_id());
    }
}
