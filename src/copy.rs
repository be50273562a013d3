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

use tokio_postgres::error::SqlState;

use crate::apply::{self, Plan, TablePlan, truncatable};
use crate::catalog::OneTimeCopy;
use crate::error::{Error, Result};
use crate::fidelity;
use crate::large_objects;
use crate::pg::{Conn, Env, NamedQuery, Sql, Tx, quote_ident};
use crate::progress::Progress;
use crate::route::DbConn;
use crate::schema;

/// Tables estimated above this many rows, or this many bytes (wide rows:
/// a table of few rows can still be the copy's longest part), are split
/// into ranges.
const SPLIT_ROWS: i64 = 200_000;
const SPLIT_BYTES: i64 = 64 << 20;
/// Ranges per worker for a split table.
const RANGES_PER_JOB: i64 = 4;
/// Large objects per initial-copy unit.
const LARGE_OBJECTS_PER_UNIT: i64 = 1000;

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
    /// The index of the table in the plan; `None` for large objects.
    table: Option<usize>,
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
    let s = quote_ident(&plan.schema);
    let mut tgt = target.connect(env).await?;
    tgt.batch_execute(&format!(
        "create table if not exists {s}.copy_units (
             sync text not null,
             unit int not null,
             table_name text not null,
             predicate text not null,
             done bool not null default false,
             snapshot text,
             rows int8,
             primary key (sync, unit));
         alter table {s}.copy_units add column if not exists done_at timestamptz"
    ))
    .await?;

    // The coordinator holds the exported snapshot until every worker is done.
    let mut coordinator = source.connect(env).await?;
    let ctx = coordinator.snapshot().await?;
    let (exported, snapshot) = ctx.export_snapshot().await?;

    let planned: i64 = tgt
        .query_one(&format!("select count(*) from {s}.copy_units where sync = $1"), &[&plan.sync])
        .await?
        .get(0);
    if planned == 0 {
        plan_units(&ctx, &mut tgt, plan, mode, jobs, &snapshot).await?;
    } else {
        restart_partial_keyless(&mut tgt, plan).await?;
    }
    let queue = pending_units(&tgt, plan).await?;
    let total = queue.len();
    if total > 0 {
        tracing::info!(sync = plan.sync, units = total, jobs, "initial copy starting");
    }
    // Each part's share of its table's size: the progress's estimate.
    let part_bytes: Vec<u64> = (0..plan.tables.len())
        .map(|i| {
            let parts = queue.iter().filter(|u| u.table == Some(i)).count().max(1) as i64;
            (plan.tables[i].est_bytes / parts).max(0) as u64
        })
        .collect();
    let est_bytes: u64 = queue.iter().filter_map(|u| Some(part_bytes[u.table?])).sum();
    let run = CopyRun {
        source,
        target,
        plan,
        exported: &exported,
        snapshot: &snapshot,
        queue: Mutex::new(queue),
        stats: Mutex::new(CopyStats::default()),
        progress: Progress::new("initial copy", total as u64, est_bytes),
        part_bytes,
        env,
    };
    let workers = (0..jobs.max(1).min(total.max(1))).map(|_| run.worker());
    let results = futures_util::future::join_all(workers).await;
    ctx.commit().await?;
    for r in results {
        r?;
    }
    // Catches what the workers did not: tables whose last part was copied
    // by a process that died before building their indexes, or whose build
    // failed. Runs whenever the copy is not recorded as handed off yet,
    // even with every part done; cheap when everything exists.
    run.progress.phase("indexes and key constraints");
    build_indexes(source, target, plan, jobs, env).await?;
    if total > 0 {
        // The first queries on the new server must not run blind: every
        // table gets statistics before it can be cut over to.
        run.progress.phase("analyze");
        analyze(target, plan, jobs, env).await?;
    }
    run.progress.phase("other schema objects");
    complete_schema(source, target, plan, env).await?;
    run.progress.finish();
    let mut stats = run.stats.into_inner().unwrap();
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
    Ok((handoff(&tgt, plan).await?, stats))
}

