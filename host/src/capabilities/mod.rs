//! Capabilities: what a run may do beyond computing, by two keys.
//!
//! A task **declares** what it needs in its component ([`Capabilities`], from
//! `#[task(outbound = [..], secrets = [..], dirs = [..])]`); an operator **grants** it in the
//! registry ([`Grant`], from `stem-host task grant`). A run gets the intersection
//! ([`RunCapabilities`]): a request, a secret or a directory must be both declared and granted.
//! Neither key alone opens anything, so a new version of a task that declares more gets nothing
//! extra, and an operator's grant does nothing for a task that never asked.
//!
//! - Outbound HTTP ([`outbound`]): `wasi:http` requests whose URL matches a declared and a
//!   granted [`UrlPattern`]; addresses in private, loopback and link-local ranges only when the
//!   grant names the address (an IP literal, or `localhost` for loopback).
//! - Secrets ([`SecretStore`]): read by the worker from `STEM_SECRET_<NAME>` or a file in its
//!   secrets directory; the guest reads them with `context.secret`.
//! - Directories: a granted host directory preopened at a declared guest path, read-write only
//!   when both keys say `rw`.

pub mod outbound;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use outbound::{OutboundLimits, OutboundPolicy};

/// What a task declares it needs, as its component describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// URL patterns of outbound HTTP requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<String>,
    /// Names of secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Guest directories, `PATH:ro` or `PATH:rw`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<String>,
}

impl Capabilities {
    pub fn is_empty(&self) -> bool {
        self.outbound.is_empty() && self.secrets.is_empty() && self.dirs.is_empty()
    }

    /// Checks every declaration; the problem names the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        for pattern in &self.outbound {
            UrlPattern::from_str(pattern).map_err(|e| format!("outbound `{pattern}`: {e}"))?;
        }
        for name in &self.secrets {
            check_secret_name(name).map_err(|e| format!("secret `{name}`: {e}"))?;
        }
        for dir in &self.dirs {
            DirDeclaration::from_str(dir).map_err(|e| format!("dir `{dir}`: {e}"))?;
        }
        Ok(())
    }
}

/// Why a declaration or a grant does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidCapability(String);

fn invalid(message: impl Into<String>) -> InvalidCapability {
    InvalidCapability(message.into())
}

/// A pattern of outbound URLs: `scheme://host[:port]`. `*` may stand for the scheme, the port,
/// the whole host, or the leftmost labels of a host (`*.example.com` matches `api.example.com`
/// but not `example.com`). Without a port, the scheme's default port (80, 443) is meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlPattern {
    scheme: Option<Scheme>,
    host: HostPattern,
    port: PortPattern,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn parse(text: &str) -> Option<Scheme> {
        match text.to_ascii_lowercase().as_str() {
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            _ => None,
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// What a grant opens beyond public addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PrivateAccess {
    None,
    /// Loopback addresses (`localhost`).
    Loopback,
    /// The IP literal the pattern names, whatever its range.
    Named,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    Any,
    /// `*.suffix`: any host ending in `.suffix`.
    Subdomains(String),
    /// One host name or IP literal, lower case; IPv6 without brackets.
    Exact(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortPattern {
    Any,
    Default,
    Exact(u16),
}

impl UrlPattern {
    /// Whether a request to `scheme://host:port` matches. `host` is lower case, IPv6 without
    /// brackets.
    pub fn matches(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        let scheme_ok = self.scheme.is_none_or(|s| s == scheme);
        let host_ok = match &self.host {
            HostPattern::Any => true,
            HostPattern::Subdomains(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|rest| !rest.is_empty()),
            HostPattern::Exact(exact) => exact == host,
        };
        let port_ok = match self.port {
            PortPattern::Any => true,
            PortPattern::Default => port == scheme.default_port(),
            PortPattern::Exact(exact) => exact == port,
        };
        scheme_ok && host_ok && port_ok
    }

    /// Which non-public addresses a grant of this pattern opens: those it names as an IP
    /// literal, and loopback for `localhost`. A host name, however exact, opens none: whoever
    /// controls its DNS would choose where it points.
    pub fn private_access(&self) -> PrivateAccess {
        match &self.host {
            HostPattern::Exact(host) if host.parse::<std::net::IpAddr>().is_ok() => {
                PrivateAccess::Named
            }
            HostPattern::Exact(host) if host == "localhost" => PrivateAccess::Loopback,
            _ => PrivateAccess::None,
        }
    }
}

impl FromStr for UrlPattern {
    type Err = InvalidCapability;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = text.split_once("://").ok_or_else(|| {
            invalid("expected `scheme://host[:port]`, e.g. `https://api.example.com`")
        })?;
        let scheme = match scheme {
            "*" => None,
            other => Some(Scheme::parse(other).ok_or_else(|| {
                invalid(format!(
                    "unsupported scheme `{other}` (use http, https or *)"
                ))
            })?),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(invalid(
                "a pattern names a scheme, a host and a port only: no path, query or user",
            ));
        }
        let (host, port) = split_host_port(authority)?;
        let port = match port {
            None => {
                if scheme.is_none() {
                    return Err(invalid("`*://` needs a port, e.g. `*://example.com:*`"));
                }
                PortPattern::Default
            }
            Some("*") => PortPattern::Any,
            Some(port) => PortPattern::Exact(
                port.parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| invalid(format!("`{port}` is not a port")))?,
            ),
        };
        let host = host.to_ascii_lowercase();
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            check_host(suffix)?;
            HostPattern::Subdomains(format!(".{suffix}"))
        } else {
            check_host(&host)?;
            HostPattern::Exact(host)
        };
        Ok(UrlPattern { scheme, host, port })
    }
}

