//! The initial copy (`onetimecopy`): the source's tables as of one snapshot,
//! streamed with COPY by parallel workers, handed over exactly to change
//! apply.
//!
//! Capture is installed before the copy starts (at `sync add`). A
//! coordinator transaction exports its snapshot; every worker imports it
//! (`SET TRANSACTION SNAPSHOT`) so all units see the same state. Large
//! tables with a single integer key are split into key ranges. Each unit is
//! one target transaction that loads its rows and marks itself done in
//! `<schema>.copy_units` on the target, so an interrupted copy resumes with
//! the units not done (under a new snapshot: deltas then cover the gap).
//!
//! After the load, each table gets the indexes and key constraints the
//! source has and the target lacks (a target whose schema came from
//! `schema copy` has none yet), several tables at once.
//!
//! The handoff: change apply starts from the earliest snapshot any unit was
//! copied under, so every change the copy did not contain is applied, and
//! changes it did contain are at worst re-applied, which is harmless. With
//! `if-empty`, a table that already had rows on the target is not copied;
//! then apply starts from the beginning of capture instead, because such a
//! table was loaded by someone else at an unknown point.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use tokio_postgres::{Client, IsolationLevel};

use crate::apply::{self, Plan, TablePlan};
use crate::catalog::OneTimeCopy;
use crate::error::{Error, Result};
use crate::objects::{DbConn, Env};
use crate::pg::{quote_ident, quote_literal};
use crate::progress::Progress;
use crate::schema;

/// Tables estimated above this many rows are split into ranges.
const SPLIT_ROWS: i64 = 200_000;
/// Ranges per worker for a split table.
const RANGES_PER_JOB: i64 = 4;

/// What the copy did.
#[derive(Debug, Default, Clone)]
pub struct CopyStats {
    pub units: u64,
    pub rows: u64,
    pub bytes: u64,
    pub millis: i64,
}

struct Unit {
    id: i32,
    table: usize,
    predicate: String,
}

/// Copies the sync's tables to the target unless already done, and returns
/// the snapshot change apply starts from (`None`: from the start of
/// capture).
pub async fn initial_copy(
    source: &DbConn,
    target: &DbConn,
    plan: &Plan,
    mode: OneTimeCopy,
    jobs: usize,
    env: Env<'_>,
) -> Result<(Option<String>, CopyStats)> {
    let started = Instant::now();
    let tdb = target.name.as_str();
    let sdb = source.name.as_str();
    let qt = |e: tokio_postgres::Error| Error::query(tdb, &e);
    let qs = |e: tokio_postgres::Error| Error::query(sdb, &e);
    let s = quote_ident(&plan.schema);
    let mut tgt = target.connect(env).await?.client;
    tgt.batch_execute(&format!(
        "create table if not exists {s}.copy_units (
             sync text not null,
             unit int not null,
             table_name text not null,
             predicate text not null,
             done bool not null default false,
             snapshot text,
             rows int8,
             primary key (sync, unit))"
    ))
    .await
    .map_err(qt)?;

    // The coordinator holds the exported snapshot until every worker is done.
    let mut coordinator = source.connect(env).await?.client;
    let ctx = coordinator
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(qs)?;
    let row = ctx
        .query_one("select pg_export_snapshot(), txid_current_snapshot()::text", &[])
        .await
        .map_err(qs)?;
    let (exported, snapshot): (String, String) = (row.get(0), row.get(1));

    let planned: i64 = tgt
        .query_one(&format!("select count(*) from {s}.copy_units where sync = $1"), &[&plan.sync])
        .await
        .map_err(qt)?
        .get(0);
    if planned == 0 {
        plan_units(&ctx, sdb, &mut tgt, tdb, plan, mode, jobs, &snapshot).await?;
    }
    let rows = tgt
        .query(
            &format!(
                "select unit, table_name, predicate from {s}.copy_units
                 where sync = $1 and not done order by unit"
            ),
            &[&plan.sync],
        )
        .await
        .map_err(qt)?;
    let queue: VecDeque<Unit> = rows
        .iter()
        .filter_map(|r| {
            let table: &str = r.get(1);
            let index = plan.tables.iter().position(|t| t.table == table)?;
            Some(Unit { id: r.get(0), table: index, predicate: r.get(2) })
        })
        .collect();
    let total = queue.len();
    if total > 0 {
        tracing::info!(sync = plan.sync, units = total, jobs, "initial copy starting");
    }
    let est_rows: i64 = queue
        .iter()
        .map(|u| {
            let parts = queue.iter().filter(|o| o.table == u.table).count().max(1) as i64;
            plan.tables[u.table].est_rows / parts
        })
        .sum();
    let progress = Progress::new("initial copy", total as u64, est_rows.max(0) as u64);
    let queue = Mutex::new(queue);
    let stats = Mutex::new(CopyStats::default());
    let workers = (0..jobs.max(1).min(total.max(1))).map(|_| {
        worker(source, target, plan, &exported, &snapshot, &queue, &stats, &progress, env)
    });
    let results = futures_util::future::join_all(workers).await;
    ctx.commit().await.map_err(qs)?;
    progress.finish();
    for r in results {
        r?;
    }
    if total > 0 {
        // Catches what the workers did not (tables copied in an earlier,
        // interrupted run); cheap when everything exists.
        build_indexes(source, target, plan, jobs, env).await?;
    }

    // Where apply starts: the earliest snapshot any unit was copied under,
    // or the start of capture if a table was left as the target had it.
    let row = tgt
        .query_one(
            &format!(
                "select bool_or(snapshot is null),
                        (array_agg(snapshot order by txid_snapshot_xmax(snapshot::txid_snapshot)))[1]
                 from {s}.copy_units where sync = $1"
            ),
            &[&plan.sync],
        )
        .await
        .map_err(qt)?;
    let (skipped, earliest): (Option<bool>, Option<String>) = (row.get(0), row.get(1));
    let mut stats = stats.into_inner().unwrap();
    stats.millis = started.elapsed().as_millis() as i64;
    if total > 0 {
        tracing::info!(
            sync = plan.sync,
            rows = stats.rows,
            mb = stats.bytes / 1_000_000,
            ms = stats.millis,
            "initial copy done"
        );
    }
    Ok((if skipped.unwrap_or(false) { None } else { earliest }, stats))
}

