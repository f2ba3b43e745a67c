//! The web dashboard (`stem-host dashboard`): pages for the overview, queues, workers, tasks,
//! dead letters and schedules, kept live by polling a JSON API under `/api/`.
//!
//! Access: with a token (`STEM_DASHBOARD_TOKEN`), every page and API call needs it, as a
//! session cookie from `/login` (which expires, and ends when the process does) or an
//! `Authorization: Bearer` header. Without one the dashboard only listens on loopback and is
//! read-only. A change (purge, replay, revoke, worker commands) is a `POST` of JSON carrying
//! `"confirm": true`: a form on another site can send neither that content type nor the
//! `SameSite=Strict` session cookie, and a `POST` whose `Origin` is another site is refused.
//!
//! Throughput and failures come from the event stream, which the dashboard asks the workers
//! to send ([`history`]); depths, workers, tasks and dead letters are read from the adapters
//! on every request.

pub mod history;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::backend::{ResultBackend, StatusQuery, TaskState, TaskStatus};
use crate::broker::{Broker, DeadLetter, DeadLetterIds, DeadLetterQuery, replay};
use crate::canvas::Canvases;
use crate::control::events::EventChannel;
use crate::control::revoke::Revoker;
use crate::control::{self, Channels, Command, Request as ControlRequest, ShutdownMode};
use crate::envelope::is_valid_queue_name;
use crate::http_server::ServerLimits;
use crate::storage::StorageError;
use crate::stores::revoke::{Revocation, RevokeStore};
use crate::stores::schedule::ScheduleStore;
use crate::sync::lock;
use crate::time::Timestamp;
use history::History;

const INDEX: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The session cookie's name.
const COOKIE: &str = "stem_session";

/// How long a login lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The largest request body read.
const MAX_BODY_BYTES: usize = 64 << 10;

/// Most statuses, dead letters or queues one list returns.
const MAX_LIST: usize = 500;

/// Longest payload (arguments, result, stored entry) a list row carries; longer ones are cut.
const LIST_PAYLOAD_BYTES: usize = 1024;

/// Longest payload one task's page carries.
const DETAIL_PAYLOAD_BYTES: usize = 64 << 10;

/// Shortest token taken: a short one would be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

/// How often workers are asked (again) to send events, so that new ones do too.
const ENABLE_EVENTS_EVERY: Duration = Duration::from_secs(30);

/// How long a worker command waits for the worker's answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a revocation made here is remembered.
const REVOKE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A wrong token costs its sender this long, holding one of the connections its address may
/// hold ([`ServerLimits::per_peer`]), not one of anybody else's.
const LOGIN_FAILURE_DELAY: Duration = Duration::from_millis(300);

const LIMITS: ServerLimits = ServerLimits {
    connections: 64,
    per_peer: 16,
    connection_time: Duration::from_secs(120),
    header_time: Duration::from_secs(10),
    buffer_bytes: 16 << 10,
};

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error(
        "the dashboard would listen on {0}, which is not a loopback address, without a token: \
         set STEM_DASHBOARD_TOKEN (or --token), or listen on 127.0.0.1"
    )]
    OpenToNetwork(SocketAddr),
    #[error("the dashboard token is too short: use at least {MIN_TOKEN_LEN} characters")]
    ShortToken,
}

/// The adapters the dashboard reads and acts on.
pub struct Dashboard {
    pub broker: Arc<dyn Broker>,
    pub backend: Arc<dyn ResultBackend>,
    pub revokes: Arc<dyn RevokeStore>,
    pub schedules: Arc<dyn ScheduleStore>,
    pub canvases: Canvases,
    pub channels: Channels,
    /// Needed for every page and action; `None` leaves it open and read-only (loopback only).
    pub token: Option<String>,
}

/// Refuses to open the dashboard to the network without a token.
pub fn check_listen(addr: SocketAddr, token: Option<&str>) -> Result<(), DashboardError> {
    match token {
        Some(token) if token.len() < MIN_TOKEN_LEN => Err(DashboardError::ShortToken),
        None if !addr.ip().is_loopback() => Err(DashboardError::OpenToNetwork(addr)),
        _ => Ok(()),
    }
}

