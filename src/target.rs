//! The target's side of a sync: pgleap's bookkeeping there, and the one
//! home of its foreign keys and triggers while the sync runs.
//!
//! User triggers and foreign keys must not fire while rows are applied.
//! Where the role may set `session_replication_role = replica`, the applying
//! session does, and nothing is touched. Otherwise the foreign keys touching
//! the synced tables are recorded and dropped, and the enabled user triggers
//! recorded and disabled (`<schema>.set_aside`); cutover and teardown put
//! them back.
//!
//! Foreign keys and triggers the source has and the target lacks (a schema
//! copied by pgleap has none of them) are created from the source's own
//! definitions: at cutover, or right after the initial copy under replica
//! role. Foreign keys are always added NOT VALID first and validated later,
//! which scans without blocking writes.

use tokio_postgres::error::SqlState;

use crate::apply::{self, Plan};
use crate::capture;
use crate::error::{Error, Result};
use crate::large_objects;
use crate::pg::{Conn, NamedQuery, PgVersion, Sql, quote_ident, quote_literal};

/// A foreign key or trigger of one table, as its definition reads.
#[derive(Debug, Clone)]
pub struct Definition {
    /// The table, quoted and qualified.
    pub table: String,
    pub name: String,
    pub definition: String,
}

/// A foreign key to validate: (table, name).
pub type Unvalidated = (String, String);

fn table_list(plan: &Plan) -> Vec<&str> {
    plan.tables.iter().map(|t| t.table.as_str()).collect()
}

/// The tables (quoted names, `$1`) with their partitions and inheritance
/// children, as a CTE `tree(oid)`: a partition's own foreign keys and
/// triggers fire during apply like its parent's.
const TREE: &str = "with recursive tree(oid) as (
                        select unnest($1::text[])::regclass::oid
                        union
                        select i.inhrelid from pg_inherits i join tree on i.inhparent = tree.oid)";

/// Foreign keys on `tables` and their partitions (and, with `referencing`,
/// those of other tables pointing at them). A key a partition inherits
/// from its parent's is the parent's: created and dropped with it.
async fn foreign_keys(c: &impl Sql, tables: &[&str], referencing: bool) -> Result<Vec<Definition>> {
    let rows = c.query_qualified(&foreign_keys_sql(c.version()), &[&tables, &referencing]).await?;
    Ok(rows.iter().map(definition).collect())
}

/// User triggers on `tables` and their partitions (only the enabled ones
/// with `enabled_only`); pgleap's own are never included, nor the clones a
/// partition gets of its parent's (internal before 13).
async fn user_triggers(
    c: &impl Sql,
    tables: &[&str],
    enabled_only: bool,
) -> Result<Vec<Definition>> {
    let rows = c.query_qualified(&user_triggers_sql(), &[&tables, &enabled_only]).await?;
    Ok(rows.iter().map(definition).collect())
}

fn definition(r: &tokio_postgres::Row) -> Definition {
    Definition { table: r.get(0), name: r.get(1), definition: r.get(2) }
}