/// Builds, for every table copied, the indexes and key constraints the
/// source has and the target lacks, several tables at once. Loading first
/// and indexing after is what makes a bulk load fast.
async fn build_indexes(
    source: &DbConn,
    target: &DbConn,
    plan: &Plan,
    jobs: usize,
    env: Env<'_>,
) -> Result<()> {
    let src = source.connect(env).await?.client;
    let mut work = VecDeque::new();
    for t in &plan.tables {
        let items = schema::post_data(&src, &source.name, &t.table).await?;
        if !items.is_empty() {
            work.push_back((t, items));
        }
    }
    let queue = Mutex::new(work);
    let builders = (0..jobs.max(1)).map(|_| async {
        let tgt = target.connect(env).await?.client;
        loop {
            let Some((t, items)) = queue.lock().unwrap().pop_front() else { break };
            let started = Instant::now();
            let created = schema::create_missing(&tgt, &target.name, &t.table, &items).await?;
            if created > 0 {
                tracing::info!(
                    sync = plan.sync,
                    table = t.display,
                    created,
                    ms = started.elapsed().as_millis() as u64,
                    "indexes built"
                );
            }
        }
        Ok::<_, Error>(())
    });
    for r in futures_util::future::join_all(builders).await {
        r?;
    }
    Ok(())
}

/// Decides the units: which tables to copy (all, or the empty ones), split
/// into key ranges when large; empties the tables to be copied.
#[allow(clippy::too_many_arguments)]
async fn plan_units(
    src: &tokio_postgres::Transaction<'_>,
    sdb: &str,
    tgt: &mut Client,
    tdb: &str,
    plan: &Plan,
    mode: OneTimeCopy,
    jobs: usize,
    snapshot: &str,
) -> Result<()> {
    let qt = |e: tokio_postgres::Error| Error::query(tdb, &e);
    let s = quote_ident(&plan.schema);
    let tx = tgt.transaction().await.map_err(qt)?;
    let mut unit = 0;
    let mut to_empty = Vec::new();
    for t in &plan.tables {
        let has_rows: bool = tx
            .query_one(&format!("select exists (select 1 from {})", t.table), &[])
            .await
            .map_err(qt)?
            .get(0);
        let mut predicates = vec![];
        if has_rows && mode == OneTimeCopy::IfEmpty {
            // Kept as the target has it: a done unit without a snapshot.
            unit += 1;
            tx.execute(
                &format!(
                    "insert into {s}.copy_units (sync, unit, table_name, predicate, done)
                     values ($1, $2, $3, 'false', true)"
                ),
                &[&plan.sync, &unit, &t.table],
            )
            .await
            .map_err(qt)?;
            continue;
        }
        if has_rows {
            to_empty.push(t.table.clone());
        }
        if let Some(ranges) = split(src, sdb, t, jobs).await? {
            predicates.extend(ranges);
        } else {
            predicates.push("true".to_string());
        }
        for p in predicates {
            unit += 1;
            tx.execute(
                &format!(
                    "insert into {s}.copy_units (sync, unit, table_name, predicate)
                     values ($1, $2, $3, $4)"
                ),
                &[&plan.sync, &unit, &t.table, &p],
            )
            .await
            .map_err(qt)?;
        }
    }
    if !to_empty.is_empty() {
        tx.batch_execute(&format!("truncate {}", to_empty.join(", "))).await.map_err(qt)?;
    }
    tx.commit().await.map_err(qt)?;
    tracing::debug!(sync = plan.sync, units = unit, snapshot, "copy planned");
    Ok(())
}

