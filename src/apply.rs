//! Applying captured changes to a target, one batch at a time.
//!
//! A batch is delimited by transaction snapshots, as PgQ/Londiste do: the
//! source is read in one REPEATABLE READ transaction whose snapshot `now`
//! is recorded; the batch holds every delta whose transaction is visible in
//! `now` and was not visible in the snapshot of the previous batch. A
//! transaction that was still running when the previous batch was read is
//! therefore picked up by the batch after it commits, however late: the
//! classic "sequence gap" loss cannot happen.
//!
//! Applying is state-based and idempotent: for every changed key, the
//! target's row is deleted and the source's current row (if any) is copied
//! in, streaming with COPY from source to target. The whole batch is one
//! target transaction, which also records the batch's snapshot on the target
//! (`<schema>.applied`): the data and the progress marker commit together,
//! so a crash anywhere leaves either the old state and old marker, or both
//! new. Concurrent appliers of one sync (the daemon and a `kick`) are
//! serialised by an advisory lock on the target.
//!
//! On the target, user triggers and foreign keys must not fire. Where the
//! role may set `session_replication_role = replica`, the session does.
//! Otherwise the foreign keys touching the synced tables are recorded and
//! dropped, and enabled user triggers recorded and disabled
//! (`<schema>.set_aside`); they are put back at teardown (and cutover).

use std::time::Instant;

use futures_util::{SinkExt, TryStreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, IsolationLevel, Transaction};

use crate::capture;
use crate::catalog::{RelGroup, Sync};
use crate::error::{Error, Result};
use crate::pg::{qualified, quote_ident, quote_literal};

/// Advisory lock class for "one applier per sync on this target" ('pglp').
const LOCK_CLASS: i32 = 0x70676c70;
/// Advisory lock class for "one initial copy per sync on this target" ('pglc').
pub const COPY_LOCK_CLASS: i32 = 0x70676c63;

/// How one table is applied.
#[derive(Debug, Clone)]
pub struct TablePlan {
    pub display: String,
    pub(crate) table: String,
    delta: String,
    /// Quoted key columns; empty for a keyless table (whole-row deltas).
    pub(crate) keys: Vec<String>,
    /// Quoted, comma-separated; generated columns left out.
    pub(crate) columns: String,
    /// The same, one quoted name each.
    pub(crate) column_names: Vec<String>,
    /// Estimated at `relgroup add`, to decide whether to split the copy.
    pub(crate) est_rows: i64,
}

/// Everything needed to apply one sync's batches.
#[derive(Debug, Clone)]
pub struct Plan {
    pub sync: String,
    pub sync_id: i32,
    pub schema: String,
    pub source_db: String,
    pub tables: Vec<TablePlan>,
    pub sequences: Vec<String>,
}

/// What one batch did.
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    pub inserts: u64,
    pub deletes: u64,
    pub truncates: u64,
    /// The source snapshot the target now reflects.
    pub snapshot: String,
    pub millis: i64,
}

impl Plan {
    /// Reads the installed capture of `sync` on its source.
    pub async fn load(
        src: &Client,
        source_db: &str,
        sync: &Sync,
        relgroup: &RelGroup,
    ) -> Result<Plan> {
        let schema = &sync.capture_schema;
        let Some((sync_id, captured)) =
            capture::captured(src, source_db, schema, &sync.name).await?
        else {
            return Err(Error::invalid(
                format!(
                    "capture for sync \"{}\" is not installed in database \"{source_db}\"",
                    sync.name
                ),
                format!("remove and add the sync again (pgleap sync remove {})", sync.name),
            ));
        };
        let mut tables = Vec::new();
        for c in captured {
            let table = qualified(&c.schema, &c.name);
            let names: Vec<String> = src
                .query_one(
                    "select array_agg(attname::text order by attnum)
                     from pg_attribute
                     where attrelid = $1::text::regclass and attnum > 0
                       and not attisdropped and attgenerated = ''",
                    &[&table],
                )
                .await
                .map_err(|e| Error::query(source_db, &e))?
                .get(0);
            let column_names: Vec<String> = names.iter().map(|n| quote_ident(n)).collect();
            let columns = column_names.join(", ");
            let est_rows = relgroup
                .members
                .iter()
                .find(|m| m.schema == c.schema && m.name == c.name)
                .map_or(0, |m| m.est_rows);
            tables.push(TablePlan {
                column_names,
                display: crate::inventory::display_name(&c.schema, &c.name),
                est_rows,
                delta: qualified(schema, &c.delta),
                keys: c.key_columns.iter().map(|k| quote_ident(k)).collect(),
                table,
                columns,
            });
        }
        let sequences = relgroup
            .members
            .iter()
            .filter(|m| m.kind == "sequence")
            .map(|m| qualified(&m.schema, &m.name))
            .collect();
        Ok(Plan {
            sync: sync.name.clone(),
            sync_id,
            schema: schema.clone(),
            source_db: source_db.to_string(),
            tables,
            sequences,
        })
    }