struct State {
    dashboard: Dashboard,
    /// What logins are checked against; `None` without a token.
    sessions: Option<Sessions>,
    history: Mutex<History>,
    /// Whether the event stream is subscribed now.
    following: AtomicBool,
}

/// The running dashboard; [`Running::stop`] ends its server and its event follower.
pub struct Running {
    server: tokio::task::JoinHandle<()>,
    follower: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn stop(self) {
        self.server.abort();
        self.follower.abort();
    }
}

/// Serves the dashboard on `listener` and follows the event stream.
pub fn serve(dashboard: Dashboard, listener: TcpListener) -> Running {
    let sessions = dashboard.token.as_deref().map(Sessions::new);
    let state = Arc::new(State {
        dashboard,
        sessions,
        history: Mutex::default(),
        following: AtomicBool::new(false),
    });
    let follower = tokio::spawn(follow_events(state.clone()));
    let server = crate::http_server::serve(listener, "dashboard", LIMITS, move |request| {
        let state = state.clone();
        async move { with_headers(handle(state, request).await) }
    });
    Running { server, follower }
}

/// Session cookies: `ISSUED.MAC`, the login time (Unix seconds) and a MAC under the token of
/// a random value of this process and that time. The cookie never holds the token; it
/// expires after [`SESSION_TTL`], and a restart (or another dashboard with the same token)
/// does not take it.
struct Sessions {
    key: ring::hmac::Key,
    process: [u8; 32],
}

impl Sessions {
    fn new(token: &str) -> Sessions {
        let mut process = [0; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut process)
            .expect("the system's random source works");
        Sessions {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes()),
            process,
        }
    }

    fn mac(&self, issued: u64) -> String {
        let mut context = ring::hmac::Context::with_key(&self.key);
        context.update(&self.process);
        context.update(&issued.to_be_bytes());
        hex::encode(context.sign().as_ref())
    }

    /// The cookie value of a login at `now` (Unix seconds).
    fn issue(&self, now: u64) -> String {
        format!("{now}.{}", self.mac(now))
    }

    /// Whether `cookie` is a session of this process still valid at `now`.
    fn check(&self, cookie: &str, now: u64) -> bool {
        let Some((issued, mac)) = cookie.split_once('.') else {
            return false;
        };
        let Ok(issued) = issued.parse::<u64>() else {
            return false;
        };
        issued <= now
            && now - issued < SESSION_TTL.as_secs()
            && same(mac.as_bytes(), self.mac(issued).as_bytes())
    }
}

fn unix_seconds() -> u64 {
    Timestamp::now().as_millis() / 1000
}