/// A keyless table's parts must all be copied under one snapshot: its
/// replay skips exactly the events that snapshot saw, and rows have no key
/// to make a second copy of one harmless. So a keyless table copied in part
/// by an interrupted run is emptied and copied again whole, in this run.
async fn restart_partial_keyless(tgt: &mut Conn, plan: &Plan) -> Result<()> {
    let s = quote_ident(&plan.schema);
    for t in plan.tables.iter().filter(|t| t.keys.is_empty()) {
        let tx = tgt.transaction().await?;
        let row = tx
            .query_one(
                &format!(
                    "select count(*) filter (where done), count(*) from {s}.copy_units
                     where sync = $1 and table_name = $2"
                ),
                &[&plan.sync, &t.table],
            )
            .await?;
        let (done, total): (i64, i64) = (row.get(0), row.get(1));
        if done == 0 || done == total {
            continue;
        }
        tx.batch_execute(&format!("truncate {}", t.rel())).await?;
        tx.execute(
            &format!(
                "update {s}.copy_units set done = false, snapshot = null, rows = null
                 where sync = $1 and table_name = $2"
            ),
            &[&plan.sync, &t.table],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(
            sync = plan.sync,
            table = t.display,
            "keyless table copied in part before an interruption: copying it again whole"
        );
    }
    Ok(())
}

/// The units not copied yet, in order.
async fn pending_units(tgt: &Conn, plan: &Plan) -> Result<VecDeque<Unit>> {
    let rows = tgt
        .query(
            &format!(
                "select unit, table_name, predicate from {}.copy_units
                 where sync = $1 and not done order by unit",
                quote_ident(&plan.schema)
            ),
            &[&plan.sync],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let table: &str = r.get(1);
            let index = match table {
                large_objects::UNIT_NAME => None,
                _ => Some(plan.tables.iter().position(|t| t.table == table)?),
            };
            Some(Unit { id: r.get(0), table: index, predicate: r.get(2) })
        })
        .collect())
}

/// Where apply starts: the earliest snapshot any unit was copied under, or
/// the start of capture (`None`) if a table was left as the target had it.
async fn handoff(tgt: &Conn, plan: &Plan) -> Result<Option<String>> {
    let row = tgt
        .query_one(
            &format!(
                "select bool_or(snapshot is null),
                        (array_agg(snapshot order by txid_snapshot_xmax(snapshot::txid_snapshot)))[1]
                 from {}.copy_units where sync = $1",
                quote_ident(&plan.schema)
            ),
            &[&plan.sync],
        )
        .await?;
    let (skipped, earliest): (Option<bool>, Option<String>) = (row.get(0), row.get(1));
    Ok(if skipped.unwrap_or(false) { None } else { earliest })
}