impl fmt::Display for UrlPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.scheme.map_or("*", Scheme::as_str);
        let host = match &self.host {
            HostPattern::Any => "*".to_string(),
            HostPattern::Subdomains(suffix) => format!("*{suffix}"),
            HostPattern::Exact(host) if host.contains(':') => format!("[{host}]"),
            HostPattern::Exact(host) => host.clone(),
        };
        match self.port {
            PortPattern::Default => write!(f, "{scheme}://{host}"),
            PortPattern::Any => write!(f, "{scheme}://{host}:*"),
            PortPattern::Exact(port) => write!(f, "{scheme}://{host}:{port}"),
        }
    }
}

/// Splits `host[:port]`, with IPv6 hosts in brackets.
fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), InvalidCapability> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid("an IPv6 host needs its closing `]`"))?;
        return match after {
            "" => Ok((host, None)),
            _ => after
                .strip_prefix(':')
                .map(|port| (host, Some(port)))
                .ok_or_else(|| invalid("expected `:port` after the IPv6 host")),
        };
    }
    Ok(match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

fn check_host(host: &str) -> Result<(), InvalidCapability> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "`{host}` is not a host name or IP address"
        )))
    }
}

/// Longest secret name.
const MAX_SECRET_NAME_LEN: usize = 128;

/// Secret names are environment-variable names: a letter or `_`, then letters, digits and `_`.
pub fn check_secret_name(name: &str) -> Result<(), InvalidCapability> {
    let mut chars = name.chars();
    let valid = name.len() <= MAX_SECRET_NAME_LEN
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "use 1 to {MAX_SECRET_NAME_LEN} letters, digits and `_`, not starting with a digit"
        )))
    }
}

/// A directory a task declares: where it expects it and whether it writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirDeclaration {
    pub guest: String,
    pub writable: bool,
}

impl FromStr for DirDeclaration {
    type Err = InvalidCapability;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (guest, mode) = text
            .rsplit_once(':')
            .ok_or_else(|| invalid("expected `GUEST_PATH:ro` or `GUEST_PATH:rw`"))?;
        Ok(DirDeclaration {
            guest: check_guest_path(guest)?,
            writable: parse_mode(mode)?,
        })
    }
}

fn parse_mode(mode: &str) -> Result<bool, InvalidCapability> {
    match mode {
        "ro" => Ok(false),
        "rw" => Ok(true),
        other => Err(invalid(format!("mode `{other}` (use ro or rw)"))),
    }
}

/// A guest path is absolute, without `.`/`..` segments or a trailing slash.
fn check_guest_path(path: &str) -> Result<String, InvalidCapability> {
    let valid = path.starts_with('/')
        && (path == "/"
            || path[1..]
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != ".."))
        && !path.contains(':');
    if valid {
        Ok(path.to_string())
    } else {
        Err(invalid(format!(
            "`{path}` is not an absolute guest path without `.`, `..` or `:`"
        )))
    }
}

/// One thing an operator grants a task. Its text form (`outbound URL_PATTERN`, `secret NAME`,
/// `dir HOST_PATH:GUEST_PATH:MODE`) is what the registry stores and `task show` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    Outbound(UrlPattern),
    Secret(String),
    Dir {
        host: PathBuf,
        guest: String,
        writable: bool,
    },
}

impl Grant {
    /// `HOST_PATH:GUEST_PATH:ro|rw`; the host path must be absolute.
    pub fn dir(text: &str) -> Result<Grant, InvalidCapability> {
        let (paths, mode) = text
            .rsplit_once(':')
            .ok_or_else(|| invalid("expected `HOST_PATH:GUEST_PATH:ro` or `...:rw`"))?;
        let (host, guest) = paths
            .rsplit_once(':')
            .ok_or_else(|| invalid("expected `HOST_PATH:GUEST_PATH:ro` or `...:rw`"))?;
        let host = PathBuf::from(host);
        if !host.is_absolute() {
            return Err(invalid(format!(
                "the host path `{}` must be absolute",
                host.display()
            )));
        }
        Ok(Grant::Dir {
            host,
            guest: check_guest_path(guest)?,
            writable: parse_mode(mode)?,
        })
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Grant::Outbound(pattern) => write!(f, "outbound {pattern}"),
            Grant::Secret(name) => write!(f, "secret {name}"),
            Grant::Dir {
                host,
                guest,
                writable,
            } => write!(
                f,
                "dir {}:{guest}:{}",
                host.display(),
                if *writable { "rw" } else { "ro" }
            ),
        }
    }
}