/// Compares in time that depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Counts what the workers report, re-subscribing when the stream ends. With a token, asks
/// the workers to send events now and every [`ENABLE_EVENTS_EVERY`]; a read-only dashboard
/// changes nothing and counts what workers send anyway.
async fn follow_events(state: Arc<State>) {
    let dashboard = &state.dashboard;
    let channel = EventChannel::new(dashboard.broker.clone(), dashboard.channels.events());
    loop {
        let mut stream = match channel.subscribe().await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "subscribing to the event stream failed; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        state.following.store(true, Ordering::Relaxed);
        let mut ask = tokio::time::interval(ENABLE_EVENTS_EVERY);
        loop {
            tokio::select! {
                batch = stream.next() => {
                    let Some(batch) = batch else { break };
                    let now = Timestamp::now();
                    let mut history = lock(&state.history);
                    for event in batch {
                        history.record(event, now);
                    }
                }
                _ = ask.tick(), if dashboard.token.is_some() => {
                    let broker = dashboard.broker.clone();
                    let channels = dashboard.channels.clone();
                    tokio::spawn(async move {
                        let enable = ControlRequest::new(Command::Events { enabled: true }, Vec::new());
                        if let Err(error) = control::request(&broker, &channels, &enable, None, Duration::from_secs(1)).await {
                            tracing::warn!(%error, "asking the workers to send events failed");
                        }
                    });
                }
            }
        }
        state.following.store(false, Ordering::Relaxed);
        tracing::warn!("the event stream ended; subscribing again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_reply(status: StatusCode, body: &Value) -> Reply {
    reply(status, "application/json", body.to_string())
}

fn login_page(status: StatusCode, message: &str) -> Reply {
    let page = LOGIN.replace("{{message}}", &html_escape(message));
    reply(status, "text/html; charset=utf-8", page)
}

fn redirect(to: &'static str, cookie: Option<String>) -> Reply {
    let mut response = reply(StatusCode::SEE_OTHER, "text/plain", "");
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static(to));
    if let Some(cookie) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    response
}

/// No page may be framed, scripts and styles come only from the dashboard itself, and no
/// other site is sent its addresses.
fn with_headers(mut response: Reply) -> Reply {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // No other site learns the dashboard's addresses; its own forms keep their `Origin`
    // (under `no-referrer` a browser sends `Origin: null`, which [`same_origin`] refuses).
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The pages, each served as the same shell that its script fills in.
const PAGES: &[&str] = &[
    "/",
    "/queues",
    "/workers",
    "/tasks",
    "/dead-letters",
    "/schedules",
];

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Reply {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    if method == Method::POST && !same_origin(&request) {
        return json_reply(
            StatusCode::FORBIDDEN,
            &json!({ "error": "a change must come from the dashboard's own pages" }),
        );
    }
    match (&method, path.as_str()) {
        (&Method::GET, "/assets/app.js") => {
            return reply(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS);
        }
        (&Method::GET, "/assets/app.css") => {
            return reply(StatusCode::OK, "text/css; charset=utf-8", APP_CSS);
        }
        (&Method::GET, "/login") => return login_page(StatusCode::OK, ""),
        (&Method::POST, "/login") => return login(&state, request).await,
        (&Method::POST, "/logout") => {
            let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
            return redirect("/login", Some(cookie));
        }
        _ => {}
    }
    let api = path.starts_with("/api/");
    if !authorized(&state, &request) {
        if request.headers().contains_key(header::AUTHORIZATION) {
            tokio::time::sleep(LOGIN_FAILURE_DELAY).await;
        }
        return match api {
            true => json_reply(
                StatusCode::UNAUTHORIZED,
                &json!({ "error": "log in, or send Authorization: Bearer TOKEN" }),
            ),
            false => login_page(StatusCode::UNAUTHORIZED, "Log in with the dashboard token."),
        };
    }
    if method == Method::GET && (PAGES.contains(&path.as_str()) || path.starts_with("/tasks/")) {
        return reply(StatusCode::OK, "text/html; charset=utf-8", INDEX);
    }
    let Some(route) = path.strip_prefix("/api/") else {
        return reply(StatusCode::NOT_FOUND, "text/plain", "no such page\n");
    };
    let Some(segments) = route
        .split('/')
        .map(percent_decode)
        .collect::<Option<Vec<String>>>()
    else {
        return json_reply(
            StatusCode::BAD_REQUEST,
            &json!({ "error": "the path is not valid percent-encoded UTF-8" }),
        );
    };
    let outcome = match method {
        Method::GET => {
            let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
            let query = query_params(request.uri().query().unwrap_or(""));
            read(&state, &segments, &query).await
        }
        Method::POST => match state.dashboard.token {
            None => Err(ApiError::forbidden(
                "the dashboard has no token, so it is read-only: start it with \
                 STEM_DASHBOARD_TOKEN to allow changes",
            )),
            Some(_) => match action_body(request).await {
                Ok(body) => detached(state, segments, body).await,
                Err(error) => Err(error),
            },
        },
        _ => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET or POST",
        )),
    };
    match outcome {
        Ok(body) => json_reply(StatusCode::OK, &body),
        Err(error) => json_reply(error.status, &json!({ "error": error.message })),
    }
}

/// Runs an action in a task of its own, which the response waits for: a closed tab or a
/// dropped connection does not cut a purge or a replay halfway.
async fn detached(state: Arc<State>, segments: Vec<String>, body: Value) -> ApiResult {
    let action = tokio::spawn(async move {
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        act(&state, &segments, &body).await
    });
    action.await.unwrap_or_else(|error| {
        tracing::error!(%error, "a dashboard action failed");
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the action failed; see the dashboard's log",
        ))
    })
}

fn authorized<B>(state: &State, request: &Request<B>) -> bool {
    let headers = request.headers();
    let (Some(token), Some(sessions)) = (&state.dashboard.token, &state.sessions) else {
        // Open on loopback only, and only to pages asked for by a loopback name: a site whose
        // name was made to resolve to 127.0.0.1 (DNS rebinding) gets nothing.
        return headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_loopback_host);
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| same(given.as_bytes(), token.as_bytes()));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix(&format!("{COOKIE}=")))
        .any(|given| sessions.check(given, unix_seconds()));
    bearer || cookie
}