    /// The SQL condition selecting deltas not yet applied after `prev`.
    pub(crate) fn pending(prev: Option<&str>) -> String {
        match prev {
            Some(p) => {
                let p = quote_literal(p);
                format!(
                    "_pgleap_txid >= txid_snapshot_xmin({p}::txid_snapshot) \
                     and not txid_visible_in_snapshot(_pgleap_txid, {p}::txid_snapshot)"
                )
            }
            None => "true".into(),
        }
    }

    /// Whether the source has deltas the snapshot `prev` did not see. Cheap:
    /// one index probe per table.
    pub async fn has_changes(&self, src: &Client, prev: Option<&str>) -> Result<bool> {
        if self.tables.is_empty() {
            return Ok(false);
        }
        let cond = Self::pending(prev);
        let probes: Vec<String> = self
            .tables
            .iter()
            .map(|t| format!("exists (select 1 from {} where {cond})", t.delta))
            .collect();
        let row = src
            .query_one(&format!("select {}", probes.join(" or ")), &[])
            .await
            .map_err(|e| Error::query(&self.source_db, &e))?;
        Ok(row.get(0))
    }
}

/// Creates pgleap's bookkeeping on a target and makes sure triggers and
/// foreign keys will not fire during apply. Returns whether the session runs
/// with `session_replication_role = replica`.
pub async fn prepare_target(tgt: &mut Client, db: &str, plan: &Plan) -> Result<bool> {
    let q = |e: tokio_postgres::Error| Error::query(db, &e);
    let s = quote_ident(&plan.schema);
    tgt.batch_execute(&format!(
        "create schema if not exists {s};
         create table if not exists {s}.applied (
             sync text primary key,
             snapshot text not null,
             applied_at timestamptz not null default now());
         create table if not exists {s}.set_aside (
             sync text not null,
             kind text not null check (kind in ('foreign key', 'trigger')),
             table_name text not null,
             name text not null,
             definition text not null,
             primary key (sync, kind, table_name, name));"
    ))
    .await
    .map_err(|e| {
        if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            Error::invalid(
                format!("database \"{db}\": cannot create schema {}: {e}", plan.schema),
                "pgleap needs CREATE on the target database",
            )
        } else {
            q(e)
        }
    })?;
    for t in &plan.tables {
        let found: bool = tgt
            .query_one("select to_regclass($1) is not null", &[&t.table])
            .await
            .map_err(q)?
            .get(0);
        if !found {
            return Err(Error::invalid(
                format!("table {} does not exist in target database \"{db}\"", t.display),
                "create the schema on the target first (pg_dump --schema-only | psql)",
            ));
        }
    }
    // Marks this session as pgleap's applier: a cutover fence lets it
    // through (a rollback sync writes into the fenced old server).
    tgt.batch_execute("set pgleap.applying = on").await.map_err(q)?;
    match tgt.batch_execute("set session_replication_role = replica").await {
        Ok(()) => return Ok(true),
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {}
        Err(e) => return Err(q(e)),
    }
    let tables: Vec<&str> = plan.tables.iter().map(|t| t.table.as_str()).collect();
    let tx = tgt.transaction().await.map_err(q)?;
    let fks = tx
        .query(
            "select conrelid::regclass::text, conname::text, pg_get_constraintdef(oid)
             from pg_constraint
             where contype = 'f'
               and (conrelid = any(select unnest($1::text[])::regclass)
                    or confrelid = any(select unnest($1::text[])::regclass))",
            &[&tables],
        )
        .await
        .map_err(q)?;
    let triggers = tx
        .query(
            "select tgrelid::regclass::text, tgname::text, pg_get_triggerdef(oid)
             from pg_trigger
             where tgrelid = any(select unnest($1::text[])::regclass)
               and not tgisinternal and tgenabled <> 'D' and tgname not like 'pgleap\\_%'",
            &[&tables],
        )
        .await
        .map_err(q)?;
    for (rows, kind) in [(&fks, "foreign key"), (&triggers, "trigger")] {
        for r in rows.iter() {
            let (table, name, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            tx.execute(
                &format!(
                    "insert into {s}.set_aside (sync, kind, table_name, name, definition)
                     values ($1, $2, $3, $4, $5) on conflict do nothing"
                ),
                &[&plan.sync, &kind, &table, &name, &def],
            )
            .await
            .map_err(q)?;
            let ddl = if kind == "foreign key" {
                format!("alter table {table} drop constraint {}", quote_ident(&name))
            } else {
                format!("alter table {table} disable trigger {}", quote_ident(&name))
            };
            tx.batch_execute(&ddl).await.map_err(q)?;
            tracing::info!("{db}: {kind} {name} on {table} set aside until cutover");
        }
    }
    tx.commit().await.map_err(q)?;
    Ok(false)
}

