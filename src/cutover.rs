//! Cutover: fence the source, drain, finish the target, measure the fence.
//!
//! 1. Catch up until the lag is under `--max-lag` (the fence then only has
//!    a small remainder to wait for).
//! 2. Fence: one source transaction puts a BEFORE statement trigger on every
//!    table of the sync that refuses writes with an error naming the new
//!    server (SQLSTATE 25006, read-only transaction). The clock starts
//!    before this transaction, since taking its locks already holds writers.
//!    `--terminate` also ends the other sessions of the source database and
//!    makes it default to read-only transactions.
//! 3. Drain: one more batch, which now contains everything.
//! 4. Sequences: set on the target from the source's exact values, plus
//!    `--sequence-margin`.
//! 5. Deferred schema: foreign keys (set aside during the sync, or never
//!    created by `schema copy`) are added NOT VALID, and the source's
//!    triggers created or re-enabled.
//! 6. Row counts are compared. This is the switch point: the fence time is
//!    measured here, recorded, and printed. Foreign keys are validated after
//!    it, while the application already runs on the target.
//!
//! Any failure before the switch point removes the fence (and the read-only
//! default) again, so the source keeps taking writes and the sync runs on.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use crate::apply::{self, Plan};
use crate::capture;
use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::objects::{self, Env};
use crate::pg::{qualified, quote_ident, quote_literal};

