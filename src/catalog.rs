//! The catalog: pgleap's own state, in an embedded SQLite file.
//!
//! It holds Bucardo's object model (databases, dbgroups, relgroups, syncs) so
//! that no server is needed to run pgleap itself. Several pgleap processes may
//! use one catalog at once: the file is in WAL mode, every write runs in a
//! `BEGIN IMMEDIATE` transaction (one writer at a time, readers never
//! blocked), and a busy timeout makes a second writer wait instead of fail.
//! Every check that guards a write ("name is free", "not in use") runs inside
//! that write transaction, so two processes cannot both pass it.
//!
//! The file is created with mode 0600: it may hold a password when the user
//! asked for `--store-password`.

use std::fmt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

/// Bumped when the schema below changes; older files are migrated in `open`.
const SCHEMA_VERSION: i64 = 4;

const SCHEMA: &str = "
create table if not exists meta (key text primary key, value text not null);
create table if not exists db (
    name text primary key,
    conninfo text not null,         -- libpq key/value string, never a password
    password_file text,
    password text,                  -- only with --store-password
    server_version text,
    created_at text not null default (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
create table if not exists dbgroup (
    name text primary key,
    created_at text not null default (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
create table if not exists dbgroup_member (
    dbgroup text not null references dbgroup(name) on delete cascade,
    db text not null references db(name),
    role text not null check (role in ('source', 'target')),
    position integer not null,
    primary key (dbgroup, db)
);
create table if not exists relgroup (
    name text primary key,
    db text not null references db(name),
    large_objects integer not null default 0,
    whole_schemas text not null default '[]', -- JSON: schemas taken whole (* for all)
    created_at text not null default (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
create table if not exists relgroup_member (
    relgroup text not null references relgroup(name) on delete cascade,
    schema_name text not null,
    rel_name text not null,
    kind text not null,
    key_columns text not null,      -- JSON array, empty for sequences
    est_bytes integer not null,
    est_rows integer not null,
    primary key (relgroup, schema_name, rel_name)
);
create table if not exists sync (
    name text primary key,
    relgroup text not null references relgroup(name),
    dbgroup text not null references dbgroup(name),
    onetimecopy text not null,
    autokick integer not null,
    capture_schema text not null,
    retired integer not null default 0,
    lo_interval integer not null default 10,  -- seconds between large-object passes
    paused text,                    -- why apply stopped (a schema change), until resumed
    created_at text not null default (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
-- Each cutover's measured write downtime.
create table if not exists cutover (
    sync text not null,
    at text not null default (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    fence_ms integer not null,
    rollback_sync text,             -- the sync back, when one was armed
    target text                     -- the target switched to (null: the only one)
);
-- A cutover under way, recorded before each step it cannot take back, so
-- that a rerun finishes or undoes what a killed one left.
create table if not exists cutover_progress (
    sync text primary key,
    step text not null,             -- fencing, switched
    pid integer not null,
    started_at text not null default (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    terminate integer not null,
    rollback_sync text,
    keep_sync text                  -- the sync from the new server to the other targets
);
-- What the last rounds of a sync did, per target: written by whoever ran
-- the round (daemon or kick), read by status.
create table if not exists sync_state (
    sync text not null references sync(name) on delete cascade,
    target text not null,
    last_good text,
    last_good_ms integer,
    last_inserts integer,
    last_deletes integer,
    last_bad text,
    last_bad_ms integer,
    last_error text,
    last_sqlstate text,
    state text not null,
    primary key (sync, target)
);
";

/// The four kinds of named object, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Db,
    DbGroup,
    RelGroup,
    Sync,
}

impl ObjectKind {
    /// The CLI noun that manages this kind.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Db => "db",
            Self::DbGroup => "dbgroup",
            Self::RelGroup => "relgroup",
            Self::Sync => "sync",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Db => "database",
            Self::DbGroup => "dbgroup",
            Self::RelGroup => "relgroup",
            Self::Sync => "sync",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the catalog at {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{kind} \"{name}\" does not exist")]
    NotFound {
        kind: ObjectKind,
        name: String,
        /// The existing name closest to it, when one is close.
        nearest: Option<String>,
    },
    #[error("{kind} \"{name}\" already exists")]
    AlreadyExists { kind: ObjectKind, name: String },
    #[error("{kind} \"{name}\" is in use by {}", users.join(", "))]
    InUse { kind: ObjectKind, name: String, users: Vec<String>, force_allowed: bool },
    #[error("catalog {path} has schema version {version}, newer than this pgleap knows")]
    Newer { path: PathBuf, version: i64 },
}

impl CatalogError {
    pub fn hint(&self) -> Option<String> {
        match self {
            Self::NotFound { kind, nearest: Some(near), .. } => Some(format!(
                "did you mean \"{near}\"? (`pgleap {} list` shows the {kind}s that exist)",
                kind.noun()
            )),
            Self::NotFound { kind, .. } => {
                Some(format!("`pgleap {} list` shows the {kind}s that exist", kind.noun()))
            }
            Self::AlreadyExists { kind, name } => Some(format!(
                "choose another name, or remove the old one first (`pgleap {} remove {name}`)",
                kind.noun()
            )),
            Self::InUse { force_allowed: true, kind, .. } => {
                Some(format!("remove those first, or add --force to take the {kind} out of them"))
            }
            Self::InUse { .. } => Some("remove those first".into()),
            Self::Create { path, .. } => Some(format!(
                "check that the directory of {} exists or can be created, and is writable by \
                 this user; or choose another file with --catalog PATH (PGLEAP_CATALOG)",
                path.display()
            )),
            Self::Sqlite { path, source } => Some(match source.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                    "another pgleap process holds the catalog for long: retry when it is done"
                        .into()
                }
                Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                    format!(
                        "{} is not a pgleap catalog, or is damaged: point --catalog at the right \
                         file, or restore it from a backup (it only names databases, groups and \
                         syncs: recreating them with pgleap db/dbgroup/relgroup/sync add works too)",
                        path.display()
                    )
                }
                Some(rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::PermissionDenied)
                | Some(rusqlite::ErrorCode::CannotOpen) => format!(
                    "check that {} and its directory are readable and writable by this user",
                    path.display()
                ),
                _ => "see the message above; --catalog PATH chooses another file".into(),
            }),
            Self::Newer { version, .. } => Some(format!(
                "this catalog was written by a newer pgleap (schema {version}); use that version"
            )),
        }
    }
}

type Result<T, E = CatalogError> = std::result::Result<T, E>;

/// Puts the catalog in WAL mode. On a new file, processes opening it at
/// once race to convert it: converting needs an exclusive lock taken from a
/// shared one, and SQLite answers "database is locked" at once rather than
/// wait in the busy handler (waiting could deadlock two upgraders). So it is
/// retried here, within the busy timeout (seen under load: one of eight
/// `db add` run side by side failed).
fn wal_mode(conn: &Connection) -> rusqlite::Result<()> {
    let started = std::time::Instant::now();
    loop {
        match conn.pragma_update(None, "journal_mode", "wal") {
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                ) && started.elapsed() < Duration::from_secs(30) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// A database: a named connection.
#[derive(Debug, Clone, Serialize)]
pub struct Db {
    pub name: String,
    /// libpq key/value string without any password.
    pub conninfo: String,
    pub password_file: Option<String>,
    pub password_stored: bool,
    pub server_version: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Target,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Target => "target",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DbGroupMember {
    pub db: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize)]
pub struct DbGroup {
    pub name: String,
    pub members: Vec<DbGroupMember>,
    pub created_at: String,
}

impl DbGroup {
    pub fn source(&self) -> &str {
        self.members
            .iter()
            .find(|m| m.role == Role::Source)
            .map(|m| m.db.as_str())
            .unwrap_or_default()
    }
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.members.iter().filter(|m| m.role == Role::Target).map(|m| m.db.as_str())
    }
}

/// One table or sequence of a relgroup, as resolved on the source.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Relation {
    pub schema: String,
    pub name: String,
    /// "table", "partitioned table" or "sequence".
    pub kind: String,
    pub key_columns: Vec<String>,
    pub est_bytes: i64,
    pub est_rows: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RelGroup {
    pub name: String,
    pub db: String,
    pub members: Vec<Relation>,
    /// Whether the database's large objects are migrated with it.
    pub large_objects: bool,
    /// The schemas it took whole (`--schema`; "*" for `--all-tables`):
    /// tables created there later are reported as not captured.
    pub whole_schemas: Vec<String>,
    pub created_at: String,
}

/// Bucardo's onetimecopy: 0 never, 1 always, 2 only into empty tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OneTimeCopy {
    Never,
    Always,
    IfEmpty,
}

impl OneTimeCopy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Never => "never",
            Self::Always => "always",
            Self::IfEmpty => "if-empty",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "never" | "0" => Self::Never,
            "always" | "1" => Self::Always,
            "if-empty" | "2" => Self::IfEmpty,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Sync {
    pub name: String,
    pub relgroup: String,
    pub dbgroup: String,
    pub onetimecopy: OneTimeCopy,
    pub autokick: bool,
    /// The schema holding pgleap's objects on the servers of this sync.
    pub capture_schema: String,
    /// No longer replicated: set at cutover, and by teardown before it
    /// removes server objects, so that a running daemon stops working on the
    /// sync instead of recreating target objects (or setting aside foreign
    /// keys the cutover put back).
    #[serde(skip)]
    pub retired: bool,
    pub created_at: String,
    /// Seconds between two large-object passes of the daemon (0: every
    /// round).
    pub lo_interval: u32,
    /// Why apply stopped, when it did: a schema change on the source that
    /// pgleap cannot follow by itself. Nothing is applied until `sync
    /// resume`.
    pub paused: Option<String>,
}

/// How a round of a sync ended, as status shows it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SyncState {
    /// Shown by the status entry that holds it, not twice.
    #[serde(skip)]
    pub target: String,
    /// "good" or "bad".
    pub state: String,
    pub last_good: Option<String>,
    pub last_good_ms: Option<i64>,
    pub last_inserts: Option<i64>,
    pub last_deletes: Option<i64>,
    pub last_bad: Option<String>,
    pub last_bad_ms: Option<i64>,
    pub last_error: Option<String>,
    pub last_sqlstate: Option<String>,
    /// Seconds since the last good and the last bad round, when read.
    pub last_good_age_s: Option<f64>,
    pub last_bad_age_s: Option<f64>,
}

/// The outcome of one round, to record.
pub enum RoundOutcome<'a> {
    Good { millis: i64, inserts: i64, deletes: i64 },
    Bad { millis: i64, error: &'a str, sqlstate: Option<&'a str> },
}

/// Fields of a database entry to write.
pub struct DbRecord<'a> {
    pub name: &'a str,
    pub conninfo: &'a str,
    pub password_file: Option<&'a str>,
    pub password: Option<&'a SecretString>,
    pub server_version: &'a str,
}

/// Brings a catalog written by an older pgleap to this schema: columns
/// added since are added with their defaults.
fn migrate(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    let has = |table: &str, column: &str| -> rusqlite::Result<bool> {
        let mut stmt = tx.prepare(&format!("select name from pragma_table_info('{table}')"))?;
        let names =
            stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
        Ok(names.iter().any(|n| n == column))
    };
    if !has("relgroup", "large_objects")? {
        tx.execute_batch(
            "alter table relgroup add column large_objects integer not null default 0",
        )?;
    }
    if !has("cutover", "rollback_sync")? {
        tx.execute_batch("alter table cutover add column rollback_sync text")?;
    }
    if !has("sync", "lo_interval")? {
        tx.execute_batch("alter table sync add column lo_interval integer not null default 10")?;
    }
    if !has("relgroup", "whole_schemas")? {
        tx.execute_batch(
            "alter table relgroup add column whole_schemas text not null default '[]'",
        )?;
    }
    if !has("sync", "paused")? {
        tx.execute_batch("alter table sync add column paused text")?;
    }
    if !has("cutover", "target")? {
        tx.execute_batch("alter table cutover add column target text")?;
    }
    if !has("cutover_progress", "keep_sync")? {
        tx.execute_batch("alter table cutover_progress add column keep_sync text")?;
    }
    Ok(())
}

/// A cutover as the catalog recorded it at its switch point.
#[derive(Debug, Clone)]
pub struct CutoverRecord {
    /// The write downtime it measured.
    pub fence_ms: i64,
    /// The target switched to (None: the sync's only one, or a cutover
    /// recorded before several targets could be cut over).
    pub target: Option<String>,
    /// When (UTC, ISO 8601).
    pub at: String,
}

/// A cutover under way, or left unfinished by a process that died.
#[derive(Debug, Clone)]
/// One sync at a switch point: [`Catalog::switch_point`].
pub struct SwitchPoint<'a> {
    pub sync: &'a str,
    pub target: &'a str,
    pub fence_ms: i64,
    pub rollback_sync: Option<&'a str>,
}

pub struct CutoverProgress {
    /// `fencing` (the source may be fenced; the switch point is not
    /// passed) or `switched` (passed; foreign keys still to validate).
    pub step: String,
    pub pid: u32,
    pub started_at: String,
    pub terminate: bool,
    pub rollback_sync: Option<String>,
    /// The sync keeping the other targets following the new server.
    pub keep_sync: Option<String>,
}

impl CutoverProgress {
    /// Whether the process that records it still runs (the catalog is a
    /// local file: its writers are processes of this machine).
    pub fn running(&self) -> bool {
        self.pid != std::process::id()
            && std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

impl Catalog {
    /// Where the catalog lives unless `--catalog` or `PGLEAP_CATALOG` say.
    pub fn default_path() -> PathBuf {
        dirs::data_dir().unwrap_or_else(|| PathBuf::from(".")).join("pgleap").join("catalog.db")
    }

    /// Opens the catalog, creating the file (0600) and its schema if needed.
    pub fn open(path: &Path) -> Result<Self> {
        let create = |source| CatalogError::Create { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(create)?;
        }
        if !path.exists() {
            // create_new is harmless if another process won the race.
            match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(create(e)),
            }
        }
        let sqlite = |source| CatalogError::Sqlite { path: path.to_path_buf(), source };
        let conn = Connection::open(path).map_err(sqlite)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(sqlite)?;
        wal_mode(&conn).map_err(sqlite)?;
        conn.pragma_update(None, "foreign_keys", "on").map_err(sqlite)?;
        conn.pragma_update(None, "synchronous", "normal").map_err(sqlite)?;
        let mut catalog = Catalog { conn, path: path.to_path_buf() };
        catalog.write(|tx| {
            let found: Option<String> = tx
                .query_row("select value from meta where key = 'schema_version'", [], |r| r.get(0))
                .optional()
                .or_else(|e| match e {
                    // A new file has no meta table yet.
                    rusqlite::Error::SqliteFailure(_, Some(m)) if m.contains("no such table") => {
                        Ok(None)
                    }
                    e => Err(e),
                })?;
            if let Some(version) = found.and_then(|v| v.parse::<i64>().ok())
                && version > SCHEMA_VERSION
            {
                return Err(WriteError::Catalog(CatalogError::Newer {
                    path: path.to_path_buf(),
                    version,
                }));
            }
            tx.execute_batch(SCHEMA)?;
            migrate(tx)?;
            tx.execute(
                "insert into meta (key, value) values ('schema_version', ?1)
                 on conflict (key) do update set value = excluded.value",
                params![SCHEMA_VERSION.to_string()],
            )?;
            Ok(())
        })?;
        Ok(catalog)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sqlite(&self, source: rusqlite::Error) -> CatalogError {
        CatalogError::Sqlite { path: self.path.clone(), source }
    }

    /// Runs `f` in one write transaction; an error rolls everything back.
    fn write<T>(&mut self, f: impl FnOnce(&Transaction<'_>) -> Result<T, WriteError>) -> Result<T> {
        let path = self.path.clone();
        let sqlite = |source| CatalogError::Sqlite { path: path.clone(), source };
        let tx =
            self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite)?;
        match f(&tx) {
            Ok(v) => {
                tx.commit().map_err(sqlite)?;
                Ok(v)
            }
            Err(WriteError::Sqlite(e)) => Err(sqlite(e)),
            Err(WriteError::Catalog(e)) => Err(e),
        }
    }

    /// Makes sure nobody but the owner can read the file; called before a
    /// password is stored in it.
    pub fn restrict_permissions(&self) -> Result<()> {
        let set = |p: &Path| {
            if p.exists() {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
            } else {
                Ok(())
            }
        };
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        let mut shm = self.path.clone().into_os_string();
        shm.push("-shm");
        for p in [self.path.clone(), wal.into(), shm.into()] {
            set(&p).map_err(|source| CatalogError::Create { path: p.clone(), source })?;
        }
        Ok(())
    }

    // ---- databases ----

    pub fn add_db(&mut self, rec: &DbRecord<'_>) -> Result<()> {
        self.write(|tx| {
            if exists(tx, "db", rec.name)? {
                return Err(already(ObjectKind::Db, rec.name));
            }
            tx.execute(
                "insert into db (name, conninfo, password_file, password, server_version)
                 values (?1, ?2, ?3, ?4, ?5)",
                params![
                    rec.name,
                    rec.conninfo,
                    rec.password_file,
                    rec.password.map(|p| p.expose_secret().to_string()),
                    rec.server_version
                ],
            )?;
            Ok(())
        })
    }

    /// Replaces a database entry's connection fields.
    pub fn update_db(&mut self, rec: &DbRecord<'_>) -> Result<()> {
        self.write(|tx| {
            let n = tx.execute(
                "update db set conninfo = ?2, password_file = ?3, password = ?4,
                        server_version = ?5
                 where name = ?1",
                params![
                    rec.name,
                    rec.conninfo,
                    rec.password_file,
                    rec.password.map(|p| p.expose_secret().to_string()),
                    rec.server_version
                ],
            )?;
            if n == 0 {
                return Err(not_found(ObjectKind::Db, rec.name));
            }
            Ok(())
        })
    }

    /// A name that does not exist, with the closest that does (a typo's).
    fn missing(&self, kind: ObjectKind, name: &str) -> CatalogError {
        let table = match kind {
            ObjectKind::Db => "db",
            ObjectKind::DbGroup => "dbgroup",
            ObjectKind::RelGroup => "relgroup",
            ObjectKind::Sync => "sync",
        };
        let names: Vec<String> = self
            .conn
            .prepare(&format!("select name from {table}"))
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .unwrap_or_default();
        let nearest = names
            .into_iter()
            .map(|n| (strsim::levenshtein(&n, name), n))
            .filter(|(d, _)| *d <= 2.max(name.len() / 3))
            .min()
            .map(|(_, n)| n);
        CatalogError::NotFound { kind, name: name.into(), nearest }
    }

    pub fn db(&self, name: &str) -> Result<Db> {
        self.dbs_where(Some(name))?.pop().ok_or_else(|| self.missing(ObjectKind::Db, name))
    }

    pub fn dbs(&self) -> Result<Vec<Db>> {
        self.dbs_where(None)
    }

    fn dbs_where(&self, name: Option<&str>) -> Result<Vec<Db>> {
        let mut stmt = self
            .conn
            .prepare(
                "select name, conninfo, password_file, password is not null, server_version,
                        created_at
                 from db where ?1 is null or name = ?1 order by name",
            )
            .map_err(|e| self.sqlite(e))?;
        let rows = stmt
            .query_map(params![name], |r| {
                Ok(Db {
                    name: r.get(0)?,
                    conninfo: r.get(1)?,
                    password_file: r.get(2)?,
                    password_stored: r.get(3)?,
                    server_version: r.get(4)?,
                    created_at: r.get(5)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.sqlite(e))?;
        Ok(rows)
    }

    pub fn stored_password(&self, name: &str) -> Result<Option<SecretString>> {
        self.conn
            .query_row("select password from db where name = ?1", params![name], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()
            .map(|o| o.flatten().map(SecretString::from))
            .map_err(|e| self.sqlite(e))
    }

    /// Removes a database. In use by a relgroup or a sync it is refused; in
    /// use by dbgroups it is refused unless `force`, which takes it out of
    /// them.
    pub fn remove_db(&mut self, name: &str, force: bool) -> Result<()> {
        self.write(|tx| {
            if !exists(tx, "db", name)? {
                return Err(not_found(ObjectKind::Db, name));
            }
            let syncs = column(
                tx,
                "select distinct 'sync ' || s.name from sync s
                 join dbgroup_member m on m.dbgroup = s.dbgroup
                 where m.db = ?1 order by 1",
                name,
            )?;
            let relgroups = column(
                tx,
                "select 'relgroup ' || name from relgroup where db = ?1 order by 1",
                name,
            )?;
            if !syncs.is_empty() || !relgroups.is_empty() {
                return Err(in_use(ObjectKind::Db, name, [syncs, relgroups].concat(), false));
            }
            let groups = column(
                tx,
                "select 'dbgroup ' || dbgroup from dbgroup_member where db = ?1 order by 1",
                name,
            )?;
            if !groups.is_empty() && !force {
                return Err(in_use(ObjectKind::Db, name, groups, true));
            }
            tx.execute("delete from dbgroup_member where db = ?1", params![name])?;
            tx.execute("delete from db where name = ?1", params![name])?;
            Ok(())
        })
    }

    /// The dbgroups and relgroups that name a database.
    pub fn db_users(&self, name: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for sql in [
            "select 'dbgroup ' || dbgroup || ' (' || role || ')' from dbgroup_member
             where db = ?1 order by 1",
            "select 'relgroup ' || name from relgroup where db = ?1 order by 1",
        ] {
            let mut stmt = self.conn.prepare(sql).map_err(|e| self.sqlite(e))?;
            let rows = stmt
                .query_map(params![name], |r| r.get::<_, String>(0))
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(|e| self.sqlite(e))?;
            out.extend(rows);
        }
        Ok(out)
    }

    // ---- dbgroups ----

    pub fn add_dbgroup(&mut self, name: &str, members: &[DbGroupMember]) -> Result<()> {
        self.write(|tx| {
            if exists(tx, "dbgroup", name)? {
                return Err(already(ObjectKind::DbGroup, name));
            }
            for m in members {
                if !exists(tx, "db", &m.db)? {
                    return Err(not_found(ObjectKind::Db, &m.db));
                }
            }
            tx.execute("insert into dbgroup (name) values (?1)", params![name])?;
            for (i, m) in members.iter().enumerate() {
                tx.execute(
                    "insert into dbgroup_member (dbgroup, db, role, position)
                     values (?1, ?2, ?3, ?4)",
                    params![name, m.db, m.role.as_str(), i as i64],
                )?;
            }
            Ok(())
        })
    }

    pub fn dbgroup(&self, name: &str) -> Result<DbGroup> {
        self.dbgroups_where(Some(name))?
            .pop()
            .ok_or_else(|| self.missing(ObjectKind::DbGroup, name))
    }

    pub fn dbgroups(&self) -> Result<Vec<DbGroup>> {
        self.dbgroups_where(None)
    }

    fn dbgroups_where(&self, name: Option<&str>) -> Result<Vec<DbGroup>> {
        let mut stmt = self
            .conn
            .prepare(
                "select g.name, g.created_at, m.db, m.role
                 from dbgroup g left join dbgroup_member m on m.dbgroup = g.name
                 where ?1 is null or g.name = ?1
                 order by g.name, m.position",
            )
            .map_err(|e| self.sqlite(e))?;
        let rows = stmt
            .query_map(params![name], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.sqlite(e))?;
        let mut groups: Vec<DbGroup> = Vec::new();
        for (name, created_at, db, role) in rows {
            if groups.last().is_none_or(|g| g.name != name) {
                groups.push(DbGroup { name, members: Vec::new(), created_at });
            }
            if let (Some(db), Some(role)) = (db, role) {
                let role = if role == "source" { Role::Source } else { Role::Target };
                groups.last_mut().unwrap().members.push(DbGroupMember { db, role });
            }
        }
        Ok(groups)
    }

    pub fn remove_dbgroup(&mut self, name: &str) -> Result<()> {
        self.write(|tx| {
            if !exists(tx, "dbgroup", name)? {
                return Err(not_found(ObjectKind::DbGroup, name));
            }
            let syncs =
                column(tx, "select 'sync ' || name from sync where dbgroup = ?1 order by 1", name)?;
            if !syncs.is_empty() {
                return Err(in_use(ObjectKind::DbGroup, name, syncs, false));
            }
            tx.execute("delete from dbgroup where name = ?1", params![name])?;
            Ok(())
        })
    }

    // ---- relgroups ----

    pub fn add_relgroup(
        &mut self,
        name: &str,
        db: &str,
        members: &[Relation],
        large_objects: bool,
        whole_schemas: &[String],
    ) -> Result<()> {
        self.write(|tx| {
            if exists(tx, "relgroup", name)? {
                return Err(already(ObjectKind::RelGroup, name));
            }
            if !exists(tx, "db", db)? {
                return Err(not_found(ObjectKind::Db, db));
            }
            let whole = serde_json::to_string(whole_schemas).expect("strings serialize");
            tx.execute(
                "insert into relgroup (name, db, large_objects, whole_schemas)
                 values (?1, ?2, ?3, ?4)",
                params![name, db, large_objects, whole],
            )?;
            let mut stmt = tx.prepare(
                "insert into relgroup_member
                   (relgroup, schema_name, rel_name, kind, key_columns, est_bytes, est_rows)
                 values (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for r in members {
                let keys = serde_json::to_string(&r.key_columns).expect("strings serialize");
                stmt.execute(params![
                    name,
                    r.schema,
                    r.name,
                    r.kind,
                    keys,
                    r.est_bytes,
                    r.est_rows
                ])?;
            }
            Ok(())
        })
    }

    pub fn relgroup(&self, name: &str) -> Result<RelGroup> {
        self.relgroups_where(Some(name))?
            .pop()
            .ok_or_else(|| self.missing(ObjectKind::RelGroup, name))
    }

    pub fn relgroups(&self) -> Result<Vec<RelGroup>> {
        self.relgroups_where(None)
    }

    fn relgroups_where(&self, name: Option<&str>) -> Result<Vec<RelGroup>> {
        let mut stmt = self
            .conn
            .prepare(
                "select g.name, g.db, g.created_at, m.schema_name, m.rel_name, m.kind,
                        m.key_columns, m.est_bytes, m.est_rows, g.large_objects, g.whole_schemas
                 from relgroup g left join relgroup_member m on m.relgroup = g.name
                 where ?1 is null or g.name = ?1
                 order by g.name, m.kind = 'sequence', m.schema_name, m.rel_name",
            )
            .map_err(|e| self.sqlite(e))?;
        let rows = stmt
            .query_map(params![name], |r| {
                let member = match r.get::<_, Option<String>>(3)? {
                    Some(schema) => Some(Relation {
                        schema,
                        name: r.get(4)?,
                        kind: r.get(5)?,
                        key_columns: serde_json::from_str(&r.get::<_, String>(6)?)
                            .unwrap_or_default(),
                        est_bytes: r.get(7)?,
                        est_rows: r.get(8)?,
                    }),
                    None => None,
                };
                let group: (String, String, String, bool, String) =
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(9)?, r.get(10)?);
                Ok((group, member))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.sqlite(e))?;
        let mut groups: Vec<RelGroup> = Vec::new();
        for ((name, db, created_at, large_objects, whole), member) in rows {
            if groups.last().is_none_or(|g| g.name != name) {
                let whole_schemas = serde_json::from_str(&whole).unwrap_or_default();
                groups.push(RelGroup {
                    name,
                    db,
                    members: Vec::new(),
                    large_objects,
                    whole_schemas,
                    created_at,
                });
            }
            if let Some(m) = member {
                groups.last_mut().unwrap().members.push(m);
            }
        }
        Ok(groups)
    }

    pub fn remove_relgroup(&mut self, name: &str) -> Result<()> {
        self.write(|tx| {
            if !exists(tx, "relgroup", name)? {
                return Err(not_found(ObjectKind::RelGroup, name));
            }
            let syncs = column(
                tx,
                "select 'sync ' || name from sync where relgroup = ?1 order by 1",
                name,
            )?;
            if !syncs.is_empty() {
                return Err(in_use(ObjectKind::RelGroup, name, syncs, false));
            }
            tx.execute("delete from relgroup where name = ?1", params![name])?;
            Ok(())
        })
    }

    // ---- syncs ----

    pub fn add_sync(&mut self, sync: &Sync) -> Result<()> {
        self.write(|tx| {
            if exists(tx, "sync", &sync.name)? {
                return Err(already(ObjectKind::Sync, &sync.name));
            }
            if !exists(tx, "relgroup", &sync.relgroup)? {
                return Err(not_found(ObjectKind::RelGroup, &sync.relgroup));
            }
            if !exists(tx, "dbgroup", &sync.dbgroup)? {
                return Err(not_found(ObjectKind::DbGroup, &sync.dbgroup));
            }
            tx.execute(
                "insert into sync
                   (name, relgroup, dbgroup, onetimecopy, autokick, capture_schema, lo_interval)
                 values (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    sync.name,
                    sync.relgroup,
                    sync.dbgroup,
                    sync.onetimecopy.as_str(),
                    sync.autokick,
                    sync.capture_schema,
                    sync.lo_interval
                ],
            )?;
            Ok(())
        })
    }

    pub fn update_sync(
        &mut self,
        name: &str,
        onetimecopy: Option<OneTimeCopy>,
        autokick: Option<bool>,
        lo_interval: Option<u32>,
    ) -> Result<()> {
        self.write(|tx| {
            let n = tx.execute(
                "update sync set onetimecopy = coalesce(?2, onetimecopy),
                                 autokick = coalesce(?3, autokick),
                                 lo_interval = coalesce(?4, lo_interval)
                 where name = ?1",
                params![name, onetimecopy.map(OneTimeCopy::as_str), autokick, lo_interval],
            )?;
            if n == 0 {
                return Err(not_found(ObjectKind::Sync, name));
            }
            Ok(())
        })
    }

    pub fn sync(&self, name: &str) -> Result<Sync> {
        self.syncs_where(Some(name))?.pop().ok_or_else(|| self.missing(ObjectKind::Sync, name))
    }

    pub fn syncs(&self) -> Result<Vec<Sync>> {
        self.syncs_where(None)
    }

    fn syncs_where(&self, name: Option<&str>) -> Result<Vec<Sync>> {
        let mut stmt = self
            .conn
            .prepare(
                "select name, relgroup, dbgroup, onetimecopy, autokick, capture_schema, retired,
                        created_at, lo_interval, paused
                 from sync
                 where ?1 is null or name = ?1 order by name",
            )
            .map_err(|e| self.sqlite(e))?;
        let rows = stmt
            .query_map(params![name], |r| {
                Ok(Sync {
                    name: r.get(0)?,
                    relgroup: r.get(1)?,
                    dbgroup: r.get(2)?,
                    onetimecopy: OneTimeCopy::parse(&r.get::<_, String>(3)?)
                        .unwrap_or(OneTimeCopy::IfEmpty),
                    autokick: r.get(4)?,
                    capture_schema: r.get(5)?,
                    retired: r.get(6)?,
                    created_at: r.get(7)?,
                    lo_interval: r.get(8)?,
                    paused: r.get(9)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.sqlite(e))?;
        Ok(rows)
    }

    /// The switch point of one cutover or of several taken in one fence (a
    /// server move): each sync's cutover recorded, the sync retired and its
    /// progress moved past the switch point, all in one transaction, so a
    /// kill leaves every sync before its switch point (undone by a rerun)
    /// or every one past it (finished by a rerun), never some of each.
    pub fn switch_point(&mut self, switched: &[SwitchPoint<'_>]) -> Result<()> {
        self.write(|tx| {
            for s in switched {
                tx.execute(
                    "insert into cutover (sync, target, fence_ms, rollback_sync)
                     values (?1, ?2, ?3, ?4)",
                    params![s.sync, s.target, s.fence_ms, s.rollback_sync],
                )?;
                if tx.execute("update sync set retired = 1 where name = ?1", params![s.sync])? == 0
                {
                    return Err(not_found(ObjectKind::Sync, s.sync));
                }
                tx.execute(
                    "update cutover_progress set step = 'switched' where sync = ?1",
                    params![s.sync],
                )?;
            }
            Ok(())
        })
    }

    /// Records that a cutover of `sync` starts fencing (by this process).
    pub fn begin_cutover(
        &mut self,
        sync: &str,
        terminate: bool,
        rollback_sync: Option<&str>,
        keep_sync: Option<&str>,
    ) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "insert into cutover_progress (sync, step, pid, terminate, rollback_sync, keep_sync)
                 values (?1, 'fencing', ?2, ?3, ?4, ?5)
                 on conflict (sync) do update set step = 'fencing', pid = excluded.pid,
                     started_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now'),
                     terminate = excluded.terminate, rollback_sync = excluded.rollback_sync,
                     keep_sync = excluded.keep_sync",
                params![sync, std::process::id(), terminate, rollback_sync, keep_sync],
            )?;
            Ok(())
        })
    }

    /// The cutover of `sync` under way (or left by a killed one), if any.
    pub fn cutover_progress(&self, sync: &str) -> Result<Option<CutoverProgress>> {
        self.conn
            .query_row(
                "select step, pid, started_at, terminate, rollback_sync, keep_sync
                 from cutover_progress where sync = ?1",
                params![sync],
                |r| {
                    Ok(CutoverProgress {
                        step: r.get(0)?,
                        pid: r.get(1)?,
                        started_at: r.get(2)?,
                        terminate: r.get(3)?,
                        rollback_sync: r.get(4)?,
                        keep_sync: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.sqlite(e))
    }

    /// A cutover of `sync` is over (finished, or undone).
    pub fn end_cutover(&mut self, sync: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute("delete from cutover_progress where sync = ?1", params![sync])?;
            Ok(())
        })
    }

    /// Whether `sync` was cut over.
    pub fn was_cut_over(&self, sync: &str) -> Result<bool> {
        self.conn
            .query_row(
                "select exists (select 1 from cutover where sync = ?1)",
                params![sync],
                |r| r.get(0),
            )
            .map_err(|e| self.sqlite(e))
    }

    /// What the last cutover of `sync` recorded, if it was cut over.
    pub fn last_cutover(&self, sync: &str) -> Result<Option<CutoverRecord>> {
        self.conn
            .query_row(
                "select fence_ms, target, at from cutover where sync = ?1
                 order by rowid desc limit 1",
                params![sync],
                |r| Ok(CutoverRecord { fence_ms: r.get(0)?, target: r.get(1)?, at: r.get(2)? }),
            )
            .optional()
            .map_err(|e| self.sqlite(e))
    }

    /// The sync whose cutover armed `sync` as its way back, if one did.
    pub fn rollback_for(&self, sync: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "select sync from cutover where rollback_sync = ?1 order by rowid desc limit 1",
                params![sync],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sqlite(e))
    }

    /// The sync back armed when `sync` was cut over, if one was.
    pub fn rollback_sync_of(&self, sync: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "select rollback_sync from cutover where sync = ?1 and rollback_sync is not null
                 order by rowid desc limit 1",
                params![sync],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sqlite(e))
    }

    pub fn retire_sync(&mut self, name: &str) -> Result<()> {
        self.write(|tx| {
            if tx.execute("update sync set retired = 1 where name = ?1", params![name])? == 0 {
                return Err(not_found(ObjectKind::Sync, name));
            }
            Ok(())
        })
    }

    /// Stops apply of `sync` (`reason: Some`) or lets it go on (`None`).
    pub fn set_paused(&mut self, name: &str, reason: Option<&str>) -> Result<()> {
        self.write(|tx| {
            if tx.execute("update sync set paused = ?2 where name = ?1", params![name, reason])?
                == 0
            {
                return Err(not_found(ObjectKind::Sync, name));
            }
            Ok(())
        })
    }

    /// Records how a round ended.
    pub fn record_round(
        &mut self,
        sync: &str,
        target: &str,
        outcome: RoundOutcome<'_>,
    ) -> Result<()> {
        self.write(|tx| {
            let now = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
            match outcome {
                RoundOutcome::Good { millis, inserts, deletes } => tx.execute(
                    &format!(
                        "insert into sync_state (sync, target, state, last_good, last_good_ms,
                                                 last_inserts, last_deletes)
                         values (?1, ?2, 'good', {now}, ?3, ?4, ?5)
                         on conflict (sync, target) do update set state = 'good',
                             last_good = excluded.last_good, last_good_ms = excluded.last_good_ms,
                             last_inserts = excluded.last_inserts,
                             last_deletes = excluded.last_deletes"
                    ),
                    params![sync, target, millis, inserts, deletes],
                )?,
                RoundOutcome::Bad { millis, error, sqlstate } => tx.execute(
                    &format!(
                        "insert into sync_state (sync, target, state, last_bad, last_bad_ms,
                                                 last_error, last_sqlstate)
                         values (?1, ?2, 'bad', {now}, ?3, ?4, ?5)
                         on conflict (sync, target) do update set state = 'bad',
                             last_bad = excluded.last_bad, last_bad_ms = excluded.last_bad_ms,
                             last_error = excluded.last_error,
                             last_sqlstate = excluded.last_sqlstate"
                    ),
                    params![sync, target, millis, error, sqlstate],
                )?,
            };
            Ok(())
        })
    }

    pub fn sync_states(&self, sync: &str) -> Result<Vec<SyncState>> {
        let mut stmt = self
            .conn
            .prepare(
                "select sync, target, state, last_good, last_good_ms, last_inserts, last_deletes,
                        last_bad, last_bad_ms, last_error, last_sqlstate,
                        (julianday('now') - julianday(last_good)) * 86400,
                        (julianday('now') - julianday(last_bad)) * 86400
                 from sync_state where sync = ?1 order by target",
            )
            .map_err(|e| self.sqlite(e))?;
        let rows = stmt
            .query_map(params![sync], |r| {
                Ok(SyncState {
                    target: r.get(1)?,
                    state: r.get(2)?,
                    last_good: r.get(3)?,
                    last_good_ms: r.get(4)?,
                    last_inserts: r.get(5)?,
                    last_deletes: r.get(6)?,
                    last_bad: r.get(7)?,
                    last_bad_ms: r.get(8)?,
                    last_error: r.get(9)?,
                    last_sqlstate: r.get(10)?,
                    last_good_age_s: r.get(11)?,
                    last_bad_age_s: r.get(12)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.sqlite(e))?;
        Ok(rows)
    }

    pub fn remove_sync(&mut self, name: &str) -> Result<()> {
        self.write(|tx| {
            if tx.execute("delete from sync where name = ?1", params![name])? == 0 {
                return Err(not_found(ObjectKind::Sync, name));
            }
            Ok(())
        })
    }
}

/// What a write closure may fail with: SQLite itself, or a refusal.
enum WriteError {
    Sqlite(rusqlite::Error),
    Catalog(CatalogError),
}

impl From<rusqlite::Error> for WriteError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}

fn not_found(kind: ObjectKind, name: &str) -> WriteError {
    WriteError::Catalog(CatalogError::NotFound { kind, name: name.into(), nearest: None })
}

fn already(kind: ObjectKind, name: &str) -> WriteError {
    WriteError::Catalog(CatalogError::AlreadyExists { kind, name: name.into() })
}

fn in_use(kind: ObjectKind, name: &str, users: Vec<String>, force_allowed: bool) -> WriteError {
    WriteError::Catalog(CatalogError::InUse { kind, name: name.into(), users, force_allowed })
}

/// `table` is one of our own table names, never user input.
fn exists(tx: &Transaction<'_>, table: &str, name: &str) -> rusqlite::Result<bool> {
    tx.query_row(&format!("select exists (select 1 from {table} where name = ?1)"), [name], |r| {
        r.get(0)
    })
}

fn column(tx: &Transaction<'_>, sql: &str, arg: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = tx.prepare(sql)?;
    stmt.query_map([arg], |r| r.get(0))?.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db<'a>(name: &'a str) -> DbRecord<'a> {
        DbRecord {
            name,
            conninfo: "host=h",
            password_file: None,
            password: None,
            server_version: "17.0",
        }
    }

    #[test]
    fn a_catalog_of_the_first_schema_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // The relgroup and sync tables as schema version 1 wrote them.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "create table db (name text primary key, conninfo text not null,
                     password_file text, password text, server_version text,
                     created_at text not null default '');
                 create table relgroup (name text primary key, db text not null,
                     created_at text not null default '');
                 create table sync (name text primary key, relgroup text not null,
                     dbgroup text not null, onetimecopy text not null, autokick integer not null,
                     capture_schema text not null, retired integer not null default 0,
                     created_at text not null default '');
                 insert into db (name, conninfo) values ('a', 'host=h');
                 insert into relgroup (name, db) values ('r', 'a');
                 insert into sync (name, relgroup, dbgroup, onetimecopy, autokick, capture_schema)
                     values ('s', 'r', 'g', 'always', 1, 'pgleap');",
            )
            .unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        assert!(!c.relgroup("r").unwrap().large_objects);
        assert_eq!(c.sync("s").unwrap().lo_interval, 10);
    }

    #[test]
    fn file_is_private_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/catalog.db");
        Catalog::open(&path).unwrap().add_db(&db("a")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Catalog::open(&path).unwrap().dbs().unwrap().len(), 1);
    }

    #[test]
    fn refusals_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(&dir.path().join("c.db")).unwrap();
        c.add_db(&db("a")).unwrap();
        assert!(matches!(c.add_db(&db("a")), Err(CatalogError::AlreadyExists { .. })));
        let members = [
            DbGroupMember { db: "a".into(), role: Role::Source },
            DbGroupMember { db: "missing".into(), role: Role::Target },
        ];
        assert!(matches!(c.add_dbgroup("g", &members), Err(CatalogError::NotFound { .. })));
        assert!(c.dbgroups().unwrap().is_empty());
        assert!(matches!(c.remove_db("nope", false), Err(CatalogError::NotFound { .. })));
    }
}
