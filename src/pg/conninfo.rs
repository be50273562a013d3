//! Connection strings as libpq users write them.
//!
//! tokio-postgres parses only part of libpq's language: it rejects
//! `sslmode=verify-ca`/`verify-full`, `sslrootcert`, `passfile`, and reads no
//! environment variables and no `~/.pgpass`. This module owns that layer:
//! it parses both syntaxes (key/value and `postgresql://` URIs) into libpq
//! keywords, fills what is missing from the environment and libpq's defaults,
//! and finds the password. The result is turned into a tokio-postgres
//! `Config` by [`super::connect`], through its setters, never by re-parsing.
//!
//! Passwords live in [`SecretString`] and no `Display` or `Debug` here ever
//! prints one.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use percent_encoding::percent_decode_str;
use secrecy::{ExposeSecret, SecretString};

/// Keywords pgleap understands, as libpq spells them.
const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "connect_timeout",
    "application_name",
    "options",
    "target_session_attrs",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "service",
    "fallback_application_name",
    "client_encoding",
    "gssencmode",
    "channel_binding",
    "sslsni",
    "load_balance_hosts",
];

/// libpq keywords pgleap does not implement: refused by name rather than
/// silently ignored, since each changes how or to what one connects.
const UNSUPPORTED: &[&str] = &[
    "require_auth",
    "replication",
    "requiressl",
    "sslnegotiation",
    "sslcompression",
    "sslpassword",
    "sslcertmode",
    "sslcrl",
    "sslcrldir",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
];

/// Values of keywords pgleap honours only in part (libpq's others would
/// change the connection's meaning).
const ACCEPTED_VALUES: &[(&str, &[&str])] = &[
    ("target_session_attrs", &["any", "read-write"]),
    ("client_encoding", &["UTF8", "utf8", "UTF-8", "utf-8", "auto"]),
    ("gssencmode", &["disable", "prefer"]),
    ("channel_binding", &["disable", "prefer", "require"]),
    ("load_balance_hosts", &["disable", "random"]),
    ("sslsni", &["1"]),
];

/// The `PG*` environment variables that fill a missing keyword, in libpq's
/// pairing. `PGPASSWORD` and `PGPASSFILE` are handled with the password.
const ENV_FALLBACKS: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("hostaddr", "PGHOSTADDR"),
    ("port", "PGPORT"),
    ("dbname", "PGDATABASE"),
    ("user", "PGUSER"),
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("application_name", "PGAPPNAME"),
    ("options", "PGOPTIONS"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
    ("client_encoding", "PGCLIENTENCODING"),
    ("gssencmode", "PGGSSENCMODE"),
    ("channel_binding", "PGCHANNELBINDING"),
    ("load_balance_hosts", "PGLOADBALANCEHOSTS"),
    ("tcp_user_timeout", "PGTCPUSERTIMEOUT"),
    ("service", "PGSERVICE"),
];

/// Reads an environment variable; a seam so tests of resolution need no
/// process-wide state.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, as an [`Env`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A connection string that could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum ConninfoError {
    #[error("invalid connection string: {0}")]
    Syntax(String),
    #[error("invalid connection option \"{0}\"")]
    UnknownKeyword(String),
    #[error(
        "invalid sslmode value \"{0}\" (expected disable, allow, prefer, require, verify-ca or verify-full)"
    )]
    SslMode(String),
    #[error("invalid port \"{0}\"")]
    Port(String),
    #[error("connection option \"{0}\" is a libpq option pgleap does not support")]
    Unsupported(String),
    #[error("connection option {0}={1} is not supported (pgleap takes {2})")]
    UnsupportedValue(String, String, String),
    #[error("service \"{0}\" is not defined in {1}")]
    NoService(String, String),
    #[error("sslrootcert=system needs sslmode=verify-full (not {0})")]
    SystemRootsNeedVerifyFull(String),
}

/// libpq's `sslmode`, all six of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<Self, ConninfoError> {
        Ok(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(ConninfoError::SslMode(other.to_string())),
        })
    }
}

/// What the user typed: libpq keywords and their values, nothing inferred.
///
/// This is what the catalog stores (without the password, see
/// [`ConnParams::without_password`]).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ConnParams {
    values: BTreeMap<String, String>,
}

impl fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnParams({self})")
    }
}

impl fmt::Display for ConnParams {
    /// A key/value string with the password masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (k, v) in &self.values {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            if k == "password" {
                write!(f, "password=********")?;
            } else {
                write!(f, "{k}={}", quote_value(v))?;
            }
        }
        Ok(())
    }
}