/// Creates pgleap's bookkeeping on a target and makes sure triggers and
/// foreign keys will not fire during apply. Returns whether the session runs
/// with `session_replication_role = replica`. `src` is the sync's source:
/// while it carries the sync's fence, nothing is set aside (see
/// [`set_aside`]).
pub async fn prepare(src: &Conn, tgt: &mut Conn, plan: &Plan) -> Result<bool> {
    let s = quote_ident(&plan.schema);
    let ddl = format!(
        "create schema if not exists {s};
         create table if not exists {s}.applied (
             sync text primary key,
             snapshot text not null,
             applied_at timestamptz not null default now());
         create table if not exists {s}.columns (
             sync text not null,
             table_name text not null,
             columns text not null,
             primary key (sync, table_name));
         create table if not exists {s}.set_aside (
             sync text not null,
             kind text not null check (kind in ('foreign key', 'trigger')),
             table_name text not null,
             name text not null,
             definition text not null,
             primary key (sync, kind, table_name, name));
         create table if not exists {s}.verified_parts (
             sync text not null,
             table_name text not null,
             predicate text not null,
             source_rows int8 not null,
             target_rows int8 not null,
             verified_at timestamptz not null default now(),
             lo int8,
             hi int8,
             shape text not null default '',
             equal bool not null default true,
             touched bool not null default false,
             finished bool not null default false,
             primary key (sync, table_name, predicate));
         {};",
        large_objects::state_table(&plan.schema)
    );
    let created = match tgt.batch_execute(&ddl).await {
        // "if not exists" is not atomic: another applier of the sync (the
        // daemon and a kick) created the same object at the same moment.
        // It exists now; the second try finds it.
        Err(e)
            if [
                SqlState::UNIQUE_VIOLATION,
                SqlState::DUPLICATE_SCHEMA,
                SqlState::DUPLICATE_TABLE,
            ]
            .iter()
            .any(|c| e.sqlstate() == Some(c)) =>
        {
            tgt.batch_execute(&ddl).await
        }
        other => other,
    };
    created.map_err(|e| {
        if e.sqlstate() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            Error::invalid(
                format!(
                    "database \"{}\": cannot create schema {}: {}",
                    e.db(),
                    plan.schema,
                    e.message()
                ),
                "pgleap needs CREATE on the target database",
            )
        } else {
            e.into()
        }
    })?;
    // A target prepared by a pgleap before incremental verify.
    let old: bool =
        tgt.query_one(VERIFIED_PARTS_OLD, &[&format!("{s}.verified_parts")]).await?.get(0);
    if old {
        tgt.batch_execute(&format!(
            "alter table {s}.verified_parts add column if not exists lo int8,
                 add column if not exists hi int8,
                 add column if not exists shape text not null default '',
                 add column if not exists equal bool not null default true,
                 add column if not exists touched bool not null default false,
                 add column if not exists finished bool not null default false"
        ))
        .await?;
    }
    for t in &plan.tables {
        if !tgt.relation_exists(&t.table).await? {
            return Err(Error::invalid(
                format!("table {} does not exist in target database \"{}\"", t.display, tgt.name()),
                "create the schema on the target first (pg_dump --schema-only | psql)",
            ));
        }
    }
    // Marks this session as pgleap's applier: a cutover fence lets it
    // through (a rollback sync writes into the fenced old server).
    tgt.batch_execute("set pgleap.applying = on").await?;
    match tgt.batch_execute("set session_replication_role = replica").await {
        Ok(()) => return Ok(true),
        Err(e) if e.sqlstate() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {}
        Err(e) => return Err(e.into()),
    }
    set_aside(src, tgt, plan).await?;
    Ok(false)
}

const VERIFIED_PARTS_OLD: &str = "select not exists (select 1 from pg_attribute
     where attrelid = $1::text::regclass and attname = 'touched' and not attisdropped)";

