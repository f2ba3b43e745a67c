//! Outbound HTTP: the `wasi:http` sender of a run, which checks every request against the
//! run's [`OutboundPolicy`] before anything touches the network.
//!
//! A request goes out only if its URL matches a pattern the task declared and one the operator
//! granted. The host name is resolved here, every address checked, and the connection made to
//! an address that passed, so a DNS answer cannot swap in another one between check and
//! connect. Private, loopback, link-local and other non-public addresses pass only when the
//! matching grant names the address (`http://127.0.0.1:8080`, `http://10.0.0.5`, or
//! `http://localhost:8080` for loopback): a wildcard or a host name never reaches a cloud
//! metadata endpoint, whatever its DNS says. Redirects are not followed here; the
//! guest SDK follows them, and each hop is a new request checked the same way. A run may have
//! [`OutboundLimits::max_concurrent`] requests in flight, and a response body past
//! [`OutboundLimits::max_response_bytes`] fails. Time spent waiting counts toward the run's
//! hard time limit, which drops everything in flight when it passes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

use super::{PrivateAccess, Scheme, UrlPattern};
use crate::runtime::secrets::Redactor;

type HttpError = wasmtime_wasi_http::Error;
type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;
type SendFuture =
    Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), HttpError>> + Send>;

/// The outbound URLs a run may reach: a request must match a declared and a granted pattern.
#[derive(Clone, Debug, Default)]
pub struct OutboundPolicy {
    declared: Vec<UrlPattern>,
    granted: Vec<UrlPattern>,
}

/// What the policy says of one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed to public addresses, and to the non-public ones a grant names.
    Allowed {
        private: PrivateAccess,
    },
    NotDeclared,
    NotGranted,
}

impl OutboundPolicy {
    /// Whether no request can be allowed: nothing declared or nothing granted.
    pub fn allows_nothing(&self) -> bool {
        self.declared.is_empty() || self.granted.is_empty()
    }

    pub fn new(declared: Vec<UrlPattern>, granted: Vec<UrlPattern>) -> OutboundPolicy {
        OutboundPolicy { declared, granted }
    }

    /// Whether the run may reach anything at all.
    pub fn is_empty(&self) -> bool {
        self.declared.is_empty() || self.granted.is_empty()
    }

    pub fn decide(&self, scheme: Scheme, host: &str, port: u16) -> Decision {
        if !self.declared.iter().any(|p| p.matches(scheme, host, port)) {
            return Decision::NotDeclared;
        }
        let mut granted = self
            .granted
            .iter()
            .filter(|p| p.matches(scheme, host, port))
            .peekable();
        if granted.peek().is_none() {
            return Decision::NotGranted;
        }
        Decision::Allowed {
            private: granted
                .map(UrlPattern::private_access)
                .max()
                .unwrap_or(PrivateAccess::None),
        }
    }
}

/// Per-run bounds on outbound HTTP, set by the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboundLimits {
    /// Requests of one run in flight at once (until their response body is read or dropped).
    pub max_concurrent: u32,
    /// Largest response body one request may receive.
    pub max_response_bytes: u64,
}

impl Default for OutboundLimits {
    fn default() -> Self {
        OutboundLimits {
            max_concurrent: 8,
            max_response_bytes: 16 << 20,
        }
    }
}

/// The `wasi:http` hooks of one run.
pub(crate) struct OutboundHooks {
    policy: Arc<OutboundPolicy>,
    limits: OutboundLimits,
    in_flight: Arc<Semaphore>,
    deadline: Instant,
    refusals: Refusals,
}

impl OutboundHooks {
    pub fn new(
        policy: Arc<OutboundPolicy>,
        limits: OutboundLimits,
        deadline: Instant,
        task: String,
        redactor: Redactor,
    ) -> OutboundHooks {
        OutboundHooks {
            policy,
            in_flight: Arc::new(Semaphore::new(limits.max_concurrent as usize)),
            limits,
            deadline,
            refusals: Refusals { task, redactor },
        }
    }
}

/// Says why a request was refused: to the guest, and in the worker's log with the secrets the
/// run read masked (a guest could put one in a host name).
#[derive(Clone)]
struct Refusals {
    task: String,
    redactor: Redactor,
}

impl Refusals {
    /// A refusal, as the guest sees it: `internal-error` with the reason, since `wasi:http`'s
    /// `http-request-denied` carries no message.
    fn deny(&self, reason: String) -> HttpError {
        let logged = self.redactor.mask(&reason);
        tracing::warn!(task.name = self.task, "outbound request denied: {logged}");
        HttpError::InternalError(Some(format!("stem: outbound request denied: {reason}")))
    }
}

/// Bytes of an outgoing body the host buffers per request: with the run's resource table cap,
/// this bounds the host memory a guest can hold in request bodies it never sends.
const OUTGOING_BODY_CHUNK_BYTES: usize = 16 * 1024;