impl ConnParams {
    /// Parses a libpq connection string: a `postgresql://` / `postgres://`
    /// URI, or `key=value` pairs. An empty string is valid and means "all
    /// defaults".
    pub fn parse(s: &str) -> Result<Self, ConninfoError> {
        let trimmed = s.trim();
        let params = if trimmed.starts_with("postgresql://") || trimmed.starts_with("postgres://") {
            parse_uri(trimmed)?
        } else {
            parse_key_value(trimmed)?
        };
        for (key, value) in &params.values {
            check_keyword(key, value)?;
        }
        if let Some(mode) = params.get("sslmode") {
            SslMode::parse(mode)?;
        }
        if let Some(port) = params.get("port") {
            for p in port.split(',') {
                if p.parse::<u16>().is_err() {
                    return Err(ConninfoError::Port(p.to_string()));
                }
            }
        }
        Ok(params)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Sets a keyword; an empty value removes it, as libpq treats it.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConninfoError> {
        if value.is_empty() && !KEYWORDS.contains(&key) {
            return Err(ConninfoError::UnknownKeyword(key.to_string()));
        }
        if !value.is_empty() {
            check_keyword(key, value)?;
        }
        if key == "sslmode" {
            SslMode::parse(value)?;
        }
        if value.is_empty() {
            self.values.remove(key);
        } else {
            self.values.insert(key.to_string(), value.to_string());
        }
        Ok(())
    }

    /// The password, if the string carried one.
    pub fn take_password(&mut self) -> Option<SecretString> {
        self.values.remove("password").map(SecretString::from)
    }

    pub fn without_password(&self) -> Self {
        let mut copy = self.clone();
        copy.values.remove("password");
        copy
    }

    /// Fills every keyword the user did not give from its `PG*` environment
    /// variable. Used once, at `db add`, so that the catalog entry names a
    /// fixed server rather than whatever the environment says later.
    pub fn fill_from_env(&mut self, env: Env<'_>) {
        for (key, var) in ENV_FALLBACKS {
            if !self.values.contains_key(*key)
                && let Some(v) = env(var).filter(|v| !v.is_empty())
            {
                self.values.insert((*key).to_string(), v);
            }
        }
    }

    /// The key/value form stored in the catalog. The password, if any, is
    /// dropped: it is stored apart (and only when the user asked).
    pub fn to_conninfo_string(&self) -> String {
        self.without_password().to_string()
    }
}

/// Refuses what pgleap does not honour, by name: an unknown keyword, a
/// libpq keyword it does not implement, a value of one it honours in part.
fn check_keyword(key: &str, value: &str) -> Result<(), ConninfoError> {
    if UNSUPPORTED.contains(&key) {
        return Err(ConninfoError::Unsupported(key.to_string()));
    }
    if !KEYWORDS.contains(&key) {
        return Err(ConninfoError::UnknownKeyword(key.to_string()));
    }
    if let Some((_, ok)) = ACCEPTED_VALUES.iter().find(|(k, _)| *k == key)
        && !ok.contains(&value)
    {
        return Err(ConninfoError::UnsupportedValue(key.into(), value.into(), ok.join(", ")));
    }
    Ok(())
}

/// Reads the `service` section of a pg_service.conf file: its keywords.
fn service_section(text: &str, service: &str) -> Option<Vec<(String, String)>> {
    let mut inside = false;
    let mut found = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            inside = line[1..line.len() - 1].trim() == service;
            found |= inside;
            continue;
        }
        if inside && let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    found.then_some(out)
}

/// Fills, from the service named by `service` (or `PGSERVICE`), the
/// keywords the string did not give: libpq's order is the string, then the
/// service file, then the environment. The per-user file
/// (`PGSERVICEFILE`, else `~/.pg_service.conf`) is read before the system
/// one (`PGSYSCONFDIR/pg_service.conf`, else Debian's
/// /etc/postgresql-common/pg_service.conf).
fn fill_from_service(
    p: &mut ConnParams,
    env: Env<'_>,
    home: Option<&Path>,
) -> Result<(), ConninfoError> {
    let Some(service) = p.get("service").map(str::to_string).or_else(|| env("PGSERVICE")) else {
        return Ok(());
    };
    let mut files: Vec<PathBuf> = Vec::new();
    match env("PGSERVICEFILE") {
        Some(f) => files.push(PathBuf::from(f)),
        None => files.extend(home.map(|h| h.join(".pg_service.conf"))),
    }
    match env("PGSYSCONFDIR") {
        Some(d) => files.push(PathBuf::from(d).join("pg_service.conf")),
        None => files.push(PathBuf::from("/etc/postgresql-common/pg_service.conf")),
    }
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        if let Some(entries) = service_section(&text, &service) {
            for (k, v) in entries {
                check_keyword(&k, &v)?;
                if k != "service" && !p.values.contains_key(&k) {
                    p.values.insert(k, v);
                }
            }
            p.values.remove("service");
            return Ok(());
        }
    }
    let searched: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    Err(ConninfoError::NoService(service, searched.join(" or ")))
}

