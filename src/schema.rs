//! Copying the schema, staged the way a fast load wants it.
//!
//! - Pre-data (types, functions, tables, sequences, views, defaults) comes
//!   from the source through `pg_dump --section=pre-data`, turned into a
//!   script by pg_restore, adapted to the target and run there in one
//!   transaction (see `dump` for which tools and what adapting does).
//! - Indexes and primary-key/unique/exclusion constraints are built from the
//!   source's own definitions after the data is in (the initial copy does it
//!   per table, or `schema copy --with-indexes` right away).
//! - Foreign keys and triggers are left for cutover: created earlier they
//!   would fire during the load and the sync.
//!
//! - Then what pg_dump's pre-data leaves out (see `fidelity`): privileges
//!   for roles the target has, row security and policies, comments,
//!   database settings; roles the target lacks are named (or created
//!   NOLOGIN with `create_roles`).
//!
//! Extensions the source uses and the target cannot install are named
//! before anything is created. Ownership goes to the target user
//! (`--no-owner`); privileges are granted by pgleap itself, so that a role
//! missing on the target fails one grant, not the whole restore.
//! Passwords reach pg_dump/pg_restore through PGPASSWORD, never argv.

use std::path::Path;
use std::process::Command;

use crate::dump::{self, PgTools};
use crate::error::{Error, Result};
use crate::fidelity::{self, Difference, Scope, Stage};
use crate::inventory::{self, Selection};
use crate::pg::{Conn, Env, NamedQuery, PgVersion, Sql, quote_ident};
use crate::route::DbConn;

/// Of the extensions $1, those not created yet on this server that only a
/// superuser may create (13 and later: unless trusted).
fn extensions_needing_admin_sql(v: PgVersion) -> String {
    let trusted = if v.has_trusted_extensions() { "v.trusted" } else { "false" };
    format!(
        "select e.name::text from pg_available_extensions e
         where e.name = any($1::text[]) and e.installed_version is null
           and not (select rolsuper from pg_roles where rolname = current_user)
           and exists (select 1 from pg_available_extension_versions v
                       where v.name = e.name and v.version = e.default_version
                         and v.superuser and not {trusted})
         order by 1"
    )
}

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries(v: PgVersion) -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("schema: extensions used", EXTENSIONS_USED),
        NamedQuery::new("schema: extensions available", EXTENSIONS_AVAILABLE),
        NamedQuery::new("schema: extensions needing a superuser", extensions_needing_admin_sql(v)),
        NamedQuery::new("schema: indexes and key constraints", POST_DATA),
    ]
    .into_iter()
    .chain(static_catalog_queries())
    .collect()
}

const EXTENSIONS_USED: &str =
    "select extname::text from pg_extension where extname <> 'plpgsql' order by 1";
const EXTENSIONS_AVAILABLE: &str = "select name::text from pg_available_extensions";