impl WasiHttpHooks for OutboundHooks {
    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        1
    }

    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        OUTGOING_BODY_CHUNK_BYTES
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> SendFuture {
        let refusals = self.refusals.clone();
        let checked = check(&self.policy, &refusals, request.uri());
        let permit = self.in_flight.clone().try_acquire_owned();
        let limits = self.limits;
        let deadline = self.deadline;
        Box::new(async move {
            let target = checked?;
            let permit = permit.map_err(|_| {
                refusals.deny(format!(
                    "more than {} requests in flight in one run",
                    limits.max_concurrent
                ))
            })?;
            send(
                request, target, options, limits, deadline, permit, &refusals,
            )
            .await
        })
    }
}

/// Where a checked request goes.
struct Target {
    scheme: Scheme,
    host: String,
    port: u16,
    private: PrivateAccess,
}

impl Target {
    fn may_reach(&self, ip: IpAddr) -> bool {
        match self.private {
            PrivateAccess::Named => true,
            PrivateAccess::Loopback => ip.is_loopback() || is_public(ip),
            PrivateAccess::None => is_public(ip),
        }
    }
}

fn check(
    policy: &OutboundPolicy,
    refusals: &Refusals,
    uri: &http::Uri,
) -> Result<Target, HttpError> {
    let task = refusals.task.as_str();
    let scheme = match uri.scheme_str().and_then(Scheme::parse) {
        Some(scheme) => scheme,
        None => {
            return Err(refusals.deny(format!("`{uri}`: only http and https are supported")));
        }
    };
    let host = uri
        .host()
        .map(|h| {
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase()
        })
        .filter(|h| !h.is_empty())
        .ok_or_else(|| refusals.deny(format!("`{uri}` names no host")))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(refusals.deny(format!("`{uri}`: user information in a URL is not sent")));
    }
    let port = uri.port_u16().unwrap_or(scheme.default_port());
    let origin = format!("{}://{}:{port}", scheme.as_str(), uri.host().unwrap_or(""));
    match policy.decide(scheme, &host, port) {
        Decision::NotDeclared => Err(refusals.deny(format!(
            "{origin} is not declared by task `{task}` (#[task(outbound = [..])])"
        ))),
        Decision::NotGranted => Err(refusals.deny(format!(
            "{origin} is not granted to task `{task}` (stem-host task grant {task} --outbound ...)"
        ))),
        Decision::Allowed { private } => Ok(Target {
            scheme,
            host,
            port,
            private,
        }),
    }
}

async fn send(
    mut request: http::Request<WasiBody>,
    target: Target,
    options: Option<RequestOptions>,
    limits: OutboundLimits,
    deadline: Instant,
    permit: OwnedSemaphorePermit,
    refusals: &Refusals,
) -> Result<(http::Response<WasiBody>, IoFuture), HttpError> {
    let left = || deadline.saturating_duration_since(Instant::now());
    let connect_timeout = options
        .and_then(|o| o.connect_timeout)
        .map_or_else(left, |t| t.min(left()));
    let first_byte_timeout = options
        .and_then(|o| o.first_byte_timeout)
        .map_or_else(left, |t| t.min(left()));

    let addresses = resolve(&target, connect_timeout).await?;
    let allowed: Vec<SocketAddr> = addresses
        .iter()
        .copied()
        .filter(|a| target.may_reach(a.ip()))
        .collect();
    if allowed.is_empty() {
        let shown: Vec<String> = addresses.iter().map(|a| a.ip().to_string()).collect();
        return Err(refusals.deny(format!(
            "{} resolves to {} (private, loopback or link-local), which only a grant naming \
             that address opens (e.g. --outbound http://10.0.0.5:8080)",
            target.host,
            shown.join(", ")
        )));
    }
    let stream = connect(&allowed, connect_timeout).await?;
    let io: Box<dyn Stream> = match target.scheme {
        Scheme::Http => Box::new(stream),
        Scheme::Https => {
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|_| HttpError::HttpRequestUriInvalid)?;
            let tls = tokio_rustls::TlsConnector::from(tls_config()).connect(name, stream);
            Box::new(
                tokio::time::timeout(connect_timeout, tls)
                    .await
                    .map_err(|_| HttpError::ConnectionTimeout)?
                    .map_err(HttpError::Tls)?,
            )
        }
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(HttpError::from)?;
    let mut connection = Box::pin(connection);

    // The request line carries the path only; the authority travels in the Host header.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *request.uri_mut() = http::Uri::try_from(path).map_err(|_| HttpError::HttpRequestUriInvalid)?;

    let mut connection_done = false;
    let response = tokio::time::timeout(first_byte_timeout, async {
        let mut send = Box::pin(sender.send_request(request));
        tokio::select! {
            response = &mut send => response.map_err(HttpError::from),
            ended = &mut connection => {
                connection_done = true;
                // A server that closes after its response (HTTP/1.0) ends the connection
                // first; the response is waiting.
                ended.map_err(HttpError::from)?;
                send.await.map_err(HttpError::from)
            }
        }
    })
    .await
    .map_err(|_| HttpError::ConnectionReadTimeout)??;

    if let Some(length) = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|length| *length > limits.max_response_bytes)
    {
        tracing::warn!(
            task.name = refusals.task,
            length,
            "outbound response body too large"
        );
        return Err(HttpError::HttpResponseBodySize(Some(length)));
    }
    let response = response.map(|incoming| {
        CappedBody {
            incoming,
            left: limits.max_response_bytes,
            limit: limits.max_response_bytes,
            _permit: permit,
        }
        .boxed_unsync()
    });
    let driver: IoFuture = Box::new(async move {
        if connection_done {
            return Ok(());
        }
        connection.await.map_err(HttpError::from)
    });
    Ok((response, driver))
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