/// Records and drops the foreign keys touching the synced tables, and
/// records and disables their enabled user triggers.
///
/// Not while the source carries the sync's fence: a cutover put them back
/// (or is about to), and an applier connecting then (the daemon's worker, a
/// `kick`) must not take them away again after it did. The cutover holds
/// the sync's applier lock on the target while it puts up its fence, so
/// this check, made under the same lock, sees either no fence (and its
/// set-aside commits before the cutover's fence, hence before the cutover
/// puts anything back), or the fence. A cutover's own
/// session reconnecting inside its fence finds them set aside already.
async fn set_aside(src: &Conn, tgt: &mut Conn, plan: &Plan) -> Result<()> {
    let s = quote_ident(&plan.schema);
    let tables = table_list(plan);
    let db = tgt.name().to_string();
    let tx = tgt.transaction().await?;
    tx.execute(apply::XACT_LOCK, &[&apply::LOCK_CLASS, &plan.sync_id]).await?;
    if capture::fenced(src, &plan.schema, plan.sync_id).await? {
        tracing::info!(
            "{db}: the source is fenced by a cutover of sync \"{}\": foreign keys and \
             triggers are left as they are",
            plan.sync
        );
        return Ok(());
    }
    let fks = foreign_keys(&tx, &tables, true).await?;
    let triggers = user_triggers(&tx, &tables, true).await?;
    for (items, kind) in [(&fks, "foreign key"), (&triggers, "trigger")] {
        for d in items {
            tx.execute(
                &format!(
                    "insert into {s}.set_aside (sync, kind, table_name, name, definition)
                     values ($1, $2, $3, $4, $5) on conflict do nothing"
                ),
                &[&plan.sync, &kind, &d.table, &d.name, &d.definition],
            )
            .await?;
            let (table, name) = (&d.table, quote_ident(&d.name));
            let ddl = if kind == "foreign key" {
                format!("alter table {table} drop constraint {name}")
            } else {
                format!("alter table {table} disable trigger {name}")
            };
            tx.batch_execute(&ddl).await?;
            tracing::info!("{db}: {kind} {} on {table} set aside until cutover", d.name);
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Puts back what [`prepare`] set aside: foreign keys are added NOT VALID
/// (validated here when `validate`, else returned for the caller to validate
/// later), triggers re-enabled.
pub async fn restore(
    tgt: &Conn,
    schema: &str,
    sync: &str,
    validate: bool,
) -> Result<Vec<Unvalidated>> {
    let s = quote_ident(schema);
    if !tgt.relation_exists(&format!("{s}.set_aside")).await? {
        return Ok(Vec::new());
    }
    let mut to_validate = Vec::new();
    let rows = tgt
        .query(
            &format!(
                "select kind, table_name, name, definition from {s}.set_aside
                 where sync = $1 order by kind desc"
            ),
            &[&sync],
        )
        .await?;
    for r in &rows {
        let (kind, table, name, def): (&str, &str, &str, &str) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        if kind == "foreign key" {
            to_validate.extend(add_foreign_key_not_valid(tgt, table, name, def).await?);
        } else {
            tgt.batch_execute(&format!("alter table {table} enable trigger {}", quote_ident(name)))
                .await?;
        }
        tgt.execute(
            &format!("delete from {s}.set_aside where sync = $1 and kind = $2 and name = $3"),
            &[&sync, &kind, &name],
        )
        .await?;
    }
    if validate {
        validate_foreign_keys(tgt, &to_validate).await?;
        to_validate.clear();
    }
    Ok(to_validate)
}

/// Adds a foreign key without checking the rows (a quick catalog change);
/// returns it for [`validate_foreign_keys`]. A partitioned table takes no
/// NOT VALID foreign key before PostgreSQL 18: its key is added validated
/// (the server checks the rows now; nothing to validate later).
async fn add_foreign_key_not_valid(
    tgt: &Conn,
    table: &str,
    name: &str,
    definition: &str,
) -> Result<Option<Unvalidated>> {
    let add = format!("alter table {table} add constraint {} {definition}", quote_ident(name));
    match tgt.batch_execute(&format!("{add} not valid")).await {
        Ok(()) => Ok(Some((table.to_string(), name.to_string()))),
        Err(e)
            if (e.sqlstate() == Some(&SqlState::WRONG_OBJECT_TYPE)
                || e.sqlstate() == Some(&SqlState::FEATURE_NOT_SUPPORTED))
                && is_partitioned(tgt, table).await? =>
        {
            tracing::info!(table, name, "partitioned table: foreign key added validated");
            tgt.batch_execute(&add).await?;
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

async fn is_partitioned(tgt: &Conn, table: &str) -> Result<bool> {
    Ok(tgt.query_one(IS_PARTITIONED, &[&table]).await?.get(0))
}

/// Validates foreign keys added NOT VALID: this scans, but takes only a
/// SHARE UPDATE EXCLUSIVE lock, so writes go on meanwhile.
pub async fn validate_foreign_keys(tgt: &Conn, fks: &[Unvalidated]) -> Result<()> {
    for (table, name) in fks {
        tgt.batch_execute(&format!(
            "alter table {table} validate constraint {}",
            quote_ident(name)
        ))
        .await?;
    }
    Ok(())
}

/// Foreign keys on the synced tables of the target not validated yet.
pub async fn not_validated(tgt: &Conn, plan: &Plan) -> Result<Vec<Unvalidated>> {
    let rows = tgt.query_qualified(&not_validated_sql(tgt.version()), &[&table_list(plan)]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Foreign keys and triggers the source has on the sync's tables and the
/// target lacks.
pub struct Missing {
    pub foreign_keys: Vec<Definition>,
    pub triggers: Vec<Definition>,
}

pub async fn missing(src: &Conn, tgt: &Conn, plan: &Plan) -> Result<Missing> {
    let tables = table_list(plan);
    Ok(Missing {
        foreign_keys: absent(tgt, FK_EXISTS, foreign_keys(src, &tables, false).await?).await?,
        triggers: absent(tgt, TRIGGER_EXISTS, user_triggers(src, &tables, false).await?).await?,
    })
}

/// Those of `items` the target does not have, by `exists` (a query of the
/// table and the name).
async fn absent(tgt: &Conn, exists: &str, items: Vec<Definition>) -> Result<Vec<Definition>> {
    let mut out = Vec::new();
    for d in items {
        if !tgt.query_one(exists, &[&d.table, &d.name]).await?.get::<_, bool>(0) {
            out.push(d);
        }
    }
    Ok(out)
}

/// Creates what [`missing`] found: foreign keys NOT VALID (returned, to be
/// validated), triggers as the source defines them.
pub async fn create_missing(tgt: &Conn, missing: &Missing) -> Result<Vec<Unvalidated>> {
    let mut added = Vec::new();
    for d in &missing.foreign_keys {
        added.extend(add_foreign_key_not_valid(tgt, &d.table, &d.name, &d.definition).await?);
    }
    for d in &missing.triggers {
        tgt.batch_execute(&d.definition).await?;
    }
    Ok(added)
}

/// Removes pgleap's bookkeeping for `sync` from a target, after restoring
/// whatever was set aside.
pub async fn remove(tgt: &mut Conn, schema: &str, sync: &str) -> Result<()> {
    restore(tgt, schema, sync, true).await?;
    let s = quote_ident(schema);
    if !tgt.relation_exists(&format!("{s}.applied")).await? {
        return Ok(());
    }
    tgt.batch_execute(&format!(
        "delete from {s}.applied where sync = {lit};
         do $$ begin
             if to_regclass('{s}.copy_units') is not null then
                 delete from {s}.copy_units where sync = {lit};
             end if;
             if to_regclass('{s}.large_objects') is not null then
                 delete from {s}.large_objects where sync = {lit};
             end if;
             if to_regclass('{s}.columns') is not null then
                 delete from {s}.columns where sync = {lit};
             end if;
             if to_regclass('{s}.verified_parts') is not null then
                 delete from {s}.verified_parts where sync = {lit};
             end if;
         end $$;",
        lit = quote_literal(sync)
    ))
    .await?;
    let tables =
        ["applied", "set_aside", "copy_units", "large_objects", "columns", "verified_parts"];
    capture::drop_schema_if_unused(tgt, schema, "applied", &tables).await
}

// The catalog queries of this module, named. Each reads `tables` ($1)
// with their partitions ([`TREE`]).

/// A foreign key the server derived from another (`conparentid`, 11 and
/// later: a partition's copy of its parent's key, or a key referencing a
/// partitioned table, copied per referenced partition as `..._fkey1`) is
/// created and dropped with its parent: never read as one of its own.
fn foreign_keys_sql(v: PgVersion) -> String {
    let own = if v.has_partitioned_row_triggers() { "and k.conparentid = 0" } else { "" };
    format!(
        "{TREE}
         select k.conrelid::regclass::text, k.conname::text, pg_get_constraintdef(k.oid)
         from pg_constraint k
         where k.contype = 'f' {own}
           and (k.conrelid in (select oid from tree)
                or ($2 and k.confrelid in (select oid from tree)))
           and not exists (select 1 from pg_inherits i join pg_constraint p
                             on p.conrelid = i.inhparent and p.conname = k.conname
                            and p.contype = 'f'
                           where i.inhrelid = k.conrelid)"
    )
}

fn user_triggers_sql() -> String {
    format!(
        "{TREE}
         select t.tgrelid::regclass::text, t.tgname::text, pg_get_triggerdef(t.oid)
         from pg_trigger t
         where t.tgrelid in (select oid from tree)
           and not t.tgisinternal and t.tgname not like 'pgleap\\_%'
           and (not $2 or t.tgenabled <> 'D')
           and not exists (select 1 from pg_inherits i join pg_trigger p
                             on p.tgrelid = i.inhparent and p.tgname = t.tgname
                           where i.inhrelid = t.tgrelid)"
    )
}

/// Derived keys (see [`foreign_keys_sql`]) are validated with their
/// parent: validated alone, one referencing a partition would check every
/// row against that partition.
fn not_validated_sql(v: PgVersion) -> String {
    let own = if v.has_partitioned_row_triggers() { "and conparentid = 0" } else { "" };
    format!(
        "{TREE}
         select conrelid::regclass::text, conname::text from pg_constraint
         where contype = 'f' and not convalidated {own} and conrelid in (select oid from tree)"
    )
}

const IS_PARTITIONED: &str = "select relkind = 'p' from pg_class where oid = $1::text::regclass";

const FK_EXISTS: &str = "select exists (select 1 from pg_constraint
                                        where conrelid = $1::text::regclass and conname = $2)";

const TRIGGER_EXISTS: &str = "select exists (select 1 from pg_trigger
                                             where tgrelid = $1::text::regclass and tgname = $2)";

/// The fence triggers of other pgleap cutovers on `tables` ($1, quoted and
/// qualified): "table (trigger)".
const FENCES: &str = "select t.tgrelid::regclass::text || ' (' || t.tgname || ')'
     from pg_trigger t
     where t.tgname ~ '^pgleap_[0-9]+_fence$'
       and t.tgrelid = any(select to_regclass(x)::oid from unnest($1::text[]) x)
     order by 1";

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries(v: PgVersion) -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("target: fences of other migrations", FENCES),
        NamedQuery::new("target: foreign keys", foreign_keys_sql(v)),
        NamedQuery::new("target: user triggers", user_triggers_sql()),
        NamedQuery::new("target: foreign keys not validated", not_validated_sql(v)),
        NamedQuery::new("target: foreign key exists", FK_EXISTS),
        NamedQuery::new("target: table is partitioned", IS_PARTITIONED),
        NamedQuery::new("target: trigger exists", TRIGGER_EXISTS),
    ]
}

/// Refuses a target that another migration fenced: its tables refuse
/// writes (a cutover's fence trigger; that database was a migration's old
/// server), or it defaults to read-only transactions (`--terminate`).
/// Checked before anything is written anywhere.
pub async fn check_not_fenced(tgt: &Conn, tables: &[String]) -> Result<()> {
    let fenced: Vec<String> =
        tgt.query_qualified(FENCES, &[&tables]).await?.iter().map(|r| r.get(0)).collect();
    let read_only = crate::capture::read_only_default(tgt).await?;
    if fenced.is_empty() && !read_only {
        return Ok(());
    }
    let mut what = Vec::new();
    if !fenced.is_empty() {
        what.push(format!("its tables carry another migration's fence: {}", fenced.join(", ")));
    }
    if read_only {
        what.push("it defaults to read-only transactions (a cutover's --terminate)".into());
    }
    Err(Error::invalid(
        format!(
            "target \"{}\" was the old server of another migration and refuses writes: {}",
            tgt.name(),
            what.join("; ")
        ),
        "check the target; if that migration is over, its catalog's pgleap teardown SYNC \
         --unfence lifts the fence (or drop those triggers and ALTER DATABASE ... RESET \
         default_transaction_read_only); nothing was written",
    ))
}
