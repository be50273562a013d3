//! Declaring what to migrate: databases, dbgroups, relgroups and syncs.
//!
//! Each operation checks against the real servers before it writes the
//! catalog (a database must answer, a relgroup's tables must exist and have a
//! key, a sync's source and target must be two different servers), so the
//! catalog never holds an entry that cannot work at the time it was made.

use std::path::PathBuf;

use secrecy::SecretString;

use crate::capture;
use crate::catalog::{self, Catalog, DbGroupMember, DbRecord, OneTimeCopy, RelGroup, Role};
use crate::error::{Error, Result};
use crate::inventory::{self, Selection};
use crate::pg::{Conn, ConnParams, Env, NamedQuery, PasswordSource, Sql};
use crate::route::{DbConn, SyncRoute};
use crate::target;

/// Object names end up in file names (pid and log files) and commands.
pub fn check_name(kind: catalog::ObjectKind, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            format!("invalid {kind} name \"{name}\""),
            "use up to 63 letters, digits, '_', '.' or '-', starting with a letter or digit",
        ))
    }
}

/// How to reach a database, as given on the command line.
pub struct DbSpec {
    pub params: ConnParams,
    pub password_file: Option<PathBuf>,
    pub store_password: bool,
}

/// What `db add` / `db update` report.
#[derive(Debug, serde::Serialize)]
pub struct DbAdded {
    pub name: String,
    pub server_version: String,
    pub target: String,
}

pub async fn add_db(
    catalog: &mut Catalog,
    name: &str,
    spec: DbSpec,
    env: Env<'_>,
) -> Result<DbAdded> {
    check_free(catalog, catalog::ObjectKind::Db, name)?;
    save_db(catalog, name, spec, env, false).await
}