/// Puts back what [`prepare_target`] set aside: foreign keys are added
/// NOT VALID (validated here when `validate`, else returned for the caller
/// to validate later), triggers re-enabled.
pub async fn restore_target(
    tgt: &mut Client,
    db: &str,
    schema: &str,
    sync: &str,
    validate: bool,
) -> Result<Vec<(String, String)>> {
    let q = |e: tokio_postgres::Error| Error::query(db, &e);
    let s = quote_ident(schema);
    let exists: bool = tgt
        .query_one("select to_regclass($1) is not null", &[&format!("{s}.set_aside")])
        .await
        .map_err(q)?
        .get(0);
    if !exists {
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
        .await
        .map_err(q)?;
    for r in &rows {
        let (kind, table, name, def): (&str, &str, &str, &str) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let name_q = quote_ident(name);
        let ddl = if kind == "foreign key" {
            to_validate.push((table.to_string(), name.to_string()));
            format!("alter table {table} add constraint {name_q} {def} not valid")
        } else {
            format!("alter table {table} enable trigger {name_q}")
        };
        tgt.batch_execute(&ddl).await.map_err(q)?;
        tgt.execute(
            &format!("delete from {s}.set_aside where sync = $1 and kind = $2 and name = $3"),
            &[&sync, &kind, &name],
        )
        .await
        .map_err(q)?;
    }
    if validate {
        validate_foreign_keys(tgt, db, &to_validate).await?;
        to_validate.clear();
    }
    Ok(to_validate)
}

/// Validates foreign keys added NOT VALID: this scans, but takes only a
/// SHARE UPDATE EXCLUSIVE lock, so writes go on meanwhile.
pub async fn validate_foreign_keys(tgt: &Client, db: &str, fks: &[(String, String)]) -> Result<()> {
    for (table, name) in fks {
        tgt.batch_execute(&format!(
            "alter table {table} validate constraint {}",
            quote_ident(name)
        ))
        .await
        .map_err(|e| Error::query(db, &e))?;
    }
    Ok(())
}

/// Removes pgleap's bookkeeping for `sync` from a target, after restoring
/// whatever was set aside.
pub async fn remove_target(tgt: &mut Client, db: &str, schema: &str, sync: &str) -> Result<()> {
    restore_target(tgt, db, schema, sync, true).await?;
    let s = quote_ident(schema);
    let exists: bool = tgt
        .query_one("select to_regclass($1) is not null", &[&format!("{s}.applied")])
        .await
        .map_err(|e| Error::query(db, &e))?
        .get(0);
    if !exists {
        return Ok(());
    }
    tgt.batch_execute(&format!(
        "delete from {s}.applied where sync = {lit};
         do $$ begin
             if to_regclass('{s}.copy_units') is not null then
                 delete from {s}.copy_units where sync = {lit};
             end if;
         end $$;",
        lit = quote_literal(sync)
    ))
    .await
    .map_err(|e| Error::query(db, &e))?;
    capture::drop_schema_if_unused(
        tgt,
        db,
        schema,
        "applied",
        &["applied", "set_aside", "copy_units"],
    )
    .await
}

/// A snapshot in which no transaction is visible: applying "after" it
/// means applying every delta since capture started.
pub const FROM_THE_START: &str = "1:1:";

/// Records where change apply continues from (after an initial copy).
pub async fn set_applied_snapshot(
    tgt: &Client,
    db: &str,
    plan: &Plan,
    snapshot: &str,
) -> Result<()> {
    tgt.execute(
        &format!(
            "insert into {}.applied (sync, snapshot) values ($1, $2)
             on conflict (sync) do update set snapshot = excluded.snapshot, applied_at = now()",
            quote_ident(&plan.schema)
        ),
        &[&plan.sync, &snapshot],
    )
    .await
    .map_err(|e| Error::query(db, &e))?;
    Ok(())
}

/// The snapshot last applied on a target, if any.
pub async fn applied_snapshot(tgt: &Client, db: &str, plan: &Plan) -> Result<Option<String>> {
    let row = tgt
        .query_opt(
            &format!("select snapshot from {}.applied where sync = $1", quote_ident(&plan.schema)),
            &[&plan.sync],
        )
        .await
        .map_err(|e| Error::query(db, &e))?;
    Ok(row.map(|r| r.get(0)))
}

/// Applies one batch: everything the source committed since the target's
/// last batch, as of one source snapshot.
pub async fn apply_batch(
    src: &mut Client,
    tgt: &mut Client,
    target_db: &str,
    target_name: &str,
    plan: &Plan,
) -> Result<BatchStats> {
    let started = Instant::now();
    let source_db = plan.source_db.as_str();
    let qs = |e: tokio_postgres::Error| Error::query(source_db, &e);
    let qt = |e: tokio_postgres::Error| Error::query(target_db, &e);
    let s = quote_ident(&plan.schema);
    let (stx, ttx) = begin_batch(src, tgt, target_db, plan).await?;
    let mut stats = apply_within(&stx, &ttx, target_db, plan).await?;
    ttx.commit().await.map_err(qt)?;
    stx.commit().await.map_err(qs)?;

    // Not atomic with the target, and need not be: the target's marker is
    // the truth; this one only decides what may be purged, and a stale
    // value purges less.
    src.execute(
        &format!(
            "update {s}.consumer set snapshot = $3, updated_at = now()
             where sync_id = $1 and target = $2"
        ),
        &[&plan.sync_id, &target_name, &stats.snapshot],
    )
    .await
    .map_err(qs)?;
    purge(src, plan).await?;
    stats.millis = started.elapsed().as_millis() as i64;
    Ok(stats)
}

/// Opens a batch: the target transaction, holding the sync's applier lock,
/// and the source's REPEATABLE READ transaction whose snapshot bounds it.
pub async fn begin_batch<'a>(
    src: &'a mut Client,
    tgt: &'a mut Client,
    target_db: &str,
    plan: &Plan,
) -> Result<(Transaction<'a>, Transaction<'a>)> {
    let qs = |e: tokio_postgres::Error| Error::query(&plan.source_db, &e);
    let qt = |e: tokio_postgres::Error| Error::query(target_db, &e);
    let ttx = tgt.transaction().await.map_err(qt)?;
    ttx.execute("select pg_advisory_xact_lock($1, $2)", &[&LOCK_CLASS, &plan.sync_id])
        .await
        .map_err(qt)?;
    let stx = src
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(qs)?;
    Ok((stx, ttx))
}