/// A number of seconds, as libpq's keepalive keywords take them.
fn seconds(v: Option<&str>) -> Option<std::time::Duration> {
    v.and_then(|v| v.parse::<u64>().ok()).map(std::time::Duration::from_secs)
}

/// The system's trust store, for `sslrootcert=system`: `SSL_CERT_FILE`, else
/// the usual bundle of the distribution.
fn system_roots(env: Env<'_>) -> PathBuf {
    if let Some(f) = env("SSL_CERT_FILE") {
        return PathBuf::from(f);
    }
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"))
}

/// Quotes a value for a key/value connection string when it needs it.
fn quote_value(v: &str) -> String {
    if !v.is_empty() && !v.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\') {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

fn parse_key_value(s: &str) -> Result<ConnParams, ConninfoError> {
    let mut params = ConnParams::default();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConninfoError::Syntax(format!(
                "missing \"=\" after \"{key}\" (expected key=value pairs or a postgresql:// URI)"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(ConninfoError::Syntax(format!(
                            "unterminated quoted value for \"{key}\""
                        )));
                    }
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(ConninfoError::Syntax(format!(
                                "unterminated quoted value for \"{key}\""
                            )));
                        }
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if !value.is_empty() {
            params.values.insert(key, value);
        }
    }
    Ok(params)
}

fn decode(part: &str, what: &str) -> Result<String, ConninfoError> {
    percent_decode_str(part)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ConninfoError::Syntax(format!("invalid percent-encoding in the {what}")))
}

/// `postgresql://[user[:password]@][host][:port][,...][/dbname][?param=value&...]`
fn parse_uri(s: &str) -> Result<ConnParams, ConninfoError> {
    let mut params = ConnParams::default();
    let rest = s.split_once("://").map(|(_, r)| r).unwrap_or(s);
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let hosts_part = match authority.rfind('@') {
        Some(i) => {
            let userinfo = &authority[..i];
            match userinfo.split_once(':') {
                Some((u, p)) => {
                    put(&mut params, "user", decode(u, "user name")?);
                    put(&mut params, "password", decode(p, "password")?);
                }
                None => put(&mut params, "user", decode(userinfo, "user name")?),
            }
            &authority[i + 1..]
        }
        None => authority,
    };
    if !hosts_part.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for spec in hosts_part.split(',') {
            let (host, port) = if let Some(inner) = spec.strip_prefix('[') {
                let end = inner.find(']').ok_or_else(|| {
                    ConninfoError::Syntax("unterminated IPv6 address in the host".into())
                })?;
                let after = &inner[end + 1..];
                (&inner[..end], after.strip_prefix(':'))
            } else {
                match spec.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (spec, None),
                }
            };
            hosts.push(decode(host, "host")?);
            ports.push(port.map(str::to_string).unwrap_or_default());
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            put(&mut params, "host", hosts.join(","));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            put(&mut params, "port", ports.join(","));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        put(&mut params, "dbname", decode(db, "database name")?);
    }
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                ConninfoError::Syntax(format!("missing \"=\" in URI parameter \"{pair}\""))
            })?;
            let key = decode(k, "URI parameters")?;
            // libpq accepts JDBC's spelling in URIs.
            let key = if key == "ssl" && v == "true" {
                put(&mut params, "sslmode", "require".into());
                continue;
            } else {
                key
            };
            put(&mut params, &key, decode(v, "URI parameters")?);
        }
    }
    Ok(params)
}

fn put(params: &mut ConnParams, key: &str, value: String) {
    if !value.is_empty() {
        params.values.insert(key.to_string(), value);
    }
}

/// Where a connection's password comes from, in the order it is looked for.
#[derive(Clone, Default)]
pub struct PasswordSource {
    /// Stored in the catalog because the user asked (`--store-password`).
    pub stored: Option<SecretString>,
    /// A file holding just the password (`--password-file`).
    pub file: Option<PathBuf>,
}