/// Name lookups in flight in the whole process.
const MAX_LOOKUPS: usize = 32;

async fn resolve(target: &Target, timeout: Duration) -> Result<Vec<SocketAddr>, HttpError> {
    if let Ok(ip) = target.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    // getaddrinfo blocks a thread and cannot be cancelled: a lookup whose run gave up keeps
    // its permit until it returns, so slow names cannot pile up blocking threads.
    static LOOKUPS: Semaphore = Semaphore::const_new(MAX_LOOKUPS);
    let lookup = async {
        let permit = LOOKUPS.acquire().await.map_err(|_| HttpError::DnsTimeout)?;
        let name = (target.host.clone(), target.port);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            std::net::ToSocketAddrs::to_socket_addrs(&name).map(Iterator::collect::<Vec<_>>)
        })
        .await
        .map_err(|_| HttpError::DnsTimeout)
    };
    let addresses: Vec<SocketAddr> = tokio::time::timeout(timeout, lookup)
        .await
        .map_err(|_| HttpError::DnsTimeout)??
        .map_err(|_| HttpError::DnsError {
            rcode: Some(format!("cannot resolve {}", target.host)),
            info_code: None,
        })?;
    if addresses.is_empty() {
        return Err(HttpError::DestinationNotFound);
    }
    Ok(addresses)
}

async fn connect(addresses: &[SocketAddr], timeout: Duration) -> Result<TcpStream, HttpError> {
    let attempt = async {
        let mut last = None;
        for address in addresses {
            match TcpStream::connect(address).await {
                Ok(stream) => return Ok(stream),
                Err(error) => last = Some(error),
            }
        }
        Err(HttpError::Connect(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
        })))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| HttpError::ConnectionTimeout)?
}

/// The system's trust roots, loaded once per process.
pub(crate) fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!("loading a system root certificate failed: {error}");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, "system root certificates for outbound HTTPS");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// Whether an address is reachable on the public internet: not loopback, private, link-local,
/// shared (CGNAT), unspecified, broadcast, multicast or documentation space.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            let octets = v6.octets();
            let last_v4 = Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]);
            // Forms that carry an IPv4 address: mapped (::ffff:a.b.c.d), SIIT
            // (::ffff:0:a.b.c.d), NAT64 (64:ff9b::/96); deprecated IPv4-compatible
            // (::a.b.c.d) and local-use NAT64 (64:ff9b:1::/48) are refused outright.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            if segments[..6] == [0, 0, 0, 0, 0xffff, 0]
                || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
            {
                return is_public_v4(last_v4);
            }
            // 6to4 (2002::/16) carries one in bits 16-48.
            if segments[0] == 0x2002 {
                return is_public_v4(Ipv4Addr::new(octets[2], octets[3], octets[4], octets[5]));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                || segments[..6] == [0; 6]
                || (segments[0] == 0x64 && segments[1] == 0xff9b && segments[2] == 1)
                || (segments[0] & 0xffc0) == 0xfec0
                || segments[..4] == [0x100, 0, 0, 0]
                || segments[0] == 0x2001 && segments[1] == 0x0db8)
        }
    }
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let [a, b, ..] = v4.octets();
    !(v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0)
        || (a == 198 && (18..20).contains(&b))
        || a >= 240)
}

/// A response body that fails past the run's limit and holds the run's in-flight permit until
/// it is read to the end or dropped.
struct CappedBody {
    incoming: hyper::body::Incoming,
    left: u64,
    limit: u64,
    _permit: OwnedSemaphorePermit,
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.left {
                        return Poll::Ready(Some(Err(HttpError::HttpResponseBodySize(Some(
                            self.limit,
                        )))));
                    }
                    self.left -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(HttpError::from(error)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}
