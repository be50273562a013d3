//! Declaring what to migrate: databases, dbgroups, relgroups and syncs.
//!
//! Each operation checks against the real servers before it writes the
//! catalog (a database must answer, a relgroup's tables must exist and have a
//! key, a sync's source and target must be two different servers), so the
//! catalog never holds an entry that cannot work at the time it was made.

use std::path::PathBuf;

use secrecy::SecretString;
use tokio_postgres::Client;

use crate::capture;
use crate::catalog::{self, Catalog, DbGroupMember, DbRecord, OneTimeCopy, RelGroup, Role};
use crate::error::{Error, Result};
use crate::inventory::{self, Selection};
use crate::pg::{self, ConnParams, PasswordSource, PgVersion, ResolvedConn};

/// Reads an environment variable; a seam so tests of resolution need no
/// process-wide state.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

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

/// An open connection to a catalog database.
pub struct Connected {
    pub client: Client,
    pub conn: ResolvedConn,
    pub version: PgVersion,
}

/// Connects to a database given its parameters; `db` names it in errors.
pub async fn connect_params(
    db: &str,
    params: &ConnParams,
    password: &PasswordSource,
    env: Env<'_>,
) -> Result<Connected> {
    let conn = ResolvedConn::resolve(params, password, env)
        .map_err(|source| Error::Resolve { db: db.into(), source })?;
    let client =
        pg::connect(&conn).await.map_err(|source| Error::Connect { db: db.into(), source })?;
    let version = pg::server_version(&client).await.map_err(|e| Error::query(db, &e))?;
    Ok(Connected { client, conn, version })
}

/// Connects to a database of the catalog by name.
pub async fn connect_db(catalog: &Catalog, name: &str, env: Env<'_>) -> Result<Connected> {
    DbConn::from_catalog(catalog, name)?.connect(env).await
}

/// A database's connection details, taken from the catalog once, so that
/// parallel workers can open connections without holding the catalog.
#[derive(Clone)]
pub struct DbConn {
    pub name: String,
    params: ConnParams,
    password: PasswordSource,
}

impl DbConn {
    pub fn from_catalog(catalog: &Catalog, name: &str) -> Result<DbConn> {
        let db = catalog.db(name)?;
        let params = ConnParams::parse(&db.conninfo)
            .map_err(|source| Error::Conninfo { db: name.into(), source })?;
        let password = PasswordSource {
            stored: catalog.stored_password(name)?,
            file: db.password_file.map(PathBuf::from),
        };
        Ok(DbConn { name: name.to_string(), params, password })
    }

    pub async fn connect(&self, env: Env<'_>) -> Result<Connected> {
        connect_params(&self.name, &self.params, &self.password, env).await
    }