/// Refuses early if the source uses extensions the target cannot install.
pub async fn check_extensions(src: &Conn, dst: &Conn) -> Result<()> {
    let (sdb, tdb) = (src.name(), dst.name());
    let used: Vec<String> =
        src.query(EXTENSIONS_USED, &[]).await?.iter().map(|r| r.get(0)).collect();
    let available: Vec<String> =
        dst.query(EXTENSIONS_AVAILABLE, &[]).await?.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&String> = used.iter().filter(|e| !available.contains(e)).collect();
    if !missing.is_empty() {
        return Err(Error::invalid(
            format!(
                "database \"{sdb}\" uses extensions that target \"{tdb}\" does not have: {}",
                missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
            "install them on the target server (or its managed-service equivalent) first",
        ));
    }
    // Available, not created yet, and not creatable by this role: an
    // extension that needs a superuser and is not trusted.
    // Trusted extensions (any role with CREATE may create them): 13 and later.
    let needs_admin: Vec<String> = dst
        .query(&extensions_needing_admin_sql(dst.version()), &[&used])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !needs_admin.is_empty() {
        let commands: Vec<String> =
            needs_admin.iter().map(|e| format!("CREATE EXTENSION {};", quote_ident(e))).collect();
        return Err(Error::invalid(
            format!(
                "database \"{sdb}\" uses extensions that only a superuser can create on target \
                 \"{tdb}\": {}",
                needs_admin.join(", ")
            ),
            format!(
                "have an administrator run, in the target database: {} (an extension that exists \
                 there already is kept as it is)",
                commands.join(" ")
            ),
        ));
    }
    Ok(())
}

/// Extensions the target database has already: schema copy leaves them
/// (and their comments, which only their owner may set) as they are.
async fn installed_extensions(dst: &Conn) -> Result<Vec<String>> {
    Ok(dst.query(INSTALLED_EXTENSIONS, &[]).await?.iter().map(|r| r.get(0)).collect())
}

/// The dump's table of contents without the entries of extensions the
/// target has already.
fn restore_list(tools: &PgTools, dump: &Path, installed: &[String]) -> Result<String> {
    let out = Command::new(tools.bin.join("pg_restore"))
        .arg("--list")
        .arg(dump)
        .output()
        .map_err(|e| Error::invalid(format!("cannot run pg_restore: {e}"), "check --pg-bin"))?;
    if !out.status.success() {
        return Err(Error::invalid(
            format!("pg_restore --list failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
            "the dump could not be read; check --pg-bin",
        ));
    }
    let list = String::from_utf8_lossy(&out.stdout);
    let skip = |line: &str| {
        installed.iter().any(|e| {
            let e = e.as_str();
            line.trim_end().ends_with(&format!(" EXTENSION - {e}"))
                || line.trim_end().ends_with(&format!(" COMMENT - EXTENSION {e}"))
        })
    };
    Ok(list.lines().filter(|l| !skip(l)).map(|l| format!("{l}\n")).collect())
}

/// What `schema copy` does.
pub struct SchemaCopy<'a> {
    pub source: &'a DbConn,
    pub target: &'a DbConn,
    pub schemas: &'a [String],
    pub pg_bin: Option<&'a Path>,
    /// pgleap's own schema on the source, never copied.
    pub exclude_schema: &'a str,
    /// Create the roles the source's privileges and policies name and the
    /// target lacks (NOLOGIN, without a password).
    pub create_roles: bool,
}

/// What `schema copy` did beyond pg_dump's part.
pub struct SchemaCopied {
    pub tools: PgTools,
    /// What pg_dump wrote and the target does not accept, left out.
    pub left_out: Vec<String>,
    /// Roles created (`create_roles`), or named for the user to create.
    pub created_roles: Vec<String>,
    pub missing_roles: Vec<String>,
    /// Pre-data objects still missing or different on the target, with
    /// the reason where pgleap tried.
    pub left: Vec<Difference>,
}

impl SchemaCopied {
    /// One line per role created or missing and per object not copied.
    pub fn lines(&self) -> Vec<String> {
        let mut out = self.left_out.clone();
        for role in &self.created_roles {
            out.push(format!("created role {role} on the target (NOLOGIN, no password)"));
        }
        for role in &self.missing_roles {
            out.push(format!(
                "role {role} does not exist on the target: its grants and policies are not \
                 created; run there {}; (or pass --create-roles)",
                fidelity::create_role_sql(role, false)
            ));
        }
        for d in &self.left {
            out.push(format!("not copied: {}", fidelity::describe(d)));
        }
        out
    }
}

/// Copies the pre-data section of the source's schema to the target, then
/// what pg_dump leaves out or cannot know: roles (when asked), privileges,
/// row security and policies, comments, database settings.
pub async fn copy_pre_data(job: &SchemaCopy<'_>, env: Env<'_>) -> Result<SchemaCopied> {
    let (tools, left_out) = run_pg_dump(job, env).await?;
    let src = job.source.connect(env).await?;
    let dst = job.target.connect(env).await?;
    let scope = Scope {
        schemas: job.schemas.to_vec(),
        tables: None,
        exclude: vec![job.exclude_schema.to_string()],
    };
    let (created_roles, missing_roles) = if job.create_roles {
        (create_missing_roles(&src, &dst, &scope).await?, Vec::new())
    } else {
        (Vec::new(), fidelity::missing_roles(&src, &dst, &scope).await?)
    };
    let differences = fidelity::compare(&src, &dst, &scope).await?;
    let left = fidelity::create(&dst, differences, Stage::PreData).await?;
    let left = left.into_iter().filter(|d| d.stage == Stage::PreData).collect();
    Ok(SchemaCopied { tools, left_out, created_roles, missing_roles, left })
}

/// Creates on the target, NOLOGIN and without a password, the roles the
/// source's grants, policies and settings name; returns them.
pub async fn create_missing_roles(src: &Conn, dst: &Conn, scope: &Scope) -> Result<Vec<String>> {
    let roles = fidelity::missing_roles(src, dst, scope).await?;
    for role in &roles {
        dst.batch_execute(&fidelity::create_role_sql(role, false)).await.map_err(|e| {
            Error::invalid(
                format!("cannot create role {role} on target \"{}\": {}", dst.name(), e.message()),
                "--create-roles needs CREATEROLE on the target; or create the roles there first",
            )
        })?;
    }
    Ok(roles)
}

/// pg_dump's pre-data section, restored in one transaction; returns the
/// tools used and what was left out for the target.
async fn run_pg_dump(job: &SchemaCopy<'_>, env: Env<'_>) -> Result<(PgTools, Vec<String>)> {
    let src = job.source.connect(env).await?;
    let dst = job.target.connect(env).await?;
    check_extensions(&src, &dst).await?;
    let tools = dump::tools_for(&src, &dst, job.pg_bin).await?;
    // A directory of its own, with a name nobody can guess, mode 0700,
    // removed however this function ends (the dump is SQL the target will
    // run: nobody else may swap it).
    let dir = tempfile::Builder::new().prefix("pgleap-schema-").tempdir().map_err(|e| {
        Error::invalid(format!("cannot create a temporary directory: {e}"), "check TMPDIR")
    })?;
    let file = |name: &str| dir.path().join(name);
    let write = |path: &Path, bytes: &[u8]| {
        std::fs::write(path, bytes).map_err(|e| {
            Error::invalid(format!("cannot write {}: {e}", path.display()), "check TMPDIR")
        })
    };

    let (conninfo, password) = job.source.for_child(env)?;
    let mut cmd = Command::new(tools.bin.join("pg_dump"));
    // Large objects are the initial copy's and the sync's (and only those
    // the role can read): pg_dump would create every one, empty.
    cmd.args(["--section=pre-data", "--format=custom", "--no-owner", "--no-privileges"])
        .arg("--no-blobs")
        .arg(format!("--exclude-schema={}", quote_ident(job.exclude_schema)))
        .arg("--file")
        .arg(file("pre-data.dump"));
    for s in job.schemas {
        cmd.arg(format!("--schema={}", quote_ident(s)));
    }
    cmd.arg("--dbname").arg(conninfo);
    dump::run(cmd, password.clone(), &job.source.name, "pg_dump")?;

    let entries = restore_list(&tools, &file("pre-data.dump"), &installed_extensions(&dst).await?)?;
    write(&file("restore.list"), entries.as_bytes())?;
    let mut cmd = Command::new(tools.bin.join("pg_restore"));
    // One transaction: a conflict half-way leaves nothing behind.
    cmd.args(["--section=pre-data", "--no-owner", "--no-privileges", "--single-transaction"])
        .arg("--use-list")
        .arg(file("restore.list"))
        .arg("--file")
        .arg(file("pre-data.sql"))
        .arg(file("pre-data.dump"));
    dump::run(cmd, None, &job.source.name, "pg_restore")?;
    let script = std::fs::read(file("pre-data.sql")).map_err(|e| {
        Error::invalid(format!("cannot read pg_restore's script: {e}"), "check TMPDIR")
    })?;
    let adapted = dump::adapt(&script, &dst).await?;
    for line in &adapted.left_out {
        tracing::warn!("{line}");
    }
    write(&file("pre-data.sql"), &adapted.script)?;

    let (conninfo, password) = job.target.for_child(env)?;
    let mut cmd = Command::new(tools.bin.join("psql"));
    cmd.args(["--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1", "--file"])
        .arg(file("pre-data.sql"))
        .arg("--dbname")
        .arg(conninfo);
    dump::run(cmd, password, &job.target.name, "restoring the schema (psql)")?;
    Ok((tools, adapted.left_out))
}

/// One index or key constraint of a source table, as SQL for the target.
#[derive(Debug, Clone)]
pub struct PostData {
    pub name: String,
    pub sql: String,
    is_constraint: bool,
}

const POST_DATA: &str = "select c.conname::text, pg_get_constraintdef(c.oid), true
     from pg_constraint c
     where c.conrelid = $1::text::regclass and c.contype in ('p', 'u', 'x')
     union all
     select ic.relname::text, pg_get_indexdef(i.indexrelid), false
     from pg_index i join pg_class ic on ic.oid = i.indexrelid
     where i.indrelid = $1::text::regclass
       and not exists (select 1 from pg_constraint c where c.conindid = i.indexrelid
                       and c.conrelid = i.indrelid and c.contype in ('p', 'u', 'x'))
     order by 3 desc, 1";

/// The indexes and primary-key/unique/exclusion constraints of a table on
/// the source (`table` quoted and qualified).
pub async fn post_data(src: &impl Sql, table: &str) -> Result<Vec<PostData>> {
    let rows = src.query_qualified(POST_DATA, &[&table]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let (name, def, is_constraint): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
            let sql = if is_constraint {
                format!("alter table {table} add constraint {} {def}", quote_ident(&name))
            } else {
                // A partitioned table's index reads "ON ONLY": as written it
                // would skip the partitions; created plainly it cascades to
                // them, as it did on the source.
                def.replacen(" ON ONLY ", " ON ", 1)
            };
            PostData { name, sql, is_constraint }
        })
        .collect())
}