pub struct CutoverOptions {
    pub max_lag: Duration,
    pub terminate: bool,
    pub sequence_margin: i64,
    pub dry_run: bool,
    /// Arm a sync back to the old server under this name, before the new
    /// one can take writes.
    pub rollback_sync: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CutoverReport {
    pub sync: String,
    pub target: String,
    pub dry_run: bool,
    /// Measured write downtime (predicted, for a dry run), in milliseconds.
    pub fence_ms: i64,
    pub sequences: usize,
    pub foreign_keys: usize,
    pub triggers: usize,
    pub tables: usize,
    /// The sync back to the old server, when armed.
    pub rollback_sync: Option<String>,
}

pub async fn cutover(
    catalog: &mut Catalog,
    sync_name: &str,
    opts: &CutoverOptions,
    env: Env<'_>,
) -> Result<CutoverReport> {
    let sync = catalog.sync(sync_name)?;
    let group = catalog.dbgroup(&sync.dbgroup)?;
    let relgroup = catalog.relgroup(&sync.relgroup)?;
    let targets: Vec<String> = group.targets().map(str::to_string).collect();
    let [target] = targets.as_slice() else {
        return Err(Error::invalid(
            format!("sync \"{sync_name}\" has {} targets; cutover moves to one", targets.len()),
            "make a dbgroup with the one target the application moves to",
        ));
    };
    let source = group.source().to_string();
    let wait = Some(Duration::from_secs(600));
    catch_up(catalog, sync_name, target, opts.max_lag, env).await?;

    let mut src = objects::connect_db(catalog, &source, env).await?;
    let mut tgt = objects::connect_db(catalog, target, env).await?;
    let plan = Plan::load(&src.client, &source, &sync, &relgroup).await?;
    let target_entry = catalog.db(target)?;
    let moved_to = format!("pgleap database \"{target}\" ({})", target_entry.conninfo);

    if opts.dry_run {
        // Everything but the fence, timed: a prediction of the fence.
        let started = Instant::now();
        crate::daemon::kick(catalog, sync_name, wait, 1, env).await?;
        let sequences = read_sequences(&src.client, &source, &plan.sequences).await?;
        let (fks, triggers) = deferred(&src.client, &source, &tgt.client, target, &plan).await?;
        // Timed for the prediction; the source still moves, so counts may
        // legitimately differ here.
        let _ = counts_equal(&src.client, &source, &tgt.client, target, &plan).await;
        return Ok(CutoverReport {
            sync: sync_name.into(),
            target: target.clone(),
            dry_run: true,
            fence_ms: started.elapsed().as_millis() as i64,
            sequences: sequences.len(),
            foreign_keys: fks.len(),
            triggers: triggers.len(),
            tables: plan.tables.len(),
            rollback_sync: None,
        });
    }
    if let Some(back) = &opts.rollback_sync {
        crate::objects::check_name(crate::catalog::ObjectKind::Sync, back)?;
        if catalog.sync(back).is_ok()
            || catalog.relgroup(back).is_ok()
            || catalog.dbgroup(back).is_ok()
        {
            return Err(Error::invalid(
                format!("\"{back}\" is already used by a sync, relgroup or dbgroup"),
                "choose another name for --rollback-sync",
            ));
        }
    }

    let started = Instant::now();
    fence(&mut src.client, &source, &plan, &moved_to).await?;
    if opts.terminate {
        read_only(&src.client, &source, true).await?;
    }
    let result = async {
        crate::daemon::kick(catalog, sync_name, wait, 1, env).await?;
        let sequences = read_sequences(&src.client, &source, &plan.sequences).await?;
        for (seq, value) in &sequences {
            tgt.client
                .execute(
                    "select setval($1::text::regclass, $2, true)",
                    &[seq, &(value + opts.sequence_margin)],
                )
                .await
                .map_err(|e| Error::query(target, &e))?;
        }
        let mut to_validate =
            apply::restore_target(&mut tgt.client, target, &sync.capture_schema, sync_name, false)
                .await?;
        let (fks, triggers) = deferred(&src.client, &source, &tgt.client, target, &plan).await?;
        for (table, name, def) in &fks {
            tgt.client
                .batch_execute(&format!(
                    "alter table {table} add constraint {} {def} not valid",
                    quote_ident(name)
                ))
                .await
                .map_err(|e| Error::query(target, &e))?;
            to_validate.push((table.clone(), name.clone()));
        }
        for def in &triggers {
            tgt.client.batch_execute(def).await.map_err(|e| Error::query(target, &e))?;
        }
        counts_equal(&src.client, &source, &tgt.client, target, &plan).await?;
        // Foreign keys added NOT VALID earlier (under replica role, after
        // the initial copy) are validated with the others.
        to_validate.extend(not_validated(&tgt.client, target, &plan).await?);
        to_validate.sort();
        to_validate.dedup();
        if let Some(back) = &opts.rollback_sync {
            arm_rollback(catalog, back, &source, target, &plan, env).await?;
        }
        Ok::<_, Error>((sequences.len(), to_validate, triggers.len()))
    }
    .await;
    let (sequences, to_validate, triggers) = match result {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("cutover failed before the switch; unfencing the source: {e}");
            if opts.terminate {
                let _ = read_only(&src.client, &source, false).await;
            }
            let _ = unfence(&mut src.client, &source, &plan).await;
            return Err(e);
        }
    };
    let fence_ms = started.elapsed().as_millis() as i64;
    catalog.record_cutover(sync_name, fence_ms)?;
    catalog.retire_sync(sync_name)?;
    if opts.rollback_sync.is_some() && crate::daemon::running_pid(catalog.path()).is_none() {
        crate::daemon::start_detached(catalog.path())?;
    }
    apply::validate_foreign_keys(&tgt.client, target, &to_validate).await?;
    Ok(CutoverReport {
        sync: sync_name.into(),
        target: target.clone(),
        dry_run: false,
        fence_ms,
        sequences,
        foreign_keys: to_validate.len(),
        triggers,
        tables: plan.tables.len(),
        rollback_sync: opts.rollback_sync.clone(),
    })
}