/// A connection with every default applied, ready to dial.
#[derive(Clone)]
pub struct ResolvedConn {
    pub hosts: Vec<String>,
    pub ports: Vec<u16>,
    pub hostaddr: Option<String>,
    pub dbname: String,
    pub user: String,
    pub password: Option<SecretString>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub connect_timeout: Option<std::time::Duration>,
    pub application_name: String,
    pub options: Option<String>,
    /// `target_session_attrs=read-write`: skip hosts whose sessions are
    /// read-only (a standby).
    pub read_write: bool,
    /// Keepalives, TCP user timeout, channel binding, host load balancing,
    /// as libpq spells them (already checked).
    pub keepalives: Option<bool>,
    pub keepalives_idle: Option<std::time::Duration>,
    pub keepalives_interval: Option<std::time::Duration>,
    pub keepalives_count: Option<u32>,
    pub tcp_user_timeout: Option<std::time::Duration>,
    pub channel_binding: Option<String>,
    pub load_balance_hosts: bool,
    /// Set when a password file or `.pgpass` was skipped, to say why.
    pub warnings: Vec<String>,
}

impl ResolvedConn {
    /// `user@host:port/dbname` for one host of the list.
    pub fn describe(&self, host: &str, port: u16) -> String {
        if host.starts_with('/') {
            format!("{}@[{}]:{}/{}", self.user, host, port, self.dbname)
        } else {
            format!("{}@{}:{}/{}", self.user, host, port, self.dbname)
        }
    }
}

impl fmt::Display for ResolvedConn {
    /// `user@host:port/dbname`: what an error message should name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = self.hosts.first().map(String::as_str).unwrap_or("");
        let port = self.ports.first().copied().unwrap_or(5432);
        if host.starts_with('/') {
            write!(f, "{}@[{}]:{}/{}", self.user, host, port, self.dbname)
        } else {
            write!(f, "{}@{}:{}/{}", self.user, host, port, self.dbname)
        }
    }
}

/// Errors while resolving a connection (before dialing).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot read the password file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Conninfo(#[from] ConninfoError),
}

impl ResolvedConn {
    /// Applies libpq's precedence: the connection string, then the `PG*`
    /// environment, then built-in defaults. The password is searched in the
    /// connection string, the stored or file password, `PGPASSWORD`, then the
    /// password file (`passfile`, `PGPASSFILE` or `~/.pgpass`).
    pub fn resolve(
        params: &ConnParams,
        password: &PasswordSource,
        env: Env<'_>,
    ) -> Result<Self, ResolveError> {
        let mut p = params.clone();
        let home = env("HOME").map(PathBuf::from).or_else(dirs::home_dir);
        fill_from_service(&mut p, env, home.as_deref())?;
        p.fill_from_env(env);

        let os_user =
            env("USER").or_else(|| env("LOGNAME")).unwrap_or_else(|| "postgres".to_string());
        let user = p.get("user").unwrap_or(&os_user).to_string();
        let dbname = p.get("dbname").unwrap_or(&user).to_string();
        let hosts: Vec<String> = match p.get("host") {
            Some(h) => h.split(',').map(str::to_string).collect(),
            None => vec![default_socket_dir()],
        };
        let ports: Vec<u16> = match p.get("port") {
            Some(list) => list
                .split(',')
                .map(|s| s.parse().map_err(|_| ConninfoError::Port(s.to_string())))
                .collect::<Result<_, _>>()?,
            None => vec![5432],
        };
        // sslrootcert=system: the system's trust store, and verify-full
        // (libpq's rule: anything weaker would make trusting it pointless).
        let system = p.get("sslrootcert") == Some("system");
        let default_mode = if system { "verify-full" } else { "prefer" };
        let sslmode = SslMode::parse(p.get("sslmode").unwrap_or(default_mode))?;
        if system && sslmode != SslMode::VerifyFull {
            return Err(ConninfoError::SystemRootsNeedVerifyFull(
                p.get("sslmode").unwrap_or_default().to_string(),
            )
            .into());
        }
        if system {
            p.values.insert("sslrootcert".into(), system_roots(env).display().to_string());
        }
        let postgresql_dir = home.as_ref().map(|h| h.join(".postgresql"));
        let file_or_default = |key: &str, default: &str| -> Option<PathBuf> {
            match p.get(key) {
                Some(v) => Some(PathBuf::from(v)),
                None => postgresql_dir.as_ref().map(|d| d.join(default)).filter(|f| f.exists()),
            }
        };
        let sslrootcert = file_or_default("sslrootcert", "root.crt");
        let sslcert = file_or_default("sslcert", "postgresql.crt");
        let sslkey = file_or_default("sslkey", "postgresql.key");
        let connect_timeout = p
            .get("connect_timeout")
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map(|s| std::time::Duration::from_secs(s.max(2)));

        let mut resolved = ResolvedConn {
            hosts,
            ports,
            hostaddr: p.get("hostaddr").map(str::to_string),
            dbname,
            user,
            password: None,
            sslmode,
            sslrootcert,
            sslcert,
            sslkey,
            connect_timeout,
            application_name: p
                .get("application_name")
                .or(p.get("fallback_application_name"))
                .unwrap_or("pgleap")
                .to_string(),
            options: p.get("options").map(str::to_string),
            read_write: p.get("target_session_attrs") == Some("read-write"),
            keepalives: p.get("keepalives").map(|v| v != "0"),
            keepalives_idle: seconds(p.get("keepalives_idle")),
            keepalives_interval: seconds(p.get("keepalives_interval")),
            keepalives_count: p.get("keepalives_count").and_then(|v| v.parse().ok()),
            tcp_user_timeout: p
                .get("tcp_user_timeout")
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|ms| *ms > 0)
                .map(std::time::Duration::from_millis),
            channel_binding: p.get("channel_binding").map(str::to_string),
            load_balance_hosts: p.get("load_balance_hosts") == Some("random"),
            warnings: Vec::new(),
        };

