//! Outbound HTTP from a task, through `wasi:http`.
//!
//! A request leaves the sandbox only if the task declares its origin
//! (`#[task(outbound = ["https://api.example.com"])]`) and an operator granted it
//! (`stem-host task grant NAME --outbound https://api.example.com`); otherwise the host refuses
//! it before any connection is made and [`send`] returns [`HttpError::Denied`] with the host's
//! reason. Redirects (301, 302, 303, 307, 308) are followed up to [`MAX_REDIRECTS`] times, and
//! each hop is checked by the host like a new request. A redirect to another origin drops the
//! `Authorization`, `Cookie` and `Proxy-Authorization` headers, and one from https to http is
//! refused, so a credential meant for one API is never handed to wherever it points.
//!
//! ```no_run
//! # fn demo() -> Result<(), stem_guest::http::HttpError> {
//! let response = stem_guest::http::get("https://api.example.com/v1/status")?;
//! if response.status == 200 {
//!     let text = response.text()?;
//! }
//! let created = stem_guest::http::Request::post("https://api.example.com/v1/items")
//!     .header("content-type", "application/json")
//!     .body(br#"{"name":"x"}"#.to_vec())
//!     .send()?;
//! # Ok(()) }
//! ```

use std::fmt;

use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
};
use wasi::io::streams::StreamError;

/// Redirects followed before [`HttpError::TooManyRedirects`].
pub const MAX_REDIRECTS: u32 = 5;

/// Bytes written to the request body stream per call (the stream's own bound).
const WRITE_CHUNK: usize = 4096;

/// Why a request did not produce a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// The URL is not `http://` or `https://` with a host.
    InvalidUrl(String),
    /// The host refused the request: not declared, not granted, or a private address that no
    /// grant names. The message says which.
    Denied(String),
    /// The request went out and failed: DNS, connection, TLS, a timeout, a body too large.
    Failed(String),
    /// More than [`MAX_REDIRECTS`] redirects.
    TooManyRedirects(String),
    /// A redirect from https to plain http.
    InsecureRedirect(String),
    /// The response body is not valid UTF-8 or JSON.
    Decode(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::InvalidUrl(message) => write!(f, "invalid URL: {message}"),
            HttpError::Denied(message) | HttpError::Failed(message) => f.write_str(message),
            HttpError::TooManyRedirects(url) => {
                write!(f, "more than {MAX_REDIRECTS} redirects, the last to {url}")
            }
            HttpError::Decode(message) => write!(f, "cannot decode the response: {message}"),
            HttpError::InsecureRedirect(url) => {
                write!(f, "refusing a redirect from https to plain http ({url})")
            }
        }
    }
}

impl std::error::Error for HttpError {}

impl From<HttpError> for crate::TaskError {
    fn from(error: HttpError) -> Self {
        crate::TaskError::fail(error)
    }
}

/// A response, its body read whole.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// The URL that answered, after redirects.
    pub url: String,
}

impl Response {
    /// The first value of a header, if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(key, _)| *key == name)
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }

    pub fn text(&self) -> Result<String, HttpError> {
        String::from_utf8(self.body.clone()).map_err(|e| HttpError::Decode(e.to_string()))
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| HttpError::Decode(e.to_string()))
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A request to build and [`send`](Request::send).
#[derive(Clone, Debug)]
pub struct Request {
    method: String,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    follow_redirects: bool,
}

impl Request {
    pub fn new(method: &str, url: &str) -> Request {
        Request {
            method: method.to_ascii_uppercase(),
            url: url.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
            follow_redirects: true,
        }
    }

    pub fn get(url: &str) -> Request {
        Request::new("GET", url)
    }