/// Whether a `POST` may come from where it says: a browser names the page that sent it in
/// `Origin`, which must be this dashboard (the host the request addressed), never another
/// site or `null`. Requests without one (curl, scripts) pass: the JSON content type and the
/// `SameSite` cookie stop a form on another site already; this is defence in depth. A proxy
/// in front must pass `Host` through.
fn same_origin<B>(request: &Request<B>) -> bool {
    let headers = request.headers();
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = origin.to_str().ok().and_then(|o| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
    });
    matches!((origin, host), (Some(origin), Some(host)) if origin.eq_ignore_ascii_case(host))
}

/// Whether a `Host` header names this machine by a loopback name or address.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn login(state: &State, request: Request<Incoming>) -> Reply {
    let (Some(token), Some(sessions)) = (&state.dashboard.token, &state.sessions) else {
        return redirect("/", None);
    };
    let Ok(body) = Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    else {
        return login_page(StatusCode::BAD_REQUEST, "The form could not be read.");
    };
    let form = query_params(&String::from_utf8_lossy(&body.to_bytes()));
    let given = form.get("token").map(String::as_str).unwrap_or_default();
    if !same(given.as_bytes(), token.as_bytes()) {
        tokio::time::sleep(LOGIN_FAILURE_DELAY).await;
        return login_page(StatusCode::UNAUTHORIZED, "That token is not right.");
    }
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        sessions.issue(unix_seconds()),
        SESSION_TTL.as_secs()
    );
    redirect("/", Some(cookie))
}

struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> ApiError {
        ApiError::new(StatusCode::BAD_GATEWAY, format!("storage: {error}"))
    }
}

impl From<crate::canvas::CanvasError> for ApiError {
    fn from(error: crate::canvas::CanvasError) -> ApiError {
        ApiError::new(StatusCode::BAD_GATEWAY, error.to_string())
    }
}

type ApiResult = Result<Value, ApiError>;

/// The JSON body of an action, which must confirm it.
async fn action_body(request: Request<Incoming>) -> ApiResult {
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "actions take a JSON body (Content-Type: application/json)",
        ));
    }
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|_| ApiError::bad(format!("the body is over {MAX_BODY_BYTES} bytes")))?
        .to_bytes();
    let body: Value = serde_json::from_slice(&body)
        .map_err(|error| ApiError::bad(format!("the body is not JSON: {error}")))?;
    if body["confirm"] != Value::Bool(true) {
        return Err(ApiError::bad(
            "an action needs \"confirm\": true in its body",
        ));
    }
    Ok(body)
}