/// Creates on the target those of `items` it does not have yet (by name),
/// so a rerun or a target restored in full is harmless.
pub async fn create_missing(tgt: &impl Sql, table: &str, items: &[PostData]) -> Result<usize> {
    let mut created = 0;
    for item in items {
        if exists(tgt, table, item).await? {
            continue;
        }
        match tgt.batch_execute(&item.sql).await {
            Ok(()) => created += 1,
            // Built meanwhile by another session (a backend of a killed
            // pgleap finishing its CREATE INDEX): what was wanted exists.
            Err(_) if exists(tgt, table, item).await.unwrap_or(false) => {
                tracing::info!(table, name = item.name, "built by another session meanwhile");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(created)
}

/// The names of the source table's indexes and key constraints that the
/// target's table lacks.
pub async fn missing_on_target(src: &impl Sql, tgt: &impl Sql, table: &str) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for item in post_data(src, table).await? {
        if !exists(tgt, table, &item).await? {
            missing.push(item.name);
        }
    }
    Ok(missing)
}

/// Whether the target's table has an index or constraint of this name.
async fn exists(tgt: &impl Sql, table: &str, item: &PostData) -> Result<bool> {
    let sql = if item.is_constraint {
        "select exists (select 1 from pg_constraint
                        where conrelid = $1::text::regclass and conname = $2)"
    } else {
        "select exists (select 1 from pg_index i join pg_class c on c.oid = i.indexrelid
                        where i.indrelid = $1::text::regclass and c.relname = $2)"
    };
    Ok(tgt.query_one(sql, &[&table, &item.name]).await?.get(0))
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
    let mut created = 0;
    for (schema, name) in inventory::tables(&src, &selection).await? {
        let table = crate::pg::qualified(&schema, &name);
        let items = post_data(&src, &table).await?;
        created += create_missing(&tgt, &table, &items).await?;
    }
    Ok(created)
}

// The catalog queries of this module, named.

const INSTALLED_EXTENSIONS: &str = "select extname::text from pg_extension";

fn static_catalog_queries() -> Vec<NamedQuery> {
    vec![NamedQuery::new("schema: installed extensions", INSTALLED_EXTENSIONS)]
}