/// Declares and installs the sync back from the new server to the old one:
/// capture on the new server starts before it takes any write, so a
/// rollback loses nothing. On failure, whatever it created is removed.
async fn arm_rollback(
    catalog: &mut Catalog,
    back: &str,
    old: &str,
    new: &str,
    plan: &Plan,
    env: Env<'_>,
) -> Result<()> {
    let selection = crate::inventory::Selection {
        tables: plan.tables.iter().map(|t| t.table.clone()).collect(),
        sequences: plan.sequences.clone(),
        ..Default::default()
    };
    let result = async {
        objects::add_relgroup(catalog, back, new, &selection, env).await?;
        objects::add_dbgroup(catalog, back, &[format!("{new}:source"), format!("{old}:target")])?;
        let spec = objects::SyncSpec {
            name: back.to_string(),
            relgroup: back.to_string(),
            dbgroup: back.to_string(),
            onetimecopy: crate::catalog::OneTimeCopy::Never,
            autokick: true,
            // The old server is usually the older major.
            allow_downgrade: true,
            capture_schema: plan.schema.clone(),
        };
        objects::add_sync(catalog, &spec, env).await
    }
    .await;
    if let Err(e) = result {
        let _ = catalog.remove_sync(back);
        let _ = catalog.remove_dbgroup(back);
        let _ = catalog.remove_relgroup(back);
        return Err(e);
    }
    Ok(())
}

/// Foreign keys on the synced tables of the target not validated yet.
async fn not_validated(tgt: &Client, db: &str, plan: &Plan) -> Result<Vec<(String, String)>> {
    let tables: Vec<&str> = plan.tables.iter().map(|t| t.table.as_str()).collect();
    let rows = tgt
        .query(
            "select conrelid::regclass::text, conname::text from pg_constraint
             where contype = 'f' and not convalidated
               and conrelid = any(select unnest($1::text[])::regclass)",
            &[&tables],
        )
        .await
        .map_err(|e| Error::query(db, &e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Kicks until the oldest pending change is younger than `max_lag`.
async fn catch_up(
    catalog: &mut Catalog,
    sync: &str,
    target: &str,
    max_lag: Duration,
    env: Env<'_>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        crate::daemon::kick(catalog, sync, Some(Duration::from_secs(600)), 1, env).await?;
        let status = crate::status::gather(catalog, Some(sync), env).await?;
        let lag = status
            .first()
            .and_then(|s| s.targets.iter().find(|t| t.target == target))
            .and_then(|t| t.lag_seconds)
            .unwrap_or(0.0);
        if lag <= max_lag.as_secs_f64() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::invalid(
                format!("sync \"{sync}\" stayed {lag:.1} s behind for an hour"),
                "lower the write load, or raise --max-lag",
            ));
        }
    }
}

fn fence_function(plan: &Plan) -> String {
    qualified(&plan.schema, &format!("f{}_fence", plan.sync_id))
}

async fn fence(src: &mut Client, db: &str, plan: &Plan, moved_to: &str) -> Result<()> {
    let function = fence_function(plan);
    let trigger = quote_ident(&capture::fence_trigger(plan.sync_id));
    let message = quote_literal(&format!("{db} no longer takes writes: it moved to {moved_to}"));
    let mut ddl = format!(
        "create or replace function {function}() returns trigger language plpgsql as $pgleap$
         begin
             -- pgleap's own applier (a rollback sync) passes.
             if current_setting('pgleap.applying', true) = 'on' then
                 return null;
             end if;
             raise exception using errcode = '25006', message = {message},
                 hint = 'connect the application to the new server';
         end $pgleap$;\n"
    );
    for t in &plan.tables {
        ddl.push_str(&format!(
            "drop trigger if exists {trigger} on {table};
             create trigger {trigger} before insert or update or delete or truncate on {table}
                 for each statement execute function {function}();\n",
            table = t.table
        ));
    }
    capture::with_lock_retries(src, db, "fencing the source", &ddl).await
}

async fn unfence(src: &mut Client, db: &str, plan: &Plan) -> Result<()> {
    let trigger = quote_ident(&capture::fence_trigger(plan.sync_id));
    let mut ddl = String::new();
    for t in &plan.tables {
        ddl.push_str(&format!("drop trigger if exists {trigger} on {};\n", t.table));
    }
    ddl.push_str(&format!("drop function if exists {}();", fence_function(plan)));
    capture::with_lock_retries(src, db, "unfencing the source", &ddl).await
}