        resolved.password = if let Some(pw) = p.get("password") {
            Some(SecretString::from(pw.to_string()))
        } else if let Some(pw) = &password.stored {
            Some(pw.clone())
        } else if let Some(path) = &password.file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ResolveError::PasswordFile { path: path.clone(), source })?;
            Some(SecretString::from(text.trim_end_matches(['\n', '\r']).to_string()))
        } else if let Some(pw) = env("PGPASSWORD").filter(|v| !v.is_empty()) {
            Some(SecretString::from(pw))
        } else {
            let passfile = p
                .get("passfile")
                .map(PathBuf::from)
                .or_else(|| env("PGPASSFILE").map(PathBuf::from))
                .or_else(|| home.as_ref().map(|h| h.join(".pgpass")));
            match passfile {
                Some(f) => resolved.lookup_pgpass(&f),
                None => None,
            }
        };
        Ok(resolved)
    }

    /// The first matching line of a `.pgpass` file, as libpq reads it.
    fn lookup_pgpass(&mut self, path: &Path) -> Option<SecretString> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).ok()?;
        if meta.permissions().mode() & 0o077 != 0 {
            self.warnings.push(format!(
                "password file {} has group or world access and was ignored; \
                 permissions should be u=rw (0600) or less",
                path.display()
            ));
            return None;
        }
        let text = std::fs::read_to_string(path).ok()?;
        let host = self.hosts.first().cloned().unwrap_or_default();
        // libpq matches a socket connection against "localhost".
        let host =
            if host.starts_with('/') || host.is_empty() { "localhost".to_string() } else { host };
        let port = self.ports.first().copied().unwrap_or(5432).to_string();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let fields = split_pgpass_line(line);
            if fields.len() < 5 {
                continue;
            }
            let matches = |pattern: &str, value: &str| pattern == "*" || pattern == value;
            if matches(&fields[0], &host)
                && matches(&fields[1], &port)
                && matches(&fields[2], &self.dbname)
                && matches(&fields[3], &self.user)
            {
                return Some(SecretString::from(fields[4].clone()));
            }
        }
        None
    }

    pub fn password(&self) -> Option<&str> {
        self.password.as_ref().map(|p| p.expose_secret())
    }
}

/// Splits a `.pgpass` line on unescaped colons; `\:` and `\\` are escapes.
fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().unwrap().push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