/// Index builds after the load sort every key: at the default 64MB a big
/// table's sort spills to disk. Raised to 256MB per session (each worker
/// builds one table's indexes at a time), never lowered from what the
/// target's configuration gives.
const INDEX_BUILD_MEMORY: &str = "select set_config('maintenance_work_mem', '256MB', false)
     from pg_settings where name = 'maintenance_work_mem' and setting::int8 < 262144";

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
    let src = source.connect(env).await?;
    let mut work = VecDeque::new();
    for t in &plan.tables {
        let items = schema::post_data(&src, &t.table).await?;
        if !items.is_empty() {
            work.push_back((t, items));
        }
    }
    let queue = Mutex::new(work);
    let builders = (0..jobs.max(1)).map(|_| async {
        let tgt = target.connect(env).await?;
        tgt.batch_execute(INDEX_BUILD_MEMORY).await?;
        loop {
            let Some((t, items)) = queue.lock().unwrap().pop_front() else { break };
            let started = Instant::now();
            let created = schema::create_missing(&tgt, &t.table, &items).await?;
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

/// Creates what the target still lacks of what belongs before the data
/// and after it (see `fidelity`): indexes and constraints of partitions,
/// NOT VALID checks, materialized views populated and indexed, policies,
/// privileges, comments, settings, statistics of partitions. What cannot
/// be created is logged; cutover refuses to switch while it is missing.
async fn complete_schema(
    source: &DbConn,
    target: &DbConn,
    plan: &Plan,
    env: Env<'_>,
) -> Result<()> {
    let src = source.connect(env).await?;
    let tgt = target.connect(env).await?;
    let scope = fidelity::Scope::of_plan(plan);
    let differences = fidelity::compare(&src, &tgt, &scope).await?;
    for d in fidelity::create(&tgt, differences, fidelity::Stage::AfterData).await? {
        if d.stage < fidelity::Stage::Cutover {
            tracing::warn!(sync = plan.sync, "{}", fidelity::describe(&d));
        }
    }
    Ok(())
}

/// Analyzes every table of the plan on the target, several at once.
async fn analyze(target: &DbConn, plan: &Plan, jobs: usize, env: Env<'_>) -> Result<()> {
    let started = Instant::now();
    let queue = Mutex::new(plan.tables.iter().collect::<VecDeque<_>>());
    let workers = (0..jobs.max(1)).map(|_| async {
        let tgt = target.connect(env).await?;
        loop {
            // The guard must go before the await: another worker of this
            // task takes the lock meanwhile.
            let Some(t) = queue.lock().unwrap().pop_front() else { break };
            tgt.batch_execute(&format!("analyze {}", t.table)).await?;
        }
        Ok::<_, Error>(())
    });
    for r in futures_util::future::join_all(workers).await {
        r?;
    }
    tracing::info!(
        sync = plan.sync,
        tables = plan.tables.len(),
        ms = started.elapsed().as_millis() as u64,
        "tables analyzed on the target"
    );
    Ok(())
}

/// Decides the units: which tables to copy (all, or the empty ones), split
/// into key ranges when large; empties the tables to be copied.
async fn plan_units(
    src: &Tx<'_>,
    tgt: &mut Conn,
    plan: &Plan,
    mode: OneTimeCopy,
    jobs: usize,
    snapshot: &str,
) -> Result<()> {
    let s = quote_ident(&plan.schema);
    let tx = tgt.transaction().await?;
    // The copy rewrites the tables: what a verify found equal before is
    // no basis for an incremental one (see `verify`).
    if tx.relation_exists(&format!("{s}.verified_parts")).await? {
        tx.execute(&format!("delete from {s}.verified_parts where sync = $1"), &[&plan.sync])
            .await?;
    }
    let mut unit = 0;
    let mut to_empty = Vec::new();
    // Biggest first: units are taken in order, and a big table started
    // last would leave the other workers idle at the end.
    let mut tables: Vec<&TablePlan> = plan.tables.iter().collect();
    tables.sort_by_key(|t| std::cmp::Reverse(t.est_bytes));
    for t in tables {
        let has_rows: bool =
            tx.query_one(&format!("select exists (select 1 from {})", t.rel()), &[]).await?.get(0);
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
            .await?;
            continue;
        }
        if has_rows {
            to_empty.push(t.rel());
        }
        let predicates =
            split(src, t, jobs).await?.unwrap_or_else(|| vec![WHOLE_TABLE.to_string()]);
        for p in predicates {
            unit += 1;
            tx.execute(
                &format!(
                    "insert into {s}.copy_units (sync, unit, table_name, predicate)
                     values ($1, $2, $3, $4)"
                ),
                &[&plan.sync, &unit, &t.table, &p],
            )
            .await?;
        }
    }
    if plan.large_objects {
        for p in large_objects::unit_predicates(src, LARGE_OBJECTS_PER_UNIT).await? {
            unit += 1;
            tx.execute(
                &format!(
                    "insert into {s}.copy_units (sync, unit, table_name, predicate)
                     values ($1, $2, $3, $4)"
                ),
                &[&plan.sync, &unit, &large_objects::UNIT_NAME, &p],
            )
            .await?;
        }
    }
    if !to_empty.is_empty() {
        tx.batch_execute(&format!("truncate {}", to_empty.join(", "))).await?;
    }
    tx.commit().await?;
    tracing::debug!(sync = plan.sync, units = unit, snapshot, "copy planned");
    Ok(())
}

/// Ranges for a large keyed table: of its integer key, else (sources 14
/// and later, which scan TID ranges) of its physical blocks; None for a
/// table copied whole. A keyless table is never split: its replay skips
/// the events its copy holds by the one snapshot of its one part.
async fn split(src: &Tx<'_>, t: &TablePlan, jobs: usize) -> Result<Option<Vec<String>>> {
    if (t.est_rows < SPLIT_ROWS && t.est_bytes < SPLIT_BYTES) || jobs < 2 {
        return Ok(None);
    }
    if !t.keys.is_empty()
        && let Some(ranges) = key_ranges(src, t, jobs as i64 * RANGES_PER_JOB).await?
    {
        return Ok(Some(ranges));
    }
    // Any other table, keyless ones too, by ranges of blocks (14+); a
    // keyless table's parts are redone together if a run is interrupted
    // (see `restart_partial_keyless`).
    block_ranges(src, t, jobs).await
}

/// Ranges of blocks (`ctid`), which any table has whatever its key: a TID
/// range scan reads only its blocks (PostgreSQL 14 and later). Partitioned
/// tables are left whole (each partition has its own blocks).
async fn block_ranges(src: &Tx<'_>, t: &TablePlan, jobs: usize) -> Result<Option<Vec<String>>> {
    if !src.version().has_tid_range_scans() || t.partitioned {
        return Ok(None);
    }
    let blocks: i64 = src.query_one(BLOCKS, &[&t.table]).await?.get(0);
    let n = (jobs as i64 * RANGES_PER_JOB).min(blocks);
    if n < 2 {
        return Ok(None);
    }
    let step = blocks / n + 1;
    let tid = |block: i64| format!("'({block},0)'::tid");
    let mut ranges = Vec::new();
    for i in 0..n {
        let (from, to) = (i * step, (i + 1) * step);
        // Open at the end: the last range takes the blocks added since.
        ranges.push(match i == n - 1 {
            true => format!("ctid >= {}", tid(from)),
            false => format!("ctid >= {} and ctid < {}", tid(from), tid(to)),
        });
    }
    Ok(Some(ranges))
}

/// At most `pieces` ranges of a table's one integer key, covering every
/// value, or None (another key, an empty table); verify splits by them too.
pub(crate) async fn key_ranges(
    src: &impl Sql,
    t: &TablePlan,
    pieces: i64,
) -> Result<Option<Vec<String>>> {
    let spans = key_spans(src, t, pieces).await?;
    Ok(spans.map(|s| s.iter().map(|&(lo, hi)| span_predicate(&t.keys[0], lo, hi)).collect()))
}

/// The ranges of [`key_ranges`] as bounds: from `lo` (included) to `hi`
/// (excluded), None where open. The first is open below and the last
/// above, so that they cover every value.
pub(crate) async fn key_spans(
    src: &impl Sql,
    t: &TablePlan,
    pieces: i64,
) -> Result<Option<Vec<(Option<i64>, Option<i64>)>>> {
    if t.keys.len() != 1 {
        return Ok(None);
    }
    let key = &t.keys[0];
    // The type first: min() and a cast to int8 do not exist for every key
    // type (uuid, text, ...); such tables are copied whole.
    let ty = src
        .query_opt(&format!("select pg_typeof({key})::text from {} limit 1", t.rel()), &[])
        .await?
        .map(|r| r.get::<_, String>(0));
    if !matches!(ty.as_deref(), Some("smallint" | "integer" | "bigint")) {
        return Ok(None);
    }
    let row = src
        .query_one(&format!("select min({key})::int8, max({key})::int8 from {}", t.rel()), &[])
        .await?;
    let (Some(lo), Some(hi)) = (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1)) else {
        return Ok(None);
    };
    if hi <= lo {
        return Ok(None);
    }
    let n = pieces.min(hi - lo).max(1);
    let step = (hi - lo) / n + 1;
    let spans = (0..n).map(|i| {
        let from = lo + i * step;
        ((i > 0).then_some(from), (i < n - 1).then_some(from + step))
    });
    Ok(Some(spans.collect()))
}

/// A range of `key` (quoted) as a predicate.
pub(crate) fn span_predicate(key: &str, lo: Option<i64>, hi: Option<i64>) -> String {
    match (lo, hi) {
        (None, None) => WHOLE_TABLE.to_string(),
        (None, Some(to)) => format!("{key} < {to}"),
        (Some(from), None) => format!("{key} >= {from}"),
        (Some(from), Some(to)) => format!("{key} >= {from} and {key} < {to}"),
    }
}

/// The predicate of a unit that is a whole table.
const WHOLE_TABLE: &str = "true";

/// Whether a table copied whole may be emptied and loaded with COPY
/// FREEZE in one transaction: not a partitioned table (it has no rows of
/// its own to freeze), and one the role may truncate. Asked before the
/// transaction: COPY FREEZE refuses to run after other activity in it.
async fn may_freeze(tgt: &Conn, t: &TablePlan) -> Result<bool> {
    Ok(!t.partitioned && truncatable(tgt, t).await?)
}

/// One initial copy in progress: what every worker shares.
struct CopyRun<'a> {
    source: &'a DbConn,
    target: &'a DbConn,
    plan: &'a Plan,
    /// The coordinator's exported snapshot, imported by every worker.
    exported: &'a str,
    /// The same snapshot as txid_snapshot text, recorded with each unit.
    snapshot: &'a str,
    queue: Mutex<VecDeque<Unit>>,
    stats: Mutex<CopyStats>,
    progress: Progress,
    /// Per table, the estimated bytes of one of its parts.
    part_bytes: Vec<u64>,
    env: Env<'a>,
}