/// Brings the target, inside `ttx`, to the state of the source in `stx`'s
/// snapshot, and records that snapshot as applied (in `ttx` too).
pub async fn apply_within(
    stx: &Transaction<'_>,
    ttx: &Transaction<'_>,
    target_db: &str,
    plan: &Plan,
) -> Result<BatchStats> {
    let source_db = plan.source_db.as_str();
    let qs = |e: tokio_postgres::Error| Error::query(source_db, &e);
    let qt = |e: tokio_postgres::Error| Error::query(target_db, &e);
    let s = quote_ident(&plan.schema);
    let mut stats = BatchStats::default();
    let prev: Option<String> = ttx
        .query_opt(&format!("select snapshot from {s}.applied where sync = $1"), &[&plan.sync])
        .await
        .map_err(qt)?
        .map(|r| r.get(0));
    stats.snapshot =
        stx.query_one("select txid_current_snapshot()::text", &[]).await.map_err(qs)?.get(0);
    let cond = Plan::pending(prev.as_deref());

    for t in &plan.tables {
        if t.keys.is_empty() {
            apply_keyless(stx, ttx, t, &cond, source_db, target_db, &mut stats).await?;
            continue;
        }
        let row = stx
            .query_one(
                &format!(
                    "select count(*) filter (where not _pgleap_truncated), coalesce(bool_or(_pgleap_truncated), false)
                     from {} where {cond}",
                    t.delta
                ),
                &[],
            )
            .await
            .map_err(qs)?;
        let (changes, truncated): (i64, bool) = (row.get(0), row.get(1));
        if changes == 0 && !truncated {
            continue;
        }
        let keys = t.keys.join(", ");
        if truncated {
            ttx.batch_execute(&format!("truncate {}", t.table)).await.map_err(qt)?;
            stats.truncates += 1;
        } else {
            ttx.batch_execute(&format!(
                "drop table if exists pg_temp.pgleap_keys;
                 create temp table pgleap_keys on commit drop as
                     select {keys} from {} limit 0",
                t.table
            ))
            .await
            .map_err(qt)?;
            let out = stx
                .copy_out(&format!(
                    "copy (select distinct {keys} from {} where {cond} and not _pgleap_truncated) to stdout",
                    t.delta
                ))
                .await
                .map_err(qs)?;
            let sink = ttx
                .copy_in(&format!("copy pg_temp.pgleap_keys ({keys}) from stdin"))
                .await
                .map_err(qt)?;
            let keys_copied = pump(out, sink, source_db, target_db).await?;
            if keys_copied > 1000 {
                // Without statistics the planner takes the temp table for
                // tiny and joins with index lookups per key.
                ttx.batch_execute("analyze pg_temp.pgleap_keys").await.map_err(qt)?;
            }
            let matches: Vec<String> = t.keys.iter().map(|k| format!("t.{k} = k.{k}")).collect();
            stats.deletes += ttx
                .execute(
                    &format!(
                        "delete from {} t using pg_temp.pgleap_keys k where {}",
                        t.table,
                        matches.join(" and ")
                    ),
                    &[],
                )
                .await
                .map_err(qt)?;
        }
        let out = stx
            .copy_out(&format!(
                "copy (select {cols} from {table} where ({keys}) in
                       (select {keys} from {delta} where {cond} and not _pgleap_truncated)) to stdout",
                cols = t.columns,
                table = t.table,
                delta = t.delta
            ))
            .await
            .map_err(qs)?;
        let sink = ttx
            .copy_in(&format!("copy {} ({}) from stdin", t.table, t.columns))
            .await
            .map_err(qt)?;
        stats.inserts += pump(out, sink, source_db, target_db).await?;
    }

    for seq in &plan.sequences {
        let row = stx
            .query_one(&format!("select last_value, is_called from {seq}"), &[])
            .await
            .map_err(qs)?;
        let (value, called): (i64, bool) = (row.get(0), row.get(1));
        ttx.execute("select setval($1::text::regclass, $2, $3)", &[seq, &value, &called])
            .await
            .map_err(qt)?;
    }

    ttx.execute(
        &format!(
            "insert into {s}.applied (sync, snapshot) values ($1, $2)
             on conflict (sync) do update set snapshot = excluded.snapshot, applied_at = now()"
        ),
        &[&plan.sync, &stats.snapshot],
    )
    .await
    .map_err(qt)?;
    Ok(stats)
}