async fn read(state: &State, segments: &[&str], query: &BTreeMap<String, String>) -> ApiResult {
    let dashboard = &state.dashboard;
    let now = Timestamp::now();
    match segments {
        ["overview"] => {
            let workers = dashboard.backend.workers().await?;
            let queues = queue_stats(dashboard).await?;
            let total = |pick: fn(&crate::broker::QueueStats) -> u64| -> u64 {
                queues.iter().map(pick).sum()
            };
            let history = lock(&state.history);
            let series = history.series(now, history::BUCKETS);
            let recent: Vec<_> = history.recent().into_iter().take(20).collect();
            Ok(json!({
                "workers": workers.len(),
                "running": workers.iter().map(|w| u64::from(w.in_flight)).sum::<u64>(),
                "ready": total(|s| s.ready),
                "delayed": total(|s| s.delayed),
                "in_flight": total(|s| s.in_flight),
                "dead": total(|s| s.dead),
                "succeeded": series.iter().map(|b| b.succeeded).sum::<u64>(),
                "failed": series.iter().map(|b| b.failed).sum::<u64>(),
                "bucket_secs": history::BUCKET_SECS,
                "series": series,
                "recent": recent,
                "events": state.following.load(Ordering::Relaxed),
            }))
        }
        ["queues"] => {
            let queues = queue_stats(dashboard).await?;
            let history = lock(&state.history);
            let rows: Vec<Value> = queues
                .iter()
                .map(|stats| {
                    let mut row = json!(stats);
                    row["finished_per_minute"] =
                        json!(history.finished_last_minute(&stats.queue, now));
                    row
                })
                .collect();
            Ok(json!(rows))
        }
        ["workers"] => Ok(json!(dashboard.backend.workers().await?)),
        ["tasks"] => {
            let statuses = match query.get("id").filter(|id| !id.is_empty()) {
                Some(id) => Vec::from_iter(dashboard.backend.get(id).await?),
                None => list_statuses(dashboard, query).await?,
            };
            let mut statuses = json!(statuses);
            for status in statuses.as_array_mut().into_iter().flatten() {
                clip(&mut status["result"]["data"], LIST_PAYLOAD_BYTES);
            }
            Ok(statuses)
        }
        ["tasks", id] => task_detail(dashboard, id).await,
        ["dead-letters"] => {
            let letters = dashboard
                .broker
                .dead_letters(&DeadLetterQuery {
                    queue: query.get("queue").filter(|q| !q.is_empty()).cloned(),
                    newest_first: true,
                    limit: Some(MAX_LIST),
                    ..DeadLetterQuery::default()
                })
                .await?;
            let mut letters = json!(letters);
            for letter in letters.as_array_mut().into_iter().flatten() {
                clip(&mut letter["payload"], LIST_PAYLOAD_BYTES);
            }
            Ok(letters)
        }
        ["schedules"] => Ok(json!(dashboard.schedules.list().await?)),
        ["session"] => Ok(json!({
            "can_act": dashboard.token.is_some(),
        })),
        _ => Err(ApiError::not_found("no such API")),
    }
}

/// The statuses a task search (`state`, `name`, `limit`) finds.
async fn list_statuses(
    dashboard: &Dashboard,
    query: &BTreeMap<String, String>,
) -> Result<Vec<TaskStatus>, ApiError> {
    let state = match query.get("state").filter(|s| !s.is_empty()) {
        Some(text) => Some(text.parse::<TaskState>().map_err(ApiError::bad)?),
        None => None,
    };
    let limit = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100)
        .min(MAX_LIST);
    let task = query.get("name").filter(|n| !n.is_empty()).cloned();
    let query = StatusQuery { state, task, limit };
    Ok(dashboard.backend.list(&query).await?)
}

async fn queue_stats(dashboard: &Dashboard) -> Result<Vec<crate::broker::QueueStats>, ApiError> {
    let mut stats = Vec::new();
    for queue in dashboard.broker.queues().await?.into_iter().take(MAX_LIST) {
        stats.push(dashboard.broker.stats(&queue).await?);
    }
    Ok(stats)
}

/// A task's status, its arguments when its entry is a dead letter (its newest), and its
/// canvas.
async fn task_detail(dashboard: &Dashboard, id: &str) -> ApiResult {
    let status = dashboard.backend.get(id).await?;
    let letter = dashboard
        .broker
        .dead_letters(&DeadLetterQuery {
            ids: vec![id.to_owned()],
            id_kind: DeadLetterIds::Task,
            newest_first: true,
            limit: Some(1),
            ..DeadLetterQuery::default()
        })
        .await?
        .pop();
    let args = letter
        .as_ref()
        .and_then(|letter| letter.replay_envelope().ok())
        .map(|envelope| envelope.args);
    let canvas = dashboard.canvases.tree(id).await?;
    if status.is_none() && letter.is_none() && canvas.is_none() {
        return Err(ApiError::not_found(format!("no task {id} is recorded")));
    }
    let mut status = json!(status);
    clip(&mut status["result"]["data"], DETAIL_PAYLOAD_BYTES);
    let mut args = json!(args);
    clip(&mut args["data"], DETAIL_PAYLOAD_BYTES);
    let mut letter = json!(letter);
    clip(&mut letter["payload"], DETAIL_PAYLOAD_BYTES);
    Ok(json!({
        "status": status,
        "args": args,
        "dead_letter": letter,
        "canvas": canvas,
    }))
}

