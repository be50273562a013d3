//! Talking to PostgreSQL: the one way pgleap connects ([`Conn`]), runs SQL
//! ([`Sql`], on a connection or a transaction [`Tx`]), streams COPY between
//! servers ([`copy_between`]), quotes, and reads the server version.
//!
//! A connection knows the catalog name of its database, so every failure
//! says which side it came from without the caller passing the name along;
//! the server's error is kept as the source, with its SQLSTATE.
//!
//! Every connection pins the session settings that make text output identical
//! across major versions (DateStyle, IntervalStyle, extra_float_digits,
//! TimeZone, bytea_output). tokio-postgres already forces
//! `client_encoding=UTF8` in its startup packet.

mod conn;
pub mod conninfo;
mod console;
pub mod tls;

use std::fmt;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config};

pub use conn::{Conn, Marked, PgError, Sql, Tx, copy_between, copy_between_marked};
pub use conninfo::{
    ConnParams, ConninfoError, Env, PasswordSource, ResolvedConn, SslMode, process_env,
};
pub use console::Console;

/// Settings sent in the startup packet of every connection.
/// `default_transaction_read_only=off` keeps pgleap able to tear down on a
/// source that `cutover --terminate` made read-only by default;
/// `row_security=off` makes a table whose row security applies to pgleap's
/// role (FORCE ROW LEVEL SECURITY, without BYPASSRLS) fail loudly instead
/// of returning fewer rows.
const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 \
                               -c TimeZone=UTC -c bytea_output=hex \
                               -c default_transaction_read_only=off -c row_security=off";

/// A libpq connect_timeout is infinite by default; a migration tool that
/// hangs on a firewalled host is worse than one that says so.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection could not be made, classified so the message can say
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach the server at {target}: {detail}")]
    Unreachable { target: String, detail: String },
    #[error("authentication failed for {target}: {detail}")]
    Auth { target: String, detail: String },
    #[error("database \"{dbname}\" does not exist on the server at {target}")]
    NoDatabase { target: String, dbname: String },
    #[error("TLS setup failed for {target}: {detail}")]
    Tls { target: String, detail: String },
    #[error(transparent)]
    TlsConfig(#[from] tls::TlsError),
    #[error("connection to {target} failed: {detail}")]
    Other { target: String, detail: String },
    #[error("no host answered: {attempts}")]
    NoHost { attempts: String },
}

impl ConnectError {
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            Self::Unreachable { .. } => {
                "check host and port, that the server runs and accepts TCP connections \
                 (listen_addresses, pg_hba.conf, firewalls)"
                    .into()
            }
            Self::Auth { .. } => "check the user name and the password: pgleap reads it from \
                 --password-file, PGPASSWORD or ~/.pgpass (or a password stored with \
                 --store-password)"
                .into(),
            Self::NoDatabase { dbname, .. } => {
                format!("create it first (createdb \"{dbname}\") or fix the dbname")
            }
            Self::Tls { .. } | Self::TlsConfig(_) => {
                "check sslmode and sslrootcert (verify-full also checks the host name)".into()
            }
            Self::Other { .. } => return None,
            Self::NoHost { .. } => "check each host above: address, port, that the server runs \
                                    and accepts the connection"
                .into(),
        })
    }
}

/// A catalog query under a name, as built for one server version: what
/// `pgleap db check-queries` prepares.
pub struct NamedQuery {
    pub name: String,
    pub sql: String,
}

impl NamedQuery {
    pub fn new(name: impl Into<String>, sql: impl Into<String>) -> Self {
        Self { name: name.into(), sql: sql.into() }
    }
}

/// `and a.attgenerated = ''` (alias `a` for pg_attribute) where the
/// server has generated columns: leaves them out.
pub fn not_generated(v: PgVersion) -> &'static str {
    if v.has_generated_columns() { "and a.attgenerated = ''" } else { "" }
}

/// A server's version, from `server_version_num`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PgVersion(pub u32);

impl PgVersion {
    pub fn major(self) -> u32 {
        self.0 / 10000
    }
    pub fn minor(self) -> u32 {
        self.0 % 10000
    }

    // What a server has, by the release that brought it: catalog SQL asks
    // these, never a bare major number.