/// Replays a keyless table's row images in the order they happened: after
/// the batch's last TRUNCATE, inserts and deletes of one matching row each
/// (rows compared as text, NULLs equal; `tableoid` and `ctid` pick exactly
/// one of several identical rows). An insert-only stream is one COPY.
async fn apply_keyless(
    stx: &tokio_postgres::Transaction<'_>,
    ttx: &tokio_postgres::Transaction<'_>,
    t: &TablePlan,
    cond: &str,
    source_db: &str,
    target_db: &str,
    stats: &mut BatchStats,
) -> Result<()> {
    let qs = |e: tokio_postgres::Error| Error::query(source_db, &e);
    let qt = |e: tokio_postgres::Error| Error::query(target_db, &e);
    let last_truncate: Option<i64> = stx
        .query_one(
            &format!(
                "select max(_pgleap_seq) filter (where _pgleap_truncated) from {} where {cond}",
                t.delta
            ),
            &[],
        )
        .await
        .map_err(qs)?
        .get(0);
    if last_truncate.is_some() {
        ttx.batch_execute(&format!("truncate {}", t.table)).await.map_err(qt)?;
        stats.truncates += 1;
    }
    let events = format!(
        "{cond} and not _pgleap_truncated and _pgleap_seq > {}",
        last_truncate.unwrap_or(0)
    );
    let row = stx
        .query_one(
            &format!(
                "select count(*) filter (where _pgleap_op = 'I'), count(*) filter (where _pgleap_op = 'D')
                 from {} where {events}",
                t.delta
            ),
            &[],
        )
        .await
        .map_err(qs)?;
    let (inserts, deletes): (i64, i64) = (row.get(0), row.get(1));
    if inserts + deletes == 0 {
        return Ok(());
    }
    let cols = &t.columns;
    if deletes == 0 {
        let out = stx
            .copy_out(&format!(
                "copy (select {cols} from {} where {events} order by _pgleap_seq) to stdout",
                t.delta
            ))
            .await
            .map_err(qs)?;
        let sink =
            ttx.copy_in(&format!("copy {} ({cols}) from stdin", t.table)).await.map_err(qt)?;
        stats.inserts += pump(out, sink, source_db, target_db).await?;
        return Ok(());
    }
    ttx.batch_execute(&format!(
        "drop table if exists pg_temp.pgleap_events;
         create temp table pgleap_events on commit drop as
             select null::int8 as _pgleap_seq, null::\"char\" as _pgleap_op, {cols} from {} limit 0",
        t.table
    ))
    .await
    .map_err(qt)?;
    let out = stx
        .copy_out(&format!(
            "copy (select _pgleap_seq, _pgleap_op, {cols} from {} where {events}) to stdout",
            t.delta
        ))
        .await
        .map_err(qs)?;
    let sink = ttx
        .copy_in(&format!(
            "copy pg_temp.pgleap_events (_pgleap_seq, _pgleap_op, {cols}) from stdin"
        ))
        .await
        .map_err(qt)?;
    pump(out, sink, source_db, target_db).await?;
    let values: Vec<String> = t.column_names.iter().map(|c| format!("r.{c}")).collect();
    let matches: Vec<String> = t
        .column_names
        .iter()
        .map(|c| format!("x.{c}::text is not distinct from r.{c}::text"))
        .collect();
    ttx.batch_execute(&format!(
        "do $pgleap$
         declare r record;
         begin
             for r in select * from pg_temp.pgleap_events order by _pgleap_seq loop
                 if r._pgleap_op = 'I' then
                     insert into {table} ({cols}) values ({values});
                 else
                     delete from {table}
                     where (tableoid, ctid) = (select x.tableoid, x.ctid from {table} x
                                               where {matches} limit 1);
                 end if;
             end loop;
         end $pgleap$",
        table = t.table,
        values = values.join(", "),
        matches = matches.join(" and "),
    ))
    .await
    .map_err(qt)?;
    stats.inserts += inserts as u64;
    stats.deletes += deletes as u64;
    Ok(())
}