    /// For a child process (pg_dump, pg_restore): the connection string,
    /// which never holds a password, and the password for its environment.
    pub fn for_child(&self, env: Env<'_>) -> Result<(String, Option<String>)> {
        let resolved = ResolvedConn::resolve(&self.params, &self.password, env)
            .map_err(|source| Error::Resolve { db: self.name.clone(), source })?;
        Ok((self.params.to_conninfo_string(), resolved.password().map(str::to_string)))
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
    check_name(catalog::ObjectKind::Db, name)?;
    if catalog.db(name).is_ok() {
        return Err(catalog::CatalogError::AlreadyExists {
            kind: catalog::ObjectKind::Db,
            name: name.into(),
        }
        .into());
    }
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
    let connected = connect_params(name, &spec.params, &password, env).await?;
    let version = connected.version.to_string();
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
    Ok(DbAdded { name: name.into(), server_version: version, target: connected.conn.to_string() })
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
    check_name(catalog::ObjectKind::RelGroup, name)?;
    if catalog.relgroup(name).is_ok() {
        return Err(catalog::CatalogError::AlreadyExists {
            kind: catalog::ObjectKind::RelGroup,
            name: name.into(),
        }
        .into());
    }
    let connected = connect_db(catalog, db, env).await?;
    let members = inventory::resolve(&connected.client, db, selection).await?;
    catalog.add_relgroup(name, db, &members)?;
    Ok(catalog.relgroup(name)?)
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
}

/// What identifies one database of one running server, as far as a
/// non-superuser can see: same port, same start time, same database oid.
async fn fingerprint(client: &Client, db: &str) -> Result<String> {
    let row = client
        .query_one(
            "select current_setting('port') || '/' || pg_postmaster_start_time()::text || '/' ||
                    (select oid from pg_database where datname = current_database())::text",
            &[],
        )
        .await
        .map_err(|e| Error::query(db, &e))?;
    Ok(row.get(0))
}

pub async fn add_sync(catalog: &mut Catalog, spec: &SyncSpec, env: Env<'_>) -> Result<()> {
    check_name(catalog::ObjectKind::Sync, &spec.name)?;
    if catalog.sync(&spec.name).is_ok() {
        return Err(catalog::CatalogError::AlreadyExists {
            kind: catalog::ObjectKind::Sync,
            name: spec.name.clone(),
        }
        .into());
    }
    let relgroup = catalog.relgroup(&spec.relgroup)?;
    let dbgroup = catalog.dbgroup(&spec.dbgroup)?;
    let source = dbgroup.source().to_string();
    if relgroup.db != source {
        return Err(Error::invalid(
            format!(
                "relgroup \"{}\" belongs to database \"{}\", but the source of dbgroup \"{}\" is \
                 \"{source}\"",
                relgroup.name, relgroup.db, dbgroup.name
            ),
            "use a relgroup of the dbgroup's source, or a dbgroup whose source is the \
             relgroup's database",
        ));
    }
    let src = connect_db(catalog, &source, env).await?;
    let src_print = fingerprint(&src.client, &source).await?;
    for target in dbgroup.targets() {
        let tgt = connect_db(catalog, target, env).await?;
        if fingerprint(&tgt.client, target).await? == src_print {
            return Err(Error::invalid(
                format!(
                    "source \"{source}\" and target \"{target}\" are the same database on the same \
                     server"
                ),
                "point the target at the new server (pgleap db update NAME --dsn ...)",
            ));
        }
        if tgt.version.major() < src.version.major() && !spec.allow_downgrade {
            return Err(Error::invalid(
                format!(
                    "target \"{target}\" runs PostgreSQL {} and source \"{source}\" runs {}: \
                     that is a downgrade",
                    tgt.version, src.version
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
    let sync = catalog::Sync {
        name: spec.name.clone(),
        relgroup: spec.relgroup.clone(),
        dbgroup: spec.dbgroup.clone(),
        onetimecopy: spec.onetimecopy,
        autokick: spec.autokick,
        capture_schema: spec.capture_schema.clone(),
        retired: false,
        created_at: String::new(),
    };
    // Capture starts now: from here on every change of the source is
    // recorded. If anything later fails, it is removed again.
    let mut src = src;
    let targets: Vec<String> = dbgroup.targets().map(str::to_string).collect();
    capture::install(
        &mut src.client,
        &source,
        &spec.capture_schema,
        &spec.name,
        &relgroup.members,
        &targets,
    )
    .await?;
    let undo = |e: Error| async move {
        let _ = capture::remove(&mut src.client, &source, &spec.capture_schema, &spec.name).await;
        e
    };
    if let Err(e) = catalog.add_sync(&sync) {
        return Err(undo(e.into()).await);
    }
    Ok(())
}

/// Removes every object a sync created on its servers (capture on the
/// source; bookkeeping on the targets, after putting back what was set
/// aside), then the sync itself from the catalog.
pub async fn teardown(catalog: &mut Catalog, name: &str, env: Env<'_>) -> Result<()> {
    let sync = catalog.sync(name)?;
    catalog.retire_sync(name)?;
    let group = catalog.dbgroup(&sync.dbgroup)?;
    let source = group.source().to_string();
    let mut src = connect_db(catalog, &source, env).await?;
    capture::remove(&mut src.client, &source, &sync.capture_schema, name).await?;
    for target in group.targets() {
        let mut tgt = connect_db(catalog, target, env).await?;
        crate::apply::remove_target(&mut tgt.client, target, &sync.capture_schema, name).await?;
    }
    catalog.remove_sync(name)?;
    Ok(())
}

/// Creates on the target the indexes and key constraints of every table of
/// the source (in `schemas`, or all) that the target lacks.
pub async fn create_indexes_like(
    source: &DbConn,
    target: &DbConn,
    schemas: &[String],
    env: Env<'_>,
) -> Result<usize> {
    let src = source.connect(env).await?;
    let tgt = target.connect(env).await?;
    let selection = Selection {
        all_tables: schemas.is_empty(),
        schemas: schemas.to_vec(),
        ..Default::default()
    };
    let tables = inventory::tables(&src.client, &source.name, &selection).await?;
    let mut created = 0;
    for (schema, name) in tables {
        let table = crate::pg::qualified(&schema, &name);
        let items = crate::schema::post_data(&src.client, &source.name, &table).await?;
        created += crate::schema::create_missing(&tgt.client, &target.name, &table, &items).await?;
    }
    Ok(created)
}