    /// `pg_index.indnkeyatts` (INCLUDE columns): 11.
    pub fn has_include_columns(self) -> bool {
        self.major() >= 11
    }
    /// `pg_proc.prokind` (before: `proisagg`, `proiswindow`): 11.
    pub fn has_prokind(self) -> bool {
        self.major() >= 11
    }
    /// Row triggers and keys on partitioned tables: 11.
    pub fn has_partitioned_row_triggers(self) -> bool {
        self.major() >= 11
    }
    /// `hashtextextended(text, seed)`, a 64-bit hash of text: 11.
    pub fn has_hashtextextended(self) -> bool {
        self.major() >= 11
    }
    /// The `jit` setting (JIT compilation of costly plans): 11.
    pub fn has_jit(self) -> bool {
        self.major() >= 11
    }
    /// Nondeterministic collations (`pg_collation.collisdeterministic`): 12.
    pub fn has_nondeterministic_collations(self) -> bool {
        self.major() >= 12
    }
    /// Generated columns (`pg_attribute.attgenerated`): 12.
    pub fn has_generated_columns(self) -> bool {
        self.major() >= 12
    }
    /// `pg_trigger.tgparentid` (before, a partition's clones were internal): 13.
    pub fn has_tgparentid(self) -> bool {
        self.major() >= 13
    }
    /// Extensions a non-superuser with CREATE may create: 13.
    pub fn has_trusted_extensions(self) -> bool {
        self.major() >= 13
    }
    /// SQL-standard function bodies (`pg_proc.prosqlbody`): 14.
    pub fn has_sql_function_bodies(self) -> bool {
        self.major() >= 14
    }
    /// TID range scans (`ctid >= ... and ctid < ...` reads only those blocks): 14.
    pub fn has_tid_range_scans(self) -> bool {
        self.major() >= 14
    }
    /// `pg_locks.waitstart` (when a lock wait began): 14.
    pub fn has_lock_waitstart(self) -> bool {
        self.major() >= 14
    }
    /// `reltuples = -1` for "never vacuumed or analyzed" (before: 0): 14.
    pub fn has_unknown_reltuples(self) -> bool {
        self.major() >= 14
    }
}

impl fmt::Display for PgVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

/// What a connection's startup packet carries besides the login.
#[derive(Clone, Copy, PartialEq)]
enum Startup {
    /// The pinned session settings: every connection to a database.
    Pinned,
    /// Nothing more: a pooler's admin console refuses unknown parameters.
    Plain,
}

/// Opens a connection; the I/O task runs on the current tokio runtime and
/// logs server notices through tracing. Several hosts are tried in order
/// (shuffled with `load_balance_hosts=random`), libpq's way; when none
/// answers, the error names each host and why.
async fn connect(conn: &ResolvedConn, startup: Startup) -> Result<Client, ConnectError> {
    for warning in &conn.warnings {
        tracing::warn!("{warning}");
    }
    let mut order: Vec<usize> = (0..conn.hosts.len()).collect();
    if conn.load_balance_hosts {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize);
        let n = order.len().max(1);
        order.rotate_left(seed % n);
    }
    let mut failures = Vec::new();
    let mut last = None;
    for i in order {
        let host = &conn.hosts[i];
        // libpq: one port for every host, or one port per host.
        let port = conn.ports.get(i).or(conn.ports.first()).copied().unwrap_or(5432);
        let target = conn.describe(host, port);
        // connect_timeout bounds the whole attempt, as libpq's does: a
        // server that accepts the socket and then stops answering (stopped,
        // swapping, behind a dead proxy) must not hang the caller.
        let limit = conn.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let attempt = tokio::time::timeout(limit, connect_host(conn, startup, host, port, &target));
        let result = attempt.await.unwrap_or_else(|_| {
            Err(ConnectError::Unreachable {
                target: target.clone(),
                detail: format!(
                    "no answer within {} s (connect_timeout) to the connection and login",
                    limit.as_secs()
                ),
            })
        });
        match result {
            Ok(client) => return Ok(client),
            Err(e) => {
                failures.push(format!("{target}: {e}"));
                last = Some(e);
            }
        }
    }
    match (failures.len(), last) {
        (1, Some(e)) => Err(e),
        _ => Err(ConnectError::NoHost { attempts: failures.join("; ") }),
    }
}

/// The startup `options` of pgleap's sessions: the connection string's,
/// then the pinned session settings.
fn session_options(conn: &ResolvedConn) -> String {
    match &conn.options {
        Some(user) => format!("{user} {SESSION_OPTIONS}"),
        None => SESSION_OPTIONS.to_string(),
    }
}