/// Deletes the deltas every target has applied: those of transactions
/// below the oldest target snapshot's xmin, which were finished, hence
/// visible, for every target. Deltas above it wait for a later batch; a
/// target that has applied nothing yet keeps everything. One index range
/// delete per table, with the bound computed once.
async fn purge(src: &Client, plan: &Plan) -> Result<()> {
    let q = |e: tokio_postgres::Error| Error::query(&plan.source_db, &e);
    let row = src
        .query_one(
            &format!(
                "select coalesce(bool_or(snapshot is null), true),
                        min(txid_snapshot_xmin(snapshot::txid_snapshot))
                 from {}.consumer where sync_id = $1",
                quote_ident(&plan.schema)
            ),
            &[&plan.sync_id],
        )
        .await
        .map_err(q)?;
    let (someone_behind, bound): (bool, Option<i64>) = (row.get(0), row.get(1));
    let Some(bound) = bound.filter(|_| !someone_behind) else {
        return Ok(());
    };
    for t in &plan.tables {
        src.execute(&format!("delete from {} where _pgleap_txid < $1", t.delta), &[&bound])
            .await
            .map_err(q)?;
    }
    Ok(())
}

/// Forwards a COPY from one server to another without decoding it; memory
/// stays bounded by the sink's buffer. Returns the rows written.
pub async fn pump(
    out: tokio_postgres::CopyOutStream,
    sink: tokio_postgres::CopyInSink<bytes::Bytes>,
    source_db: &str,
    target_db: &str,
) -> Result<u64> {
    Ok(pump_counted(out, sink, source_db, target_db, &|_| {}).await?.0)
}