    pub fn post(url: &str) -> Request {
        Request::new("POST", url)
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers
            .push((name.to_string(), value.as_bytes().to_vec()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    /// A JSON body, with its content type.
    pub fn json<T: serde::Serialize>(self, value: &T) -> Result<Request, HttpError> {
        let body = serde_json::to_vec(value).map_err(|e| HttpError::Decode(e.to_string()))?;
        Ok(self.header("content-type", "application/json").body(body))
    }

    /// Return 3xx responses as they are instead of following them.
    pub fn no_redirects(mut self) -> Request {
        self.follow_redirects = false;
        self
    }

    pub fn send(self) -> Result<Response, HttpError> {
        let mut request = self;
        let mut redirects = 0;
        loop {
            let response = send_once(&request)?;
            let location = match response.status {
                301 | 302 | 303 | 307 | 308 if request.follow_redirects => {
                    response.header("location").map(str::to_string)
                }
                _ => None,
            };
            let Some(location) = location else {
                return Ok(response);
            };
            let next = resolve(&request.url, &location)?;
            redirects += 1;
            if redirects > MAX_REDIRECTS {
                return Err(HttpError::TooManyRedirects(next));
            }
            let (from, to) = (parse(&request.url)?, parse(&next)?);
            if from.https && !to.https {
                return Err(HttpError::InsecureRedirect(next));
            }
            if !from.authority.eq_ignore_ascii_case(to.authority) {
                request.headers.retain(|(name, _)| {
                    !["authorization", "cookie", "proxy-authorization"]
                        .iter()
                        .any(|sensitive| name.eq_ignore_ascii_case(sensitive))
                });
            }
            // 303, and 301/302 after a POST, become a GET without a body, as browsers do.
            if response.status == 303
                || (matches!(response.status, 301 | 302) && request.method == "POST")
            {
                request.method = "GET".to_string();
                request.body.clear();
                request.headers.retain(|(name, _)| {
                    !name.eq_ignore_ascii_case("content-length")
                        && !name.eq_ignore_ascii_case("content-type")
                });
            }
            request.url = next;
        }
    }
}

/// `GET url`, following redirects.
pub fn get(url: &str) -> Result<Response, HttpError> {
    Request::get(url).send()
}

/// The parts of an absolute http(s) URL.
struct Url<'a> {
    https: bool,
    authority: &'a str,
    path_and_query: &'a str,
}

fn parse(url: &str) -> Result<Url<'_>, HttpError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| HttpError::InvalidUrl(format!("`{url}` has no scheme")))?;
    let https = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        other => {
            return Err(HttpError::InvalidUrl(format!(
                "`{url}`: scheme `{other}` (use http or https)"
            )));
        }
    };
    let rest = rest.split('#').next().unwrap_or("");
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path_and_query) = rest.split_at(split);
    if authority.is_empty() || authority.contains('@') {
        return Err(HttpError::InvalidUrl(format!(
            "`{url}` needs a host (and no user)"
        )));
    }
    Ok(Url {
        https,
        authority,
        path_and_query: if path_and_query.is_empty() {
            "/"
        } else {
            path_and_query
        },
    })
}

/// A `Location` against the URL that sent it.
fn resolve(base: &str, location: &str) -> Result<String, HttpError> {
    let lower = location.get(..8).unwrap_or(location).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        parse(location)?;
        return Ok(location.to_string());
    }
    let url = parse(base)?;
    let scheme = if url.https { "https" } else { "http" };
    if let Some(rest) = location.strip_prefix("//") {
        return Ok(format!("{scheme}://{rest}"));
    }
    if location.starts_with('/') {
        return Ok(format!("{scheme}://{}{location}", url.authority));
    }
    let path = url.path_and_query.split('?').next().unwrap_or("/");
    let directory = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    Ok(format!("{scheme}://{}{directory}{location}", url.authority))
}