/// Debian's libpq looks in /var/run/postgresql; upstream builds in /tmp.
fn default_socket_dir() -> String {
    if Path::new("/var/run/postgresql").is_dir() {
        "/var/run/postgresql".to_string()
    } else {
        "/tmp".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn parses_key_value_with_quotes_and_escapes() {
        let p =
            ConnParams::parse(r"host=db.example port=5433 dbname='my db' user=o\'neil").unwrap();
        assert_eq!(p.get("host"), Some("db.example"));
        assert_eq!(p.get("port"), Some("5433"));
        assert_eq!(p.get("dbname"), Some("my db"));
        assert_eq!(p.get("user"), Some("o'neil"));
        let again = ConnParams::parse(&p.to_conninfo_string()).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn parses_uri_with_percent_encoding_and_params() {
        let p = ConnParams::parse(
            "postgresql://al%40ice:s%3Acret@[::1]:6543/app%20db?sslmode=verify-full&sslrootcert=/x/ca.pem",
        )
        .unwrap();
        assert_eq!(p.get("user"), Some("al@ice"));
        assert_eq!(p.get("password"), Some("s:cret"));
        assert_eq!(p.get("host"), Some("::1"));
        assert_eq!(p.get("port"), Some("6543"));
        assert_eq!(p.get("dbname"), Some("app db"));
        assert_eq!(p.get("sslmode"), Some("verify-full"));
        assert_eq!(p.get("sslrootcert"), Some("/x/ca.pem"));
    }

    #[test]
    fn uri_with_several_hosts_and_socket_dir() {
        let p = ConnParams::parse("postgres://h1:5432,h2:5433/db").unwrap();
        assert_eq!(p.get("host"), Some("h1,h2"));
        assert_eq!(p.get("port"), Some("5432,5433"));
        let s = ConnParams::parse("postgresql://%2Fvar%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!(s.get("host"), Some("/var/run/postgresql"));
    }

    #[test]
    fn rejects_malformed_strings() {
        assert!(matches!(ConnParams::parse("host"), Err(ConninfoError::Syntax(_))));
        assert!(matches!(ConnParams::parse("host='x"), Err(ConninfoError::Syntax(_))));
        assert!(
            matches!(ConnParams::parse("hots=x"), Err(ConninfoError::UnknownKeyword(k)) if k == "hots")
        );
        assert!(matches!(ConnParams::parse("sslmode=always"), Err(ConninfoError::SslMode(_))));
        assert!(matches!(ConnParams::parse("port=54x"), Err(ConninfoError::Port(_))));
    }

    #[test]
    fn display_masks_the_password() {
        let p = ConnParams::parse("postgresql://u:hunter2@h/db").unwrap();
        let shown = format!("{p} {p:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!p.to_conninfo_string().contains("password"));
    }

    #[test]
    fn environment_fills_only_missing_values() {
        let env = |k: &str| match k {
            "PGHOST" => Some("envhost".to_string()),
            "PGPORT" => Some("6000".to_string()),
            "PGUSER" => Some("envuser".to_string()),
            "PGPASSWORD" => Some("envpw".to_string()),
            _ => None,
        };
        let r = ResolvedConn::resolve(
            &ConnParams::parse("host=given").unwrap(),
            &PasswordSource::default(),
            &env,
        )
        .unwrap();
        assert_eq!(r.hosts, vec!["given"]);
        assert_eq!(r.ports, vec![6000]);
        assert_eq!(r.user, "envuser");
        assert_eq!(r.dbname, "envuser");
        assert_eq!(r.password(), Some("envpw"));
    }

    #[test]
    fn pgpass_matching_follows_libpq() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            "# comment\nother:5432:*:*:nope\nlocalhost:5432:app:bob:sock\\:pw\n*:*:*:bob:any\n",
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = file.to_str().unwrap().to_string();
        let env = move |k: &str| (k == "PGPASSFILE").then(|| path.clone());
        let sock = ConnParams::parse("host=/tmp dbname=app user=bob").unwrap();
        let r = ResolvedConn::resolve(&sock, &PasswordSource::default(), &env).unwrap();
        assert_eq!(r.password(), Some("sock:pw"));
        let tcp = ConnParams::parse("host=db1 dbname=app user=bob").unwrap();
        let r = ResolvedConn::resolve(&tcp, &PasswordSource::default(), &env).unwrap();
        assert_eq!(r.password(), Some("any"));

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let r = ResolvedConn::resolve(&tcp, &PasswordSource::default(), &env).unwrap();
        assert_eq!(r.password(), None);
        assert_eq!(r.warnings.len(), 1);
    }

    #[test]
    fn defaults_without_anything() {
        let r = ResolvedConn::resolve(&ConnParams::default(), &PasswordSource::default(), &no_env)
            .unwrap();
        assert_eq!(r.ports, vec![5432]);
        assert_eq!(r.sslmode, SslMode::Prefer);
        assert!(r.hostaddr.is_none() && r.hosts[0].starts_with('/'));
    }
}