/// [`pump`], also returning the bytes forwarded and reporting them as they
/// pass.
pub async fn pump_counted(
    out: tokio_postgres::CopyOutStream,
    sink: tokio_postgres::CopyInSink<bytes::Bytes>,
    source_db: &str,
    target_db: &str,
    on_bytes: &dyn Fn(u64),
) -> Result<(u64, u64)> {
    let mut out = std::pin::pin!(out);
    let mut sink = std::pin::pin!(sink);
    let mut bytes = 0u64;
    while let Some(chunk) = out.try_next().await.map_err(|e| Error::query(source_db, &e))? {
        bytes += chunk.len() as u64;
        on_bytes(chunk.len() as u64);
        sink.feed(chunk).await.map_err(|e| Error::query(target_db, &e))?;
    }
    let rows = sink.as_mut().finish().await.map_err(|e| Error::query(target_db, &e))?;
    Ok((rows, bytes))
}

/// Whether everything visible in snapshot `kick` is visible in `applied`
/// too, i.e. the target has every transaction committed before the kick.
pub async fn covers(src: &Client, db: &str, applied: &str, kick: &str) -> Result<bool> {
    let row = src
        .query_one(
            "select txid_snapshot_xmax($1::text::txid_snapshot) >= txid_snapshot_xmax($2::text::txid_snapshot)
                and not exists (
                    select 1 from txid_snapshot_xip($1::text::txid_snapshot) x
                    where x < txid_snapshot_xmax($2::text::txid_snapshot)
                      and txid_visible_in_snapshot(x, $2::text::txid_snapshot))",
            &[&applied, &kick],
        )
        .await
        .map_err(|e| Error::query(db, &e))?;
    Ok(row.get(0))
}

/// Changes waiting on the source for a target, and the age in seconds of
/// the oldest of them.
pub async fn pending(src: &Client, plan: &Plan, target: &str) -> Result<(i64, f64)> {
    if plan.tables.is_empty() {
        return Ok((0, 0.0));
    }
    let s = quote_ident(&plan.schema);
    let snapshot = format!(
        "(select snapshot from {s}.consumer where sync_id = {} and target = {})::txid_snapshot",
        plan.sync_id,
        quote_literal(target)
    );
    let parts: Vec<String> = plan
        .tables
        .iter()
        .map(|t| {
            format!(
                "select count(*) n, min(_pgleap_at) oldest from {} d
                 where not coalesce(txid_visible_in_snapshot(d._pgleap_txid, {snapshot}), false)",
                t.delta
            )
        })
        .collect();
    let row = src
        .query_one(
            &format!(
                "select coalesce(sum(n), 0)::int8,
                        coalesce(extract(epoch from now() - min(oldest)), 0)::float8
                 from ({}) x",
                parts.join(" union all ")
            ),
            &[],
        )
        .await
        .map_err(|e| Error::query(&plan.source_db, &e))?;
    Ok((row.get(0), row.get(1)))
}