fn send_once(request: &Request) -> Result<Response, HttpError> {
    let url = parse(&request.url)?;
    let headers = Fields::new();
    for (name, value) in &request.headers {
        headers
            .append(name, value)
            .map_err(|e| HttpError::InvalidUrl(format!("header `{name}`: {e:?}")))?;
    }
    // A known length rather than chunked encoding, which some servers refuse.
    let has_length = request
        .headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-length"));
    if !has_length
        && (!request.body.is_empty() || matches!(request.method.as_str(), "POST" | "PUT" | "PATCH"))
    {
        headers
            .append("content-length", request.body.len().to_string().as_bytes())
            .map_err(|e| HttpError::InvalidUrl(format!("header `content-length`: {e:?}")))?;
    }
    let outgoing = OutgoingRequest::new(headers);
    let method = match request.method.as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        "OPTIONS" => Method::Options,
        other => Method::Other(other.to_string()),
    };
    let refused = |what: &str| HttpError::InvalidUrl(format!("`{}`: invalid {what}", request.url));
    outgoing
        .set_method(&method)
        .map_err(|()| refused("method"))?;
    outgoing
        .set_scheme(Some(if url.https {
            &Scheme::Https
        } else {
            &Scheme::Http
        }))
        .map_err(|()| refused("scheme"))?;
    outgoing
        .set_authority(Some(url.authority))
        .map_err(|()| refused("host"))?;
    outgoing
        .set_path_with_query(Some(url.path_and_query))
        .map_err(|()| refused("path"))?;
    let body = outgoing
        .body()
        .map_err(|()| HttpError::Failed("the request body cannot be opened".into()))?;
    let pending = outgoing_handler::handle(outgoing, None).map_err(|code| error(&code))?;
    if let Err(write_error) = write_body(&body, &request.body) {
        // A refused request closes its body: say why it was refused instead.
        pending.subscribe().block();
        if let Some(Ok(Err(code))) = pending.get() {
            return Err(error(&code));
        }
        return Err(write_error);
    }
    OutgoingBody::finish(body, None).map_err(|code| error(&code))?;

    let response = loop {
        match pending.get() {
            Some(Ok(Ok(response))) => break response,
            Some(Ok(Err(code))) => return Err(error(&code)),
            Some(Err(())) => return Err(HttpError::Failed("the response was taken twice".into())),
            None => pending.subscribe().block(),
        }
    };
    let status = response.status();
    let headers = response.headers().entries();
    let incoming = response
        .consume()
        .map_err(|()| HttpError::Failed("the response body cannot be read".into()))?;
    let body = read_body(&incoming)?;
    drop(IncomingBody::finish(incoming));
    Ok(Response {
        status,
        headers,
        body,
        url: request.url.clone(),
    })
}

fn write_body(body: &OutgoingBody, bytes: &[u8]) -> Result<(), HttpError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let stream = body
        .write()
        .map_err(|()| HttpError::Failed("the request body cannot be written".into()))?;
    for chunk in bytes.chunks(WRITE_CHUNK) {
        stream
            .blocking_write_and_flush(chunk)
            .map_err(|e| stream_error("writing the request body", e))?;
    }
    Ok(())
}

fn read_body(incoming: &IncomingBody) -> Result<Vec<u8>, HttpError> {
    let stream = incoming
        .stream()
        .map_err(|()| HttpError::Failed("the response body cannot be read".into()))?;
    let mut body = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => body.extend_from_slice(&chunk),
            Err(StreamError::Closed) => return Ok(body),
            Err(e) => return Err(stream_error("reading the response body", e)),
        }
    }
}

fn stream_error(doing: &str, error: StreamError) -> HttpError {
    match error {
        StreamError::LastOperationFailed(io) => match wasi::http::types::http_error_code(&io) {
            Some(code) => error_in(doing, &code),
            None => HttpError::Failed(format!("{doing}: {}", io.to_debug_string())),
        },
        StreamError::Closed => HttpError::Failed(format!("{doing}: the stream closed")),
    }
}

fn error_in(doing: &str, code: &ErrorCode) -> HttpError {
    match error(code) {
        HttpError::Failed(message) => HttpError::Failed(format!("{doing}: {message}")),
        other => other,
    }
}

/// The host's refusals arrive as `internal-error` with a message starting `stem: `.
fn error(code: &ErrorCode) -> HttpError {
    match code {
        ErrorCode::InternalError(Some(message)) => match message.strip_prefix("stem: ") {
            Some(reason) => HttpError::Denied(reason.to_string()),
            None => HttpError::Failed(message.clone()),
        },
        ErrorCode::HttpResponseBodySize(limit) => HttpError::Failed(format!(
            "the response body is over the worker's limit{}",
            limit.map(|l| format!(" ({l} bytes)")).unwrap_or_default()
        )),
        other => HttpError::Failed(format!("{other:?}")),
    }
}