/// Key ranges for a large table with a single integer key, else None.
async fn split(
    src: &tokio_postgres::Transaction<'_>,
    sdb: &str,
    t: &TablePlan,
    jobs: usize,
) -> Result<Option<Vec<String>>> {
    if t.keys.len() != 1 || t.est_rows < SPLIT_ROWS || jobs < 2 {
        return Ok(None);
    }
    let key = &t.keys[0];
    let row = src
        .query_one(
            &format!(
                "select pg_typeof(min({key}))::text, min({key})::int8, max({key})::int8 from {}",
                t.table
            ),
            &[],
        )
        .await
        .map_err(|e| Error::query(sdb, &e))?;
    let ty: String = row.get(0);
    let (Some(lo), Some(hi)) = (row.get::<_, Option<i64>>(1), row.get::<_, Option<i64>>(2)) else {
        return Ok(None);
    };
    if !matches!(ty.as_str(), "smallint" | "integer" | "bigint") || hi <= lo {
        return Ok(None);
    }
    let n = (jobs as i64 * RANGES_PER_JOB).min(hi - lo);
    let step = (hi - lo) / n + 1;
    let mut ranges = Vec::new();
    for i in 0..n {
        let from = lo + i * step;
        let to = from + step;
        // Open at both ends, so the ranges cover every value.
        ranges.push(match (i, i == n - 1) {
            (0, true) => "true".to_string(),
            (0, false) => format!("{key} < {to}"),
            (_, true) => format!("{key} >= {from}"),
            _ => format!("{key} >= {from} and {key} < {to}"),
        });
    }
    Ok(Some(ranges))
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    source: &DbConn,
    target: &DbConn,
    plan: &Plan,
    exported: &str,
    snapshot: &str,
    queue: &Mutex<VecDeque<Unit>>,
    stats: &Mutex<CopyStats>,
    progress: &Progress,
    env: Env<'_>,
) -> Result<()> {
    if queue.lock().unwrap().is_empty() {
        return Ok(());
    }
    let (sdb, tdb) = (source.name.as_str(), target.name.as_str());
    let qs = |e: tokio_postgres::Error| Error::query(sdb, &e);
    let qt = |e: tokio_postgres::Error| Error::query(tdb, &e);
    let mut src = source.connect(env).await?.client;
    let mut tgt = target.connect(env).await?.client;
    // Triggers and foreign keys must not fire; where the role may not set
    // this, they were set aside before the copy (apply::prepare_target).
    let _ = tgt.batch_execute("set session_replication_role = replica").await;
    tgt.batch_execute("set pgleap.applying = on").await.map_err(qt)?;
    let stx = src
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(qs)?;
    stx.batch_execute(&format!("set transaction snapshot {}", quote_literal(exported)))
        .await
        .map_err(qs)?;
    let s = quote_ident(&plan.schema);
    loop {
        let Some(unit) = queue.lock().unwrap().pop_front() else { break };
        let t = &plan.tables[unit.table];
        let ttx = tgt.transaction().await.map_err(qt)?;
        let out = stx
            .copy_out(&format!(
                "copy (select {} from {} where {}) to stdout",
                t.columns, t.table, unit.predicate
            ))
            .await
            .map_err(qs)?;
        let sink = ttx
            .copy_in(&format!("copy {} ({}) from stdin", t.table, t.columns))
            .await
            .map_err(qt)?;
        let bar = progress.start_unit(&format!("{} ({})", t.display, unit.predicate));
        let (rows, bytes) =
            apply::pump_counted(out, sink, sdb, tdb, &|n| progress.advance(&bar, n)).await?;
        let marked = ttx
            .execute(
                &format!(
                    "update {s}.copy_units set done = true, snapshot = $3, rows = $4
                     where sync = $1 and unit = $2 and not done"
                ),
                &[&plan.sync, &unit.id, &snapshot, &(rows as i64)],
            )
            .await
            .map_err(qt)?;
        if marked == 0 {
            // Someone else copied this part meanwhile: keep theirs, or a
            // table without a key would hold its rows twice.
            ttx.rollback().await.map_err(qt)?;
            progress.finish_unit(bar, 0);
            continue;
        }
        ttx.commit().await.map_err(qt)?;
        progress.finish_unit(bar, rows);
        {
            let mut st = stats.lock().unwrap();
            st.units += 1;
            st.rows += rows;
            st.bytes += bytes;
        }
        // The table's last part is in: build its indexes now, while other
        // workers go on copying.
        let remaining: i64 = tgt
            .query_one(
                &format!(
                    "select count(*) from {s}.copy_units
                     where sync = $1 and table_name = $2 and not done"
                ),
                &[&plan.sync, &t.table],
            )
            .await
            .map_err(qt)?
            .get(0);
        if remaining == 0 {
            let items = schema::post_data(&stx, sdb, &t.table).await?;
            let itx = tgt.transaction().await.map_err(qt)?;
            // Two workers finishing a table's last parts at once: one builds.
            itx.execute("select pg_advisory_xact_lock(hashtext($1))", &[&t.table])
                .await
                .map_err(qt)?;
            let created = schema::create_missing(&itx, tdb, &t.table, &items).await?;
            itx.commit().await.map_err(qt)?;
            if created > 0 {
                tracing::debug!(table = t.display, created, "indexes built after the load");
            }
        }
    }
    stx.commit().await.map_err(qs)?;
    Ok(())
}