impl CopyRun<'_> {
    fn next_unit(&self) -> Option<Unit> {
        self.queue.lock().unwrap().pop_front()
    }

    /// Takes units off the queue until it is empty, each in its own target
    /// transaction, all read in the exported snapshot.
    async fn worker(&self) -> Result<()> {
        if self.queue.lock().unwrap().is_empty() {
            return Ok(());
        }
        let mut src = self.source.connect(self.env).await?;
        let mut tgt = self.target.connect(self.env).await?;
        // Triggers and foreign keys must not fire; where the role may not
        // set this, they were set aside before the copy (target::prepare).
        let _ = tgt.batch_execute("set session_replication_role = replica").await;
        tgt.batch_execute("set pgleap.applying = on").await?;
        tgt.batch_execute(INDEX_BUILD_MEMORY).await?;
        let stx = src.imported_snapshot(self.exported).await?;
        while let Some(unit) = self.next_unit() {
            let copied = self.copy_unit(&stx, &mut tgt, &unit).await?;
            if let Some(table) = unit.table.filter(|_| copied) {
                self.build_indexes_if_last(&stx, &mut tgt, &self.plan.tables[table]).await?;
            }
        }
        stx.commit().await?;
        Ok(())
    }

    /// Whether `unit` is marked done on the target.
    async fn unit_done(&self, tgt: &Conn, unit: &Unit) -> Result<bool> {
        let sql = format!(
            "select done from {}.copy_units where sync = $1 and unit = $2",
            quote_ident(&self.plan.schema)
        );
        let row = tgt.query_opt(&sql, &[&self.plan.sync, &unit.id]).await?;
        Ok(row.is_some_and(|r| r.get(0)))
    }

    /// Loads one unit and marks it done, in one target transaction. Returns
    /// false if another worker had copied it meanwhile.
    async fn copy_unit(&self, stx: &Tx<'_>, tgt: &mut Conn, unit: &Unit) -> Result<bool> {
        let freeze = match unit.table {
            Some(table) if unit.predicate == WHOLE_TABLE => {
                may_freeze(tgt, &self.plan.tables[table]).await?
            }
            _ => false,
        };
        let ttx = tgt.transaction().await?;
        let (rows, bytes, bar) = match unit.table {
            Some(table) => {
                let t = &self.plan.tables[table];
                // A whole table's predicate is `true`: its name says it.
                let name = if unit.predicate == "true" {
                    t.display.clone()
                } else {
                    format!("{} ({})", t.display, unit.predicate)
                };
                let bar = self.progress.start_unit(&name, self.part_bytes[table]);
                let copy_in = if freeze {
                    // Emptied in this transaction, so the rows can be
                    // written frozen (and, on 14+, all-visible): no
                    // hint-bit rewrite of every page by the index builds
                    // and ANALYZE that follow, and no anti-wraparound
                    // vacuum of the whole table months after the switch.
                    ttx.batch_execute(&format!("truncate {}", t.rel())).await?;
                    format!("{} (freeze)", t.copy_in())
                } else {
                    t.copy_in()
                };
                let on_bytes = |n| self.progress.advance(&bar, n);
                let copied =
                    apply::copy_table_rows(stx, &ttx, t, &unit.predicate, &copy_in, &on_bytes)
                        .await;
                let (rows, bytes) = match copied {
                    Ok(done) => done,
                    // Another process copied this part meanwhile (one whose
                    // lock went with a terminated session while its workers
                    // went on): its rows are the same, keep them.
                    Err(e)
                        if !t.keys.is_empty()
                            && e.sqlstate() == Some(&SqlState::UNIQUE_VIOLATION) =>
                    {
                        ttx.rollback().await?;
                        self.progress.finish_unit(bar, 0);
                        if self.unit_done(tgt, unit).await? {
                            return Ok(false);
                        }
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                };
                (rows, bytes, bar)
            }
            None => {
                let name = format!("large objects ({})", unit.predicate);
                let bar = self.progress.start_unit(&name, 0);
                let (schema, sync) = (&self.plan.schema, &self.plan.sync);
                let (objects, bytes) =
                    large_objects::copy_unit(stx, &ttx, schema, sync, &unit.predicate).await?;
                self.progress.advance(&bar, bytes);
                (objects, bytes, bar)
            }
        };
        let marked = ttx
            .execute(
                &format!(
                    "update {}.copy_units set done = true, snapshot = $3, rows = $4, done_at = now()
                     where sync = $1 and unit = $2 and not done",
                    quote_ident(&self.plan.schema)
                ),
                &[&self.plan.sync, &unit.id, &self.snapshot, &(rows as i64)],
            )
            .await?;
        if marked == 0 {
            // Someone else copied this part meanwhile: keep theirs, or a
            // table without a key would hold its rows twice.
            ttx.rollback().await?;
            self.progress.finish_unit(bar, 0);
            return Ok(false);
        }
        ttx.commit().await?;
        crate::failpoint::hit("copy-unit-done");
        self.progress.finish_unit(bar, rows);
        metrics::counter!("pgleap_copy_bytes_total", "sync" => self.plan.sync.clone(),
            "target" => self.target.name.clone())
        .increment(bytes);
        let mut st = self.stats.lock().unwrap();
        st.units += 1;
        st.rows += rows;
        st.bytes += bytes;
        Ok(true)
    }

    /// Once a table's last part is in, builds its indexes now, while other
    /// workers go on copying.
    async fn build_indexes_if_last(
        &self,
        stx: &Tx<'_>,
        tgt: &mut Conn,
        t: &TablePlan,
    ) -> Result<()> {
        let remaining: i64 = tgt
            .query_one(
                &format!(
                    "select count(*) from {}.copy_units
                     where sync = $1 and table_name = $2 and not done",
                    quote_ident(&self.plan.schema)
                ),
                &[&self.plan.sync, &t.table],
            )
            .await?
            .get(0);
        if remaining > 0 {
            return Ok(());
        }
        let items = schema::post_data(stx, &t.table).await?;
        // Two workers finishing a table's last parts at once: one builds.
        // Not in a transaction, so that a build that loses a race with
        // another session can see the other's index and go on.
        tgt.execute("select pg_advisory_lock(hashtext($1))", &[&t.table]).await?;
        let created = schema::create_missing(&*tgt, &t.table, &items).await?;
        tgt.execute("select pg_advisory_unlock(hashtext($1))", &[&t.table]).await?;
        if created > 0 {
            tracing::debug!(table = t.display, created, "indexes built after the load");
        }
        Ok(())
    }
}

// The catalog queries of this module, named.

const BLOCKS: &str = "select (pg_relation_size($1::text::regclass)
    / current_setting('block_size')::int8)::int8";

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries() -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("copy: a table's blocks", BLOCKS),
        NamedQuery::new("copy: index build memory", INDEX_BUILD_MEMORY),
    ]
}