/// One host of a connection string.
async fn connect_host(
    conn: &ResolvedConn,
    startup: Startup,
    host: &str,
    port: u16,
    target: &str,
) -> Result<Client, ConnectError> {
    let mut config = Config::new();
    if host.starts_with('/') {
        config.host_path(host);
    } else {
        config.host(host);
    }
    if let Some(addr) = &conn.hostaddr {
        let ip = addr.parse().map_err(|_| ConnectError::Other {
            target: target.to_string(),
            detail: format!("invalid hostaddr \"{addr}\""),
        })?;
        config.hostaddr(ip);
    }
    config.port(port);
    config.dbname(&conn.dbname);
    config.user(&conn.user);
    if let Some(pw) = conn.password() {
        config.password(pw);
    }
    config.application_name(&conn.application_name);
    let options = session_options(conn);
    if startup == Startup::Pinned {
        config.options(&options);
    }
    config.connect_timeout(conn.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT));
    tune(&mut config, conn);
    // libpq ignores sslmode on a unix socket; tokio-postgres would fail.
    let ssl_mode = match conn.sslmode {
        _ if host.starts_with('/') => tokio_postgres::config::SslMode::Disable,
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    };
    config.ssl_mode(ssl_mode);
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls::client_config(conn)?);
    let (client, connection) = config.connect(tls).await.map_err(|e| classify(e, conn, target))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("connection closed: {e}");
        }
    });
    if conn.read_write && startup == Startup::Pinned {
        // target_session_attrs=read-write: a standby cannot take writes
        // (pgleap's own sessions override a read-only default).
        let standby = client
            .query_one("select pg_is_in_recovery()", &[])
            .await
            .map_err(|e| classify(e, conn, target))?;
        if standby.get::<_, bool>(0) {
            return Err(ConnectError::Other {
                target: target.to_string(),
                detail: "the server is a standby (target_session_attrs=read-write)".into(),
            });
        }
    }
    Ok(client)
}

/// Keepalives, TCP user timeout and channel binding, as the string says.
fn tune(config: &mut Config, conn: &ResolvedConn) {
    use tokio_postgres::config::ChannelBinding;
    if let Some(on) = conn.keepalives {
        config.keepalives(on);
    }
    if let Some(d) = conn.keepalives_idle {
        config.keepalives_idle(d);
    }
    if let Some(d) = conn.keepalives_interval {
        config.keepalives_interval(d);
    }
    if let Some(n) = conn.keepalives_count {
        config.keepalives_retries(n);
    }
    if let Some(d) = conn.tcp_user_timeout {
        config.tcp_user_timeout(d);
    }
    match conn.channel_binding.as_deref() {
        Some("disable") => {
            config.channel_binding(ChannelBinding::Disable);
        }
        Some("require") => {
            config.channel_binding(ChannelBinding::Require);
        }
        _ => {}
    }
}

fn classify(e: tokio_postgres::Error, conn: &ResolvedConn, target: &str) -> ConnectError {
    let target = target.to_string();
    if let Some(db) = e.as_db_error() {
        let detail = db.message().to_string();
        return match *db.code() {
            SqlState::INVALID_PASSWORD | SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
                ConnectError::Auth { target, detail }
            }
            SqlState::INVALID_CATALOG_NAME => {
                ConnectError::NoDatabase { target, dbname: conn.dbname.clone() }
            }
            _ => ConnectError::Other { target, detail },
        };
    }
    let detail = error_chain(&e);
    if detail.contains("password missing") {
        return ConnectError::Auth {
            target,
            detail: "the server asked for a password and none was found".into(),
        };
    }
    if detail.contains("TLS") || detail.contains("certificate") || detail.contains("tls") {
        return ConnectError::Tls { target, detail };
    }
    if std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
        || detail.contains("timeout")
        || detail.contains("timed out")
    {
        return ConnectError::Unreachable { target, detail };
    }
    ConnectError::Other { target, detail }
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Quotes an identifier with the server's rules: always double-quoted, so
/// `select`, `Mixed Case` and `with"quote` all survive.
pub fn quote_ident(name: &str) -> String {
    postgres_protocol::escape::escape_identifier(name)
}

/// A lowercase identifier that needs no quoting: what pgleap accepts for
/// names of its own schema.
pub fn is_plain_identifier(name: &str) -> bool {
    name.len() <= 63
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `schema.name`, both parts quoted.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// Appends one field of a row in COPY's text format: `\N` for NULL, else
/// the value with backslash, tab, newline and carriage return escaped
/// (the value itself is its type's text form, which COPY reads with the
/// column's input function).
pub fn copy_field(out: &mut String, value: Option<&str>) {
    let Some(value) = value else {
        out.push_str("\\N");
        return;
    };
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// An array literal of `elements` (each its element type's text form),
/// every element quoted: `{"a","b\"c"}`.
pub fn array_literal<'a>(elements: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::from("{");
    for (i, e) in elements.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in e.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// Quotes a string literal with the server's rules (`E'...'` when needed).
pub fn quote_literal(value: &str) -> String {
    postgres_protocol::escape::escape_literal(value)
}