async fn act(state: &State, segments: &[&str], body: &Value) -> ApiResult {
    let dashboard = &state.dashboard;
    match segments {
        ["queues", queue, "purge"] => {
            if !is_valid_queue_name(queue) {
                return Err(ApiError::bad(format!("{queue:?} is not a queue name")));
            }
            let purged = dashboard.broker.purge(queue).await?;
            Ok(json!({ "purged": purged }))
        }
        ["workers", worker, command] => {
            if worker.contains(['*', '?']) {
                return Err(ApiError::bad(
                    "name one worker; patterns are not taken here",
                ));
            }
            let command = match *command {
                "ping" => Command::Ping,
                "pause" => Command::Pause { queues: Vec::new() },
                "resume" => Command::Resume { queues: Vec::new() },
                "shutdown" => Command::Shutdown {
                    mode: ShutdownMode::Warm,
                },
                _ => {
                    return Err(ApiError::not_found(
                        "the commands are ping, pause, resume, shutdown",
                    ));
                }
            };
            let request = ControlRequest::new(command, vec![(*worker).to_owned()]);
            let expected = BTreeSet::from([(*worker).to_owned()]);
            let replies = control::request(
                &dashboard.broker,
                &dashboard.channels,
                &request,
                Some(expected),
                COMMAND_TIMEOUT,
            )
            .await?;
            Ok(json!(replies))
        }
        ["tasks", id, "revoke"] => {
            let terminate = body["terminate"] == Value::Bool(true);
            let revoker = Revoker {
                revokes: dashboard.revokes.as_ref(),
                backend: dashboard.backend.as_ref(),
                broker: &dashboard.broker,
                channels: &dashboard.channels,
            };
            let template = Revocation {
                reason: Some("revoked from the dashboard".to_owned()),
                ..Revocation::new(*id, terminate, REVOKE_TTL)
            };
            let ids = [(*id).to_owned()];
            let done = revoker
                .revoke(&ids, &template, || async {
                    Ok::<_, ApiError>(&dashboard.canvases)
                })
                .await?;
            if let Some(error) = &done.push_failed {
                tracing::warn!(%error, "pushing a revocation to the workers failed");
            }
            Ok(json!({ "revoked": done.task_ids() }))
        }
        ["dead-letters", "replay"] => {
            let query = selection(dashboard, body).await?;
            let replayed = replay::replay(
                dashboard.broker.as_ref(),
                dashboard.backend.as_ref(),
                &query,
                false,
            )
            .await?;
            Ok(json!(replayed))
        }
        ["dead-letters", "purge"] => {
            let query = selection(dashboard, body).await?;
            Ok(json!({ "purged": dashboard.broker.purge_dead_letters(&query).await? }))
        }
        _ => Err(ApiError::not_found("no such action")),
    }
}

/// The dead letters an action names: `"ids": [...]`, dead-letter ids (never task ids, which
/// a producer could make collide with them); or `"all": true` with `"expected": N`, the number
/// of dead letters (of `"queue"`, if given) the user confirmed, which must still be the number
/// there is. An action on all of them stops at the newest that existed when it was checked.
async fn selection(dashboard: &Dashboard, body: &Value) -> Result<DeadLetterQuery, ApiError> {
    let ids: Vec<String> = body["ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|id| id.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let queue = match body["queue"].as_str().filter(|q| !q.is_empty()) {
        Some(queue) if !is_valid_queue_name(queue) => {
            return Err(ApiError::bad(format!("{queue:?} is not a queue name")));
        }
        queue => queue.map(str::to_owned),
    };
    if !ids.is_empty() {
        return Ok(DeadLetterQuery {
            queue,
            ids,
            id_kind: DeadLetterIds::Letter,
            ..DeadLetterQuery::default()
        });
    }
    if body["all"] != Value::Bool(true) {
        return Err(ApiError::bad(
            "name the dead letters (\"ids\": [...]) or send \"all\": true",
        ));
    }
    let Some(expected) = body["expected"].as_u64() else {
        return Err(ApiError::bad(
            "with \"all\": true, send \"expected\": the number of dead letters you mean",
        ));
    };
    let newest = DeadLetterQuery {
        queue: queue.clone(),
        newest_first: true,
        limit: Some(1),
        ..DeadLetterQuery::default()
    };
    // Read before counting: a letter that arrives in between makes the count differ.
    let up_to = dashboard
        .broker
        .dead_letters(&newest)
        .await?
        .first()
        .and_then(DeadLetter::number);
    let queues = match &queue {
        Some(queue) => vec![queue.clone()],
        None => dashboard.broker.queues().await?,
    };
    let mut count = 0;
    for queue in &queues {
        count += dashboard.broker.stats(queue).await?.dead;
    }
    if count != expected {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "there are {count} dead letters{}, not {expected}: look again and confirm anew",
                queue.as_ref().map_or(String::new(), |q| format!(" in {q}"))
            ),
        ));
    }
    Ok(DeadLetterQuery {
        queue,
        // Nothing there: nothing to act on, even if letters arrive now.
        up_to: Some(up_to.unwrap_or(0)),
        ..DeadLetterQuery::default()
    })
}