impl FromStr for Grant {
    type Err = InvalidCapability;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (kind, value) = text
            .split_once(' ')
            .ok_or_else(|| invalid(format!("`{text}` is not a grant")))?;
        match kind {
            "outbound" => Ok(Grant::Outbound(value.parse()?)),
            "secret" => {
                check_secret_name(value)?;
                Ok(Grant::Secret(value.to_string()))
            }
            "dir" => Grant::dir(value),
            other => Err(invalid(format!("unknown grant kind `{other}`"))),
        }
    }
}

/// Where a worker finds secret values: `STEM_SECRET_<NAME>` in its environment first, then the
/// file `<dir>/<NAME>` (trailing newline dropped).
#[derive(Clone, Debug, Default)]
pub struct SecretStore {
    dir: Option<PathBuf>,
}

/// Longest secret value read from a file.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

impl SecretStore {
    pub fn new(dir: Option<PathBuf>) -> SecretStore {
        SecretStore { dir }
    }

    /// The value of `name`, if the worker has one.
    pub fn get(&self, name: &str) -> Option<String> {
        if check_secret_name(name).is_err() {
            return None;
        }
        if let Ok(value) = std::env::var(format!("STEM_SECRET_{name}")) {
            return Some(value);
        }
        let path = self.dir.as_ref()?.join(name);
        read_secret_file(&path)
    }
}

fn read_secret_file(path: &Path) -> Option<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    if let Err(error) = file.take(MAX_SECRET_BYTES + 1).read_to_end(&mut bytes) {
        tracing::warn!(path = %path.display(), %error, "cannot read a secret file");
        return None;
    }
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        tracing::warn!(path = %path.display(), "a secret file is over {MAX_SECRET_BYTES} bytes: not used");
        return None;
    }
    let Ok(text) = String::from_utf8(bytes) else {
        tracing::warn!(path = %path.display(), "a secret file is not UTF-8: not used");
        return None;
    };
    let trimmed = text.strip_suffix('\n').unwrap_or(&text);
    let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
    Some(trimmed.to_string())
}

/// A directory a run sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preopen {
    pub host: PathBuf,
    pub guest: String,
    pub writable: bool,
}

/// What one run may do: the intersection of what its task declares and what it was granted.
/// Computed once per task version; each run shares its parts.
#[derive(Clone, Debug, Default)]
pub struct RunCapabilities {
    pub outbound: Arc<OutboundPolicy>,
    /// Secret names both declared and granted.
    pub secrets: Arc<BTreeSet<String>>,
    /// Declared secret names that were not granted, to say so when asked.
    pub ungranted_secrets: Arc<BTreeSet<String>>,
    pub dirs: Vec<Preopen>,
}

impl RunCapabilities {
    /// Whether the run gets nothing beyond computing: no request, secret or directory.
    pub fn opens_nothing(&self) -> bool {
        self.outbound.allows_nothing() && self.secrets.is_empty() && self.dirs.is_empty()
    }

    /// Intersects a task's declarations with its grants. Declarations were validated at upload;
    /// one that does not parse (from an older registry) grants nothing.
    pub fn intersect(declared: &Capabilities, grants: &[Grant]) -> RunCapabilities {
        let mut granted_outbound = Vec::new();
        let mut granted_secrets = BTreeSet::new();
        let mut granted_dirs = Vec::new();
        for grant in grants {
            match grant {
                Grant::Outbound(pattern) => granted_outbound.push(pattern.clone()),
                Grant::Secret(name) => {
                    granted_secrets.insert(name.clone());
                }
                Grant::Dir {
                    host,
                    guest,
                    writable,
                } => granted_dirs.push((host, guest, *writable)),
            }
        }
        let declared_outbound = declared
            .outbound
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        let (secrets, ungranted_secrets): (BTreeSet<String>, BTreeSet<String>) = declared
            .secrets
            .iter()
            .cloned()
            .partition(|name| granted_secrets.contains(name));
        let mut dirs: Vec<Preopen> = Vec::new();
        for declaration in declared
            .dirs
            .iter()
            .filter_map(|d| d.parse::<DirDeclaration>().ok())
        {
            let Some((host, _, writable)) = granted_dirs
                .iter()
                .find(|(_, guest, _)| **guest == declaration.guest)
            else {
                continue;
            };
            if dirs.iter().any(|d| d.guest == declaration.guest) {
                continue;
            }
            dirs.push(Preopen {
                host: (*host).clone(),
                guest: declaration.guest,
                writable: *writable && declaration.writable,
            });
        }
        RunCapabilities {
            outbound: Arc::new(OutboundPolicy::new(declared_outbound, granted_outbound)),
            secrets: Arc::new(secrets),
            ungranted_secrets: Arc::new(ungranted_secrets),
            dirs,
        }
    }
}

#[cfg(test)]
mod tests;