/// Ends other sessions and makes new transactions read-only (or undoes it).
async fn read_only(src: &Client, db: &str, on: bool) -> Result<()> {
    let q = |e: tokio_postgres::Error| Error::query(db, &e);
    let name: String = src.query_one("select current_database()", &[]).await.map_err(q)?.get(0);
    let setting = if on {
        "set default_transaction_read_only = on"
    } else {
        "reset default_transaction_read_only"
    };
    src.batch_execute(&format!("alter database {} {setting}", quote_ident(&name)))
        .await
        .map_err(q)?;
    if on {
        src.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity
             where datname = current_database() and pid <> pg_backend_pid()
               and application_name <> 'pgleap'",
            &[],
        )
        .await
        .map_err(q)?;
    }
    Ok(())
}

async fn read_sequences(
    src: &Client,
    db: &str,
    sequences: &[String],
) -> Result<Vec<(String, i64)>> {
    let mut out = Vec::new();
    for seq in sequences {
        let v: i64 = src
            .query_one(&format!("select last_value from {seq}"), &[])
            .await
            .map_err(|e| Error::query(db, &e))?
            .get(0);
        out.push((seq.clone(), v));
    }
    Ok(out)
}

/// Foreign keys (table, name, definition) and trigger definitions the
/// source has on the sync's tables and the target lacks.
pub(crate) async fn deferred(
    src: &Client,
    sdb: &str,
    tgt: &Client,
    tdb: &str,
    plan: &Plan,
) -> Result<(Vec<(String, String, String)>, Vec<String>)> {
    let tables: Vec<&str> = plan.tables.iter().map(|t| t.table.as_str()).collect();
    let fks = src
        .query(
            "select conrelid::regclass::text, conname::text, pg_get_constraintdef(oid)
             from pg_constraint
             where contype = 'f' and conrelid = any(select unnest($1::text[])::regclass)",
            &[&tables],
        )
        .await
        .map_err(|e| Error::query(sdb, &e))?;
    let triggers = src
        .query(
            "select tgrelid::regclass::text, tgname::text, pg_get_triggerdef(oid)
             from pg_trigger
             where tgrelid = any(select unnest($1::text[])::regclass)
               and not tgisinternal and tgname not like 'pgleap\\_%'",
            &[&tables],
        )
        .await
        .map_err(|e| Error::query(sdb, &e))?;
    let mut missing_fks = Vec::new();
    for r in &fks {
        let (table, name, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let exists: bool = tgt
            .query_one(
                "select exists (select 1 from pg_constraint
                                where conrelid = $1::text::regclass and conname = $2)",
                &[&table, &name],
            )
            .await
            .map_err(|e| Error::query(tdb, &e))?
            .get(0);
        if !exists {
            missing_fks.push((table, name, def));
        }
    }
    let mut missing_triggers = Vec::new();
    for r in &triggers {
        let (table, name, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let exists: bool = tgt
            .query_one(
                "select exists (select 1 from pg_trigger
                                where tgrelid = $1::text::regclass and tgname = $2)",
                &[&table, &name],
            )
            .await
            .map_err(|e| Error::query(tdb, &e))?
            .get(0);
        if !exists {
            missing_triggers.push(def);
        }
    }
    Ok((missing_fks, missing_triggers))
}

async fn counts_equal(src: &Client, sdb: &str, tgt: &Client, tdb: &str, plan: &Plan) -> Result<()> {
    for t in &plan.tables {
        let q = format!("select count(*) from {}", t.table);
        let a: i64 = src.query_one(&q, &[]).await.map_err(|e| Error::query(sdb, &e))?.get(0);
        let b: i64 = tgt.query_one(&q, &[]).await.map_err(|e| Error::query(tdb, &e))?.get(0);
        if a != b {
            return Err(Error::invalid(
                format!(
                    "{} has {a} rows on the source and {b} on the target after the drain",
                    t.display
                ),
                "nothing was switched; run pgleap verify to see the differing keys",
            ));
        }
    }
    Ok(())
}