/// Changes to a database entry; `None` keeps what is there.
pub struct DbChanges {
    /// A whole new connection string, replacing the old one.
    pub dsn: Option<ConnParams>,
    /// Single keywords to set on top (`--host`, `--port`, ...).
    pub fields: Vec<(&'static str, String)>,
    pub password_file: Option<Option<PathBuf>>,
    pub store_password: bool,
    pub forget_password: bool,
}

pub async fn update_db(
    catalog: &mut Catalog,
    name: &str,
    changes: DbChanges,
    env: Env<'_>,
) -> Result<DbAdded> {
    let old = catalog.db(name)?;
    let mut params = match changes.dsn {
        Some(p) => p,
        None => ConnParams::parse(&old.conninfo)
            .map_err(|source| Error::Conninfo { db: name.into(), source })?,
    };
    for (key, value) in &changes.fields {
        params.set(key, value).map_err(|source| Error::Conninfo { db: name.into(), source })?;
    }
    let password_file = match changes.password_file {
        Some(f) => f,
        None => old.password_file.map(PathBuf::from),
    };
    // A stored password is kept unless replaced or forgotten.
    let keep_stored = old.password_stored && !changes.forget_password && !changes.store_password;
    let spec = DbSpec { params, password_file, store_password: changes.store_password };
    if keep_stored {
        let stored = catalog.stored_password(name)?;
        return save_db_with(catalog, name, spec, stored, env, true).await;
    }
    save_db(catalog, name, spec, env, true).await
}

async fn save_db(
    catalog: &mut Catalog,
    name: &str,
    mut spec: DbSpec,
    env: Env<'_>,
    update: bool,
) -> Result<DbAdded> {
    let in_dsn = spec.params.take_password();
    let stored = if spec.store_password {
        let pw =
            in_dsn.or_else(|| env("PGPASSWORD").filter(|p| !p.is_empty()).map(SecretString::from));
        if pw.is_none() {
            return Err(Error::invalid(
                format!("--store-password for database \"{name}\" but no password was given"),
                "put the password in the connection string or in PGPASSWORD",
            ));
        }
        pw
    } else if in_dsn.is_some() {
        return Err(Error::invalid(
            format!("the connection string for database \"{name}\" contains a password"),
            "pgleap does not copy passwords into its catalog unless asked: remove it and use \
             ~/.pgpass, PGPASSWORD or --password-file, or add --store-password",
        ));
    } else {
        None
    };
    save_db_with(catalog, name, spec, stored, env, update).await
}

async fn save_db_with(
    catalog: &mut Catalog,
    name: &str,
    mut spec: DbSpec,
    stored: Option<SecretString>,
    env: Env<'_>,
    update: bool,
) -> Result<DbAdded> {
    // The entry names a fixed server: what the environment says now is
    // frozen into it. Only passwords keep being looked up at each connect.
    spec.params.fill_from_env(env);
    let password_file = match spec.password_file {
        Some(f) => Some(std::fs::canonicalize(&f).map_err(|e| {
            Error::invalid(
                format!("password file {} for database \"{name}\": {e}", f.display()),
                "give the path of a readable file that holds only the password",
            )
        })?),
        None => None,
    };
    let password = PasswordSource { stored: stored.clone(), file: password_file.clone() };
    let connected = Conn::connect(name, &spec.params, &password, env).await?;
    let version = connected.version().to_string();
    let conninfo = spec.params.to_conninfo_string();
    let file = password_file.as_ref().map(|p| p.to_string_lossy().into_owned());
    let record = DbRecord {
        name,
        conninfo: &conninfo,
        password_file: file.as_deref(),
        password: stored.as_ref(),
        server_version: &version,
    };
    if stored.is_some() {
        catalog.restrict_permissions()?;
    }
    if update {
        catalog.update_db(&record)?;
    } else {
        catalog.add_db(&record)?;
    }
    Ok(DbAdded { name: name.into(), server_version: version, target: connected.endpoint() })
}

/// Parses `DB:source` / `DB:target`.
pub fn parse_member(spec: &str) -> Result<DbGroupMember> {
    let bad = || {
        Error::invalid(
            format!("invalid dbgroup member \"{spec}\""),
            "write each member as DB:source or DB:target",
        )
    };
    let (db, role) = spec.rsplit_once(':').ok_or_else(bad)?;
    let role = match role {
        "source" => Role::Source,
        "target" => Role::Target,
        _ => return Err(bad()),
    };
    if db.is_empty() {
        return Err(bad());
    }
    Ok(DbGroupMember { db: db.into(), role })
}

pub fn add_dbgroup(catalog: &mut Catalog, name: &str, members: &[String]) -> Result<()> {
    check_name(catalog::ObjectKind::DbGroup, name)?;
    let members = members.iter().map(|m| parse_member(m)).collect::<Result<Vec<_>>>()?;
    let sources = members.iter().filter(|m| m.role == Role::Source).count();
    if sources != 1 {
        return Err(Error::invalid(
            format!("dbgroup \"{name}\" has {sources} sources; it needs exactly one"),
            "mark one database DB:source and the others DB:target",
        ));
    }
    if !members.iter().any(|m| m.role == Role::Target) {
        return Err(Error::invalid(
            format!("dbgroup \"{name}\" has no target"),
            "add at least one DB:target",
        ));
    }
    for (i, m) in members.iter().enumerate() {
        if members[..i].iter().any(|o| o.db == m.db) {
            return Err(Error::invalid(
                format!("database \"{}\" appears twice in dbgroup \"{name}\"", m.db),
                "a database is either the source or a target, once",
            ));
        }
    }
    catalog.add_dbgroup(name, &members)?;
    Ok(())
}

pub async fn add_relgroup(
    catalog: &mut Catalog,
    name: &str,
    db: &str,
    selection: &Selection,
    env: Env<'_>,
) -> Result<RelGroup> {
    check_free(catalog, catalog::ObjectKind::RelGroup, name)?;
    let conn = DbConn::from_catalog(catalog, db)?.connect(env).await?;
    add_relgroup_on(catalog, name, &conn, selection).await
}

/// [`add_relgroup`] on a connection already open to the relgroup's
/// database.
pub async fn add_relgroup_on(
    catalog: &mut Catalog,
    name: &str,
    conn: &Conn,
    selection: &Selection,
) -> Result<RelGroup> {
    check_free(catalog, catalog::ObjectKind::RelGroup, name)?;
    let members = inventory::resolve(conn, selection).await?;
    let large_objects = match selection.large_objects {
        Some(wanted) => wanted,
        None => crate::large_objects::any(conn).await?,
    };
    let whole_schemas =
        if selection.all_tables { vec!["*".to_string()] } else { selection.schemas.clone() };
    catalog.add_relgroup(name, conn.name(), &members, large_objects, &whole_schemas)?;
    Ok(catalog.relgroup(name)?)
}

/// Refuses an invalid name, or one already taken by an object of its kind.
fn check_free(catalog: &Catalog, kind: catalog::ObjectKind, name: &str) -> Result<()> {
    check_name(kind, name)?;
    let taken = match kind {
        catalog::ObjectKind::RelGroup => catalog.relgroup(name).is_ok(),
        catalog::ObjectKind::Sync => catalog.sync(name).is_ok(),
        catalog::ObjectKind::Db => catalog.db(name).is_ok(),
        catalog::ObjectKind::DbGroup => catalog.dbgroup(name).is_ok(),
    };
    if taken {
        return Err(catalog::CatalogError::AlreadyExists { kind, name: name.into() }.into());
    }
    Ok(())
}

/// A sync as requested by `sync add`.
pub struct SyncSpec {
    pub name: String,
    pub relgroup: String,
    pub dbgroup: String,
    pub onetimecopy: OneTimeCopy,
    pub autokick: bool,
    pub allow_downgrade: bool,
    /// Where pgleap's objects go on the servers.
    pub capture_schema: String,
    /// Seconds between two large-object passes of the daemon.
    pub lo_interval: u32,
    /// Capture keyed tables with row triggers (one delta row per changed
    /// row: cheapest for one-row statements) instead of statement
    /// triggers (one per statement: cheapest for bulk ones).
    pub row_triggers: bool,
    /// Whether keyed tables are captured by logical decoding where the
    /// source allows it, or by triggers.
    pub capture: crate::decoding::Method,
}

impl SyncSpec {
    fn record(&self) -> catalog::Sync {
        catalog::Sync {
            name: self.name.clone(),
            relgroup: self.relgroup.clone(),
            dbgroup: self.dbgroup.clone(),
            onetimecopy: self.onetimecopy,
            autokick: self.autokick,
            capture_schema: self.capture_schema.clone(),
            retired: false,
            created_at: String::new(),
            lo_interval: self.lo_interval,
            paused: None,
        }
    }
}

/// The oldest source pgleap can capture from: statement triggers with
/// transition tables, and partitioned tables, came with PostgreSQL 10.
const OLDEST_SOURCE: u32 = 10;

/// Refuses a source older than pgleap can capture from, by its version
/// rather than by a catalog query failing half-way.
pub(crate) fn check_supported_source(src: &Conn) -> Result<()> {
    if src.version().major() >= OLDEST_SOURCE {
        return Ok(());
    }
    Err(Error::invalid(
        format!(
            "database \"{}\" runs PostgreSQL {}; pgleap captures changes from PostgreSQL \
             {OLDEST_SOURCE} or newer",
            src.name(),
            src.version()
        ),
        format!(
            "upgrade it to {OLDEST_SOURCE} or newer in place first (pg_upgrade), or move it with \
             pg_dump | pg_restore"
        ),
    ))
}

/// What identifies one database of one running server, as far as a
/// non-superuser can see: same port, same start time, same database oid.
pub(crate) async fn fingerprint(conn: &Conn) -> Result<String> {
    let row = conn.query_one(SERVER_IDENTITY, &[]).await?;
    Ok(row.get(0))
}

/// Declares a sync and installs its capture on the source.
pub async fn add_sync(catalog: &mut Catalog, spec: &SyncSpec, env: Env<'_>) -> Result<()> {
    check_free(catalog, catalog::ObjectKind::Sync, &spec.name)?;
    let route = SyncRoute::resolve(catalog, spec.record())?;
    let mut src = route.source.connect(env).await?;
    let mut targets = Vec::new();
    for target in &route.targets {
        targets.push(target.connect(env).await?);
    }
    // A rollback sync (armed by cutover) goes to a fenced server on
    // purpose; a sync added by hand or by upgrade must not.
    let tables: Vec<String> = route
        .relgroup
        .members
        .iter()
        .filter(|m| m.kind != "sequence")
        .map(|m| crate::pg::qualified(&m.schema, &m.name))
        .collect();
    for tgt in &targets {
        target::check_not_fenced(tgt, &tables).await?;
    }
    add_sync_on(catalog, spec, &mut src, &targets.iter().collect::<Vec<_>>()).await
}

/// [`add_sync`] on connections already open to the source and every
/// target, in the dbgroup's order.
pub async fn add_sync_on(
    catalog: &mut Catalog,
    spec: &SyncSpec,
    src: &mut Conn,
    targets: &[&Conn],
) -> Result<()> {
    check_free(catalog, catalog::ObjectKind::Sync, &spec.name)?;
    let relgroup = catalog.relgroup(&spec.relgroup)?;
    check_supported_source(src)?;
    let source = src.name().to_string();
    if relgroup.db != source {
        return Err(Error::invalid(
            format!(
                "relgroup \"{}\" belongs to database \"{}\", but the source of dbgroup \"{}\" is \
                 \"{source}\"",
                relgroup.name, relgroup.db, spec.dbgroup
            ),
            "use a relgroup of the dbgroup's source, or a dbgroup whose source is the \
             relgroup's database",
        ));
    }
    let src_print = fingerprint(src).await?;
    for tgt in targets {
        let target = tgt.name();
        if fingerprint(tgt).await? == src_print {
            return Err(Error::invalid(
                format!(
                    "source \"{source}\" and target \"{target}\" are the same database on the same \
                     server"
                ),
                "point the target at the new server (pgleap db update NAME --dsn ...)",
            ));
        }
        check_same_encoding(src, tgt)?;
        if tgt.version().major() < src.version().major() && !spec.allow_downgrade {
            return Err(Error::invalid(
                format!(
                    "target \"{target}\" runs PostgreSQL {} and source \"{source}\" runs {}: \
                     that is a downgrade",
                    tgt.version(),
                    src.version()
                ),
                "pgleap moves databases to the same or a newer major; add --allow-downgrade if \
                 the schema is known to work on the older server",
            ));
        }
    }
    if !crate::pg::is_plain_identifier(&spec.capture_schema) {
        return Err(Error::invalid(
            format!("invalid capture schema name \"{}\"", spec.capture_schema),
            "use a lowercase SQL identifier (letters, digits, '_')",
        ));
    }
    if spec.onetimecopy == OneTimeCopy::Always {
        let members: Vec<_> = relgroup.members.iter().filter(|m| m.kind != "sequence").collect();
        let tables: Vec<String> =
            members.iter().map(|m| crate::pg::qualified(&m.schema, &m.name)).collect();
        let shown = |q: &str| {
            let m = members.iter().zip(&tables).find(|(_, t)| *t == q).map(|(m, _)| m);
            m.map_or(q.to_string(), |m| inventory::display_name(&m.schema, &m.name))
        };
        for tgt in targets {
            let held = tables_with_rows(tgt, &tables).await?;
            if !held.is_empty() {
                let named: Vec<String> =
                    held.iter().map(|(t, n)| format!("{} ({})", shown(t), rows_text(*n))).collect();
                tracing::warn!(
                    "sync \"{}\": the initial copy (onetimecopy always) replaces the rows target \
                     \"{}\" holds in {}",
                    spec.name,
                    tgt.name(),
                    named.join(", ")
                );
            }
        }
    }
    // Capture starts now: from here on every change of the source is
    // recorded. If anything later fails, it is removed again.
    let target_names: Vec<String> = targets.iter().map(|t| t.name().to_string()).collect();
    let schema = &spec.capture_schema;
    let level = if spec.row_triggers { capture::Level::Row } else { capture::Level::Statement };
    let (members, method) = (&relgroup.members, spec.capture);
    capture::install(src, schema, &spec.name, members, &target_names, level, method).await?;
    if let Err(e) = catalog.add_sync(&spec.record()) {
        let _ = capture::remove(src, schema, &spec.name, false).await;
        return Err(e.into());
    }
    Ok(())
}

/// Removes every object a sync created on its servers (capture on the
/// source; bookkeeping on the targets, after putting back what was set
/// aside), then the sync itself from the catalog.
/// After a cutover the old server's fence stays (and its read-only default,
/// if `--terminate` set one), so that it does not silently take writes
/// again; `unfence` removes them too. Returns whether the fence was kept.
pub async fn teardown(
    catalog: &mut Catalog,
    name: &str,
    unfence: bool,
    env: Env<'_>,
) -> Result<bool> {
    let route = SyncRoute::load(catalog, name)?;
    // Every server must answer before anything changes: a refused teardown
    // writes nothing.
    let mut src = route.source.connect(env).await?;
    let mut targets = Vec::new();
    for target in &route.targets {
        targets.push(target.connect(env).await?);
    }
    let keep_fence = catalog.was_cut_over(name)? && !unfence;
    catalog.retire_sync(name)?;
    let schema = &route.sync.capture_schema;
    capture::remove(&mut src, schema, name, keep_fence).await?;
    if unfence {
        capture::reset_read_only(&src).await?;
    }
    for tgt in &mut targets {
        target::remove(tgt, schema, name).await?;
    }
    catalog.remove_sync(name)?;
    Ok(keep_fence)
}

// The catalog queries of this module, named.

const SERVER_IDENTITY: &str =
    "select current_setting('port') || '/' || pg_postmaster_start_time()::text || '/' ||
    (select oid from pg_database where datname = current_database())::text";

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries() -> Vec<NamedQuery> {
    vec![NamedQuery::new("objects: the server's identity", SERVER_IDENTITY)]
}

/// How far a table's rows are counted to say that it holds some.
pub const ROWS_COUNTED: i64 = 1_000_000;

/// Those of `tables` (quoted, qualified) that exist on this database and
/// hold rows, with their counts (counted up to [`ROWS_COUNTED`] + 1).
pub async fn tables_with_rows(c: &Conn, tables: &[String]) -> Result<Vec<(String, i64)>> {
    let mut out = Vec::new();
    for table in tables {
        if !c.relation_exists(table).await? {
            continue;
        }
        let sql =
            format!("select count(*) from (select from {table} limit {}) x", ROWS_COUNTED + 1);
        let n: i64 = c.query_one(&sql, &[]).await?.get(0);
        if n > 0 {
            out.push((table.clone(), n));
        }
    }
    Ok(out)
}

/// "1 row", "10 rows", "over 1000000 rows".
pub fn rows_text(n: i64) -> String {
    match n {
        n if n > ROWS_COUNTED => format!("over {ROWS_COUNTED} rows"),
        1 => "1 row".into(),
        n => format!("{n} rows"),
    }
}

/// Refuses a target database of another encoding than the source's: rows
/// move as the database's own bytes (COPY to COPY), which only a database
/// of the same encoding takes as they are.
pub(crate) fn check_same_encoding(src: &Conn, tgt: &Conn) -> Result<()> {
    if src.encoding() == tgt.encoding() {
        return Ok(());
    }
    Err(Error::invalid(
        format!(
            "source \"{}\" is encoded {} and target \"{}\" {}: pgleap moves rows byte for byte \
             between databases of one encoding",
            src.name(),
            src.encoding(),
            tgt.name(),
            tgt.encoding()
        ),
        format!(
            "create the target database with the source's encoding (CREATE DATABASE ... \
             ENCODING '{}' TEMPLATE template0, with a matching LC_CTYPE); nothing was written",
            src.encoding()
        ),
    ))
}