/// Cuts a JSON string in place to at most `bytes` (at a character boundary), marking the cut.
fn clip(value: &mut Value, bytes: usize) {
    if let Value::String(text) = value
        && text.len() > bytes
    {
        let kept = crate::runtime::head(text, bytes).len();
        let total = text.len();
        text.truncate(kept);
        text.push_str(&format!("… ({total} bytes in all)"));
    }
}

/// `a=1&b=x%20y` as a map; pairs that do not decode are left out.
fn query_params(text: &str) -> BTreeMap<String, String> {
    text.split('&')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let plus = |s: &str| s.replace('+', " ");
            Some((percent_decode(&plus(key))?, percent_decode(&plus(value))?))
        })
        .filter(|(key, _)| !key.is_empty())
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_on_the_network_only_with_a_token() {
        let open: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(matches!(
            check_listen(open, None),
            Err(DashboardError::OpenToNetwork(_))
        ));
        assert!(check_listen(open, Some("a-token-long-enough")).is_ok());
        assert!(check_listen(local, None).is_ok());
        assert!(matches!(
            check_listen(local, Some("short")),
            Err(DashboardError::ShortToken)
        ));
    }

    #[test]
    fn decodes_forms_and_paths() {
        let form = query_params("token=a%2Bb+c&x=%zz&=y");
        assert_eq!(form.get("token").map(String::as_str), Some("a+b c"));
        assert!(!form.contains_key("x"), "an invalid escape is left out");
        assert_eq!(form.len(), 1);
        assert_eq!(percent_decode("id%3A1").as_deref(), Some("id:1"));
        assert_eq!(percent_decode("%ff"), None);
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }

    #[test]
    fn sessions_expire_and_belong_to_their_process() {
        let sessions = Sessions::new("a-token-long-enough");
        let now = 1_700_000_000;
        let cookie = sessions.issue(now);
        assert!(sessions.check(&cookie, now));
        assert!(sessions.check(&cookie, now + SESSION_TTL.as_secs() - 1));
        assert!(
            !sessions.check(&cookie, now + SESSION_TTL.as_secs()),
            "expired"
        );
        assert!(!sessions.check(&cookie, now - 1), "issued in the future");
        let (_, mac) = cookie.split_once('.').unwrap();
        let moved = format!("{}.{mac}", now + 100);
        assert!(
            !sessions.check(&moved, now + 200),
            "a changed time breaks the MAC"
        );
        let restarted = Sessions::new("a-token-long-enough");
        assert!(!restarted.check(&cookie, now), "another process's session");
        for bad in ["", ".", "x.y", &format!("{now}."), mac] {
            assert!(!sessions.check(bad, now), "{bad:?}");
        }
    }

    #[test]
    fn posts_from_another_origin_are_refused() {
        let post = |origin: Option<&str>| {
            let mut request = Request::post("/api/x").header(header::HOST, "127.0.0.1:8080");
            if let Some(origin) = origin {
                request = request.header(header::ORIGIN, origin);
            }
            same_origin(&request.body(()).unwrap())
        };
        assert!(post(None), "no Origin: not a browser's cross-site request");
        assert!(post(Some("http://127.0.0.1:8080")));
        assert!(post(Some("https://127.0.0.1:8080")), "behind a TLS proxy");
        for origin in [
            "http://evil.example",
            "http://127.0.0.1:8081",
            "http://127.0.0.1:8080.evil.example",
            "null",
            "127.0.0.1:8080",
        ] {
            assert!(!post(Some(origin)), "{origin}");
        }
    }

    #[test]
    fn an_open_dashboard_answers_loopback_names_only() {
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "127.0.0.2",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example:8080",
            "10.0.0.1:8080",
            "localhost.evil.example",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
