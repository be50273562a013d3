//! Comparing source and target table by table, with only digests on the
//! wire.
//!
//! Each side hashes every row's text form (identical across majors under
//! the pinned session settings, see `pg`, floats by their bits, see
//! [`value`]) and sums the hashes per bucket;
//! rows go to one of [`BUCKETS`] buckets by a hash of their key (of the whole
//! row for keyless tables). Sums are order-independent and count duplicates,
//! so keyless tables compare as multisets. Only buckets whose count or sum
//! differ are looked at row by row, to name the first differing keys.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::apply::{self, Plan, TablePlan};
use crate::catalog::Catalog;
use crate::error::Result;
use crate::fidelity::{self, Difference};
use crate::large_objects;
use crate::pg::{Conn, Env, Sql};
use crate::route::SyncRoute;
use crate::session::Session;
use crate::slices;

const BUCKETS: i32 = 64;
/// How the large objects are named in a report (and in `--table`).
const LARGE_OBJECTS: &str = "large objects";
/// How many differing keys a report names per table.
const SHOWN_KEYS: usize = 10;

#[derive(Debug, Clone, Serialize)]
pub struct TableReport {
    pub table: String,
    pub source_rows: i64,
    pub target_rows: i64,
    pub equal: bool,
    /// Keys (as text) whose rows differ or exist on one side only.
    pub differing_keys: Vec<String>,
    /// Indexes and key constraints the source's table has and the target's
    /// lacks.
    pub missing: Vec<String>,
    /// Parts of the table found equal by an earlier verify that was
    /// interrupted, taken from it instead of compared again.
    #[serde(skip_serializing_if = "is_zero")]
    pub resumed_parts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// How long an interrupted verify's parts are taken by the next one.
const RESUMABLE_FOR: &str = "24 hours";

fn md5_int(expr: &str) -> String {
    format!("('x' || substr(md5({expr}), 1, 15))::bit(60)::int8")
}

fn key_text(t: &TablePlan) -> String {
    if t.keys.is_empty() {
        format!("row({})::text", prefixed(t))
    } else {
        let parts: Vec<String> = t.keys.iter().map(|k| format!("{}::text", value(t, k))).collect();
        format!("concat_ws(',', {})", parts.join(", "))
    }
}

/// The row as text, over the copied columns only (generated columns are
/// computed by each side).
fn row_text(t: &TablePlan) -> String {
    format!("row({})::text", prefixed(t))
}

fn prefixed(t: &TablePlan) -> String {
    t.column_names.iter().map(|c| value(t, c)).collect::<Vec<_>>().join(", ")
}

/// Column `c` of row `t` in a form both servers print alike. A float's
/// text is not: 11 prints 9 or 17 significant digits under
/// extra_float_digits 3, 12 and later the shortest text that reads back
/// exactly ("0.0500000007" and "0.05" are one float4), so floats are
/// compared by their bits (as float8, which holds every float4 exactly).
fn value(t: &TablePlan, c: &str) -> String {
    if t.floats.iter().any(|f| f == c) {
        format!("encode(float8send(t.{c}::float8), 'hex')")
    } else if t.float_arrays.iter().any(|f| f == c) {
        // Its bounds, then its elements' bits in storage order.
        format!(
            "case when t.{c} is not null then coalesce(array_dims(t.{c}), '') || ':' ||
                 coalesce((select string_agg(coalesce(encode(float8send(u::float8), 'hex'), 'null'),
                                             ',')
                           from unnest(t.{c}) u), '') end"
        )
    } else if t.sliced(c).is_some() {
        slices::comparable(&format!("t.{c}"))
    } else {
        format!("t.{c}")
    }
}

/// A row's bucket, 0 to 63, from its key's text (its whole row's for a
/// keyless table) taken as bytes: `hashtext`, which every supported
/// release has, is three times cheaper than an md5 of the key (measured:
/// docs/BENCHMARKS.md). Were the two servers to hash differently (another
/// byte order), every bucket would differ: a loud difference, never a
/// silent equality.
fn bucket_of(t: &TablePlan) -> String {
    format!("(hashtext({} collate \"C\") & {})", key_text(t), BUCKETS - 1)
}

/// How a row's text becomes a number to sum: `hashtextextended` (64 bits)
/// where both servers have it (11 and later), else 60 bits of its md5,
/// which is twice as costly.
fn row_hash(t: &TablePlan, fast: bool) -> String {
    if fast {
        format!("hashtextextended({} collate \"C\", 0)", row_text(t))
    } else {
        md5_int(&row_text(t))
    }
}

async fn buckets(
    c: &impl Sql,
    t: &TablePlan,
    part: &str,
    fast: bool,
) -> Result<Vec<(i32, i64, String)>> {
    let sql = format!(
        "select {bucket}::int4 b, count(*), sum({row})::text
         from {table} t where {part} group by 1 order by 1",
        bucket = bucket_of(t),
        row = row_hash(t, fast),
        table = t.rel(),
    );
    let rows = c.query(&sql, &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
}

async fn bucket_rows(
    c: &impl Sql,
    t: &TablePlan,
    part: &str,
    bucket: i32,
) -> Result<Vec<(String, String)>> {
    let sql = format!(
        "select {key}, md5({row}) from {table} t
         where ({part}) and {bucket} = {b} order by 1, 2",
        key = key_text(t),
        row = row_text(t),
        bucket = bucket_of(t),
        table = t.rel(),
        b = bucket,
    );
    let rows = c.query(&sql, &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The predicate of a part that is the whole table.
const WHOLE: &str = "true";

/// Compares the rows of a table that `part` selects.
async fn compare_part(
    src: &impl Sql,
    tgt: &impl Sql,
    t: &TablePlan,
    part: &str,
) -> Result<TableReport> {
    let fast = src.version().has_hashtextextended() && tgt.version().has_hashtextextended();
    let (a, b) =
        futures_util::future::try_join(buckets(src, t, part, fast), buckets(tgt, t, part, fast))
            .await?;
    let count = |v: &[(i32, i64, String)]| v.iter().map(|x| x.1).sum::<i64>();
    let mut report = TableReport {
        table: t.display.clone(),
        source_rows: count(&a),
        target_rows: count(&b),
        equal: a == b,
        differing_keys: Vec::new(),
        missing: Vec::new(),
        resumed_parts: 0,
    };
    if report.equal {
        return Ok(report);
    }
    let mut differing: Vec<i32> = a.iter().filter(|x| !b.contains(x)).map(|x| x.0).collect();
    differing.extend(b.iter().filter(|x| !a.contains(x)).map(|x| x.0));
    differing.sort_unstable();
    differing.dedup();
    for bucket in differing {
        let (ra, rb) = futures_util::future::try_join(
            bucket_rows(src, t, part, bucket),
            bucket_rows(tgt, t, part, bucket),
        )
        .await?;
        for (key, _) in
            ra.iter().filter(|r| !rb.contains(r)).chain(rb.iter().filter(|r| !ra.contains(r)))
        {
            if !report.differing_keys.contains(key) && report.differing_keys.len() < SHOWN_KEYS {
                report.differing_keys.push(key.clone());
            }
        }
        if report.differing_keys.len() >= SHOWN_KEYS {
            break;
        }
    }
    report.differing_keys.sort();
    Ok(report)
}

/// Adds a part's report to its table's.
fn merge(into: &mut TableReport, part: TableReport) {
    into.source_rows += part.source_rows;
    into.target_rows += part.target_rows;
    into.equal &= part.equal;
    into.resumed_parts += part.resumed_parts;
    into.missing.extend(part.missing);
    for key in part.differing_keys {
        if into.differing_keys.len() < SHOWN_KEYS && !into.differing_keys.contains(&key) {
            into.differing_keys.push(key);
        }
    }
    into.differing_keys.sort();
}

/// What verify found for one target.
#[derive(Debug, Serialize)]
pub struct TargetReport {
    pub target: String,
    pub tables: Vec<TableReport>,
    /// Schema objects missing or different on the target. Before cutover,
    /// those that cutover creates (foreign keys, triggers, forced row
    /// security) are left out.
    pub schema: Vec<Difference>,
}

impl TargetReport {
    pub fn differing_tables(&self) -> usize {
        self.tables.iter().filter(|r| !r.equal).count()
    }
}

/// The schema objects of a plan's tables (and of their schemas) that the
/// target lacks or has different; with `cut_over` false, those the cutover
/// creates are not counted.
pub async fn compare_schema(
    src: &Conn,
    tgt: &Conn,
    plan: &Plan,
    cut_over: bool,
) -> Result<Vec<Difference>> {
    let scope = fidelity::Scope::of_plan(plan);
    let differences = fidelity::compare(src, tgt, &scope).await?;
    Ok(if cut_over {
        differences
    } else {
        fidelity::blocking(&differences).into_iter().cloned().collect()
    })
}

/// The tables of a plan named in `only` (all when empty).
fn selected<'p>(plan: &'p Plan, only: &[String]) -> Vec<&'p TablePlan> {
    plan.tables
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|o| *o == t.display || *o == t.table))
        .collect()
}

fn large_objects_asked(plan: &Plan, only: &[String]) -> bool {
    plan.large_objects && (only.is_empty() || only.iter().any(|o| o == LARGE_OBJECTS))
}

/// Bytes of a table (on the source's disk) per verify part: a big table is
/// compared in ranges of its integer key, so that it shows progress and
/// the workers share it (the copy splits it alike).
const PART_BYTES: i64 = 32 << 20;
/// At most this many parts per table.
const MAX_PARTS: i64 = 256;

/// One part of a verify: a table (its index in the list compared), whole or
/// a range of its key, and its share of the table's size.
struct Part {
    table: usize,
    predicate: String,
    estimate: u64,
    /// The table's first part, which also compares its indexes.
    first: bool,
}

/// The parts of the tables to compare, big tables first (a big table
/// started last would leave the other workers idle at the end). Ranges
/// are read from the source; they are open at both ends, so that any
/// snapshot's rows fall in one of them.
async fn parts(src: &impl Sql, tables: &[&TablePlan], workers: usize) -> Result<Vec<Part>> {
    let mut order: Vec<usize> = (0..tables.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tables[i].est_bytes));
    let mut out = Vec::new();
    for i in order {
        let t = tables[i];
        let wanted = (t.est_bytes / PART_BYTES).max(2 * workers as i64).min(MAX_PARTS);
        let ranges = if t.est_bytes > PART_BYTES {
            crate::copy::key_ranges(src, t, wanted).await?
        } else {
            None
        };
        let ranges = ranges.unwrap_or_else(|| vec![WHOLE.to_string()]);
        let estimate = bytes(t) / ranges.len() as u64;
        out.extend(ranges.into_iter().enumerate().map(|(n, predicate)| Part {
            table: i,
            predicate,
            estimate,
            first: n == 0,
        }));
    }
    Ok(out)
}

/// A verify reads every row on both servers: minutes to hours on a large
/// database, shown as it goes (bars on a terminal, lines else).
fn progress_of(parts: &[Part]) -> crate::progress::Progress {
    crate::progress::Progress::new(
        "verify",
        parts.len() as u64,
        parts.iter().map(|p| p.estimate).sum(),
    )
}

fn bytes(t: &TablePlan) -> u64 {
    t.est_bytes.max(0) as u64
}

/// Compares one part, shown in `progress`; the first part of a table also
/// compares its indexes.
async fn compare_shown(
    src: &impl Sql,
    tgt: &impl Sql,
    t: &TablePlan,
    part: &Part,
    progress: &crate::progress::Progress,
) -> Result<TableReport> {
    let name = match part.predicate.as_str() {
        WHOLE => t.display.clone(),
        p => format!("{} ({p})", t.display),
    };
    let unit = progress.start_unit(&name, part.estimate);
    let mut report = compare_part(src, tgt, t, &part.predicate).await?;
    if part.first {
        report.missing = crate::schema::missing_on_target(src, tgt, &t.table).await?;
        report.equal &= report.missing.is_empty();
    }
    progress.advance(&unit, part.estimate);
    progress.finish_unit(unit, report.source_rows.max(0) as u64);
    Ok(report)
}

/// The parts' reports, one per table in the order of `tables`.
fn per_table(tables: &[&TablePlan], parts: &[Part], reports: Vec<TableReport>) -> Vec<TableReport> {
    let mut out: Vec<Option<TableReport>> = vec![None; tables.len()];
    for (part, report) in parts.iter().zip(reports) {
        match &mut out[part.table] {
            Some(table) => merge(table, report),
            empty => *empty = Some(report),
        }
    }
    out.into_iter().flatten().collect()
}

async fn compare_large_objects(src: &impl Sql, tgt: &impl Sql) -> Result<TableReport> {
    let (source_rows, target_rows, differing_keys) = large_objects::compare(src, tgt).await?;
    Ok(TableReport {
        table: LARGE_OBJECTS.into(),
        source_rows,
        target_rows,
        equal: differing_keys.is_empty() && source_rows == target_rows,
        differing_keys,
        missing: Vec::new(),
        resumed_parts: 0,
    })
}

/// Compares the tables of a plan (those named in `only`, or all), one
/// after the other on one pair of connections.
pub async fn compare(
    src: &impl Sql,
    tgt: &impl Sql,
    plan: &Plan,
    only: &[String],
) -> Result<Vec<TableReport>> {
    let tables = selected(plan, only);
    let parts = parts(src, &tables, 1).await?;
    let progress = progress_of(&parts);
    let mut reports = Vec::new();
    for part in &parts {
        reports.push(compare_shown(src, tgt, tables[part.table], part, &progress).await?);
    }
    progress.finish();
    let mut out = per_table(&tables, &parts, reports);
    if large_objects_asked(plan, only) {
        out.push(compare_large_objects(src, tgt).await?);
    }
    Ok(out)
}

/// Verifies a sync. While it replicates, the comparison is made at one
/// consistent point: inside one target transaction holding the sync's
/// applier lock, the target is brought to the snapshot of a source
/// REPEATABLE READ transaction, and both are compared in those two
/// transactions, so writes going on meanwhile cannot show as differences.
/// Without `live` (or once the sync was cut over and the source is
/// fenced), the servers are compared as they are.
pub async fn verify_sync(
    catalog: &mut Catalog,
    sync: &str,
    only: &[String],
    live: bool,
    env: Env<'_>,
) -> Result<Vec<TargetReport>> {
    let route = SyncRoute::load(catalog, sync)?;
    let cut_over = route.sync.retired;
    let live = live && !cut_over;
    let mut out = Vec::new();
    for target in &route.targets {
        let (tables, schema) = if live {
            // The first batch also runs the initial copy, if one is due.
            let deadline = Some(Instant::now() + Duration::from_secs(300));
            let mut session =
                Session::open_retrying(catalog, &route, target, 1, deadline, env).await?;
            let until = session.source_snapshot().await?;
            session.catch_up(catalog, &until, deadline, env).await?;
            let tables = compare_live(&mut session, only, env).await?;
            (tables, compare_schema(&session.src, &session.tgt, &session.plan, false).await?)
        } else {
            let src = route.source.connect(env).await?;
            let tgt = target.connect(env).await?;
            let plan = Plan::load(&src, &route.sync, &route.relgroup).await?;
            let tables = compare(&src, &tgt, &plan, only).await?;
            (tables, compare_schema(&src, &tgt, &plan, cut_over).await?)
        };
        // Asked about some tables only: the schema is not what was asked.
        let schema = if only.is_empty() { schema } else { Vec::new() };
        out.push(TargetReport { target: target.name.clone(), tables, schema });
    }
    Ok(out)
}

/// Compares at one consistent point while the sync runs: one batch
/// applied, then both servers compared as of that batch by workers (half
/// the session's jobs: each keeps a backend busy on both servers) at once,
/// in snapshots exported by the batch's source transaction and by a target
/// transaction opened right after its commit.
/// The sync's applier lock is held only until both snapshots exist: the
/// daemon goes on applying while the workers read (#28).
pub async fn compare_live(
    session: &mut Session,
    only: &[String],
    env: Env<'_>,
) -> Result<Vec<TableReport>> {
    let plan = session.plan.clone();
    // Each worker keeps a backend busy hashing on each server: half the
    // jobs, so that the servers' cores are not oversubscribed (two workers
    // on this 2-core machine verified 20 % slower than one,
    // docs/BENCHMARKS.md).
    let workers = (session.jobs() / 2).max(1);
    let mut pairs = Vec::new();
    for _ in 0..workers {
        pairs.push(session.connect_pair(env).await?);
    }
    let record = session.connect_target(env).await?;
    let key = (apply::LOCK_CLASS, plan.sync_id);
    // Held by the session, not the batch's transaction: no other applier
    // moves the target past the batch before its snapshot exists.
    session.tgt.execute(apply::HOLD_LOCK, &[&key.0, &key.1]).await?;
    let (src, tgt) = (&mut session.src, &mut session.tgt);
    let compared = async {
        let ttx = tgt.transaction().await?;
        let (stx, _) = apply::source_snapshot(src, &plan).await?;
        apply::apply_within(&stx, &ttx, &plan, None).await?;
        if plan.large_objects {
            let (schema, sync) = (&plan.schema, &plan.sync);
            large_objects::pass(&stx, &ttx, schema, sync, large_objects::Pass::Full).await?;
        }
        ttx.commit().await?;
        // The compare keeps `stx` open: other pumps go on meanwhile, and
        // this one must not advance the slot (see `decoding::unlock`).
        plan.end_pump(&stx, None).await?;
        let (src_snapshot, _) = stx.export_snapshot().await?;
        let held = tgt.snapshot().await?;
        let (tgt_snapshot, _) = held.export_snapshot().await?;
        held.execute(apply::RELEASE_LOCK, &[&key.0, &key.1]).await?;
        let reports = compare_in(pairs, record, &src_snapshot, &tgt_snapshot, &plan, only).await?;
        held.commit().await?;
        stx.commit().await?;
        Ok::<_, crate::Error>(reports)
    }
    .await;
    if compared.is_err() {
        // Whatever step failed, the daemon must not wait on this session
        // (at most a warning if it was released already).
        let _ = session.tgt.execute(apply::RELEASE_LOCK, &[&key.0, &key.1]).await;
    }
    compared
}

/// The parts an interrupted verify of this sync found equal (within
/// [`RESUMABLE_FOR`]), as reports, at their index among the items (the
/// parts, then the large objects); None for those to compare.
async fn resumable(
    record: &Conn,
    plan: &Plan,
    tables: &[&TablePlan],
    parts: &[Part],
    items: usize,
) -> Result<Vec<Option<TableReport>>> {
    let rows = record.query(&resumable_sql(plan), &[&plan.sync]).await?;
    let found: Vec<(String, String, i64, i64)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    let mut earlier: Vec<Option<TableReport>> = parts
        .iter()
        .map(|p| {
            let t = tables[p.table];
            found.iter().find(|f| f.0 == t.table && f.1 == p.predicate).map(|f| TableReport {
                table: t.display.clone(),
                source_rows: f.2,
                target_rows: f.3,
                equal: true,
                differing_keys: Vec::new(),
                missing: Vec::new(),
                resumed_parts: 1,
            })
        })
        .collect();
    // The large objects, one item after the parts, are compared whole
    // every time.
    earlier.resize(items, None);
    Ok(earlier)
}

/// Records a part found equal, for a verify that resumes this one.
async fn record_part(
    record: &Conn,
    plan: &Plan,
    t: &TablePlan,
    part: &Part,
    report: &TableReport,
) -> Result<()> {
    record
        .execute(
            &record_sql(plan),
            &[&plan.sync, &t.table, &part.predicate, &report.source_rows, &report.target_rows],
        )
        .await?;
    Ok(())
}

fn resumable_sql(plan: &Plan) -> String {
    format!(
        "select table_name, predicate, source_rows, target_rows from {}.verified_parts
         where sync = $1 and verified_at > now() - interval '{RESUMABLE_FOR}'",
        crate::pg::quote_ident(&plan.schema)
    )
}

fn record_sql(plan: &Plan) -> String {
    format!(
        "insert into {}.verified_parts (sync, table_name, predicate, source_rows, target_rows)
         values ($1, $2, $3, $4, $5)
         on conflict (sync, table_name, predicate) do update
         set source_rows = excluded.source_rows, target_rows = excluded.target_rows,
             verified_at = now()",
        crate::pg::quote_ident(&plan.schema)
    )
}

fn forget_sql(plan: &Plan) -> String {
    format!("delete from {}.verified_parts where sync = $1", crate::pg::quote_ident(&plan.schema))
}

/// [`compare`], with the tables shared out to `pairs` of connections, each
/// reading in the snapshots given (exported by the caller, who keeps them
/// open until this returns).
async fn compare_in(
    pairs: Vec<(Conn, Conn)>,
    tgt_record: Conn,
    src_snapshot: &str,
    tgt_snapshot: &str,
    plan: &Plan,
    only: &[String],
) -> Result<Vec<TableReport>> {
    let tables = selected(plan, only);
    let Some((first, _)) = pairs.first() else { return Ok(Vec::new()) };
    let parts = parts(first, &tables, pairs.len()).await?;
    // What an interrupted verify found equal is not compared again: a
    // verify of hours resumes where it stopped. Recorded as each part ends,
    // through a connection of its own (the workers' transactions hold
    // their snapshots until the end).
    let record = &tgt_record;
    // The large objects, when asked for, are one more item.
    let items = parts.len() + usize::from(large_objects_asked(plan, only));
    let earlier = resumable(record, plan, &tables, &parts, items).await?;
    let progress = progress_of(&parts);
    let queue = Mutex::new((0..items).filter(|i| earlier[*i].is_none()).collect::<VecDeque<_>>());
    let results: Mutex<Vec<Option<TableReport>>> = Mutex::new(earlier);
    let workers = pairs.into_iter().map(|(mut s, mut t)| {
        let (queue, results, tables, parts, progress) =
            (&queue, &results, &tables, &parts, &progress);
        async move {
            let stx = s.imported_snapshot(src_snapshot).await?;
            let ttx = t.imported_snapshot(tgt_snapshot).await?;
            loop {
                // The guard must go before the await: the others take it.
                let Some(i) = queue.lock().unwrap().pop_front() else { break };
                let report = match parts.get(i) {
                    Some(part) => {
                        let t = tables[part.table];
                        let report = compare_shown(&stx, &ttx, t, part, progress).await?;
                        if report.equal {
                            record_part(record, plan, t, part, &report).await?;
                            crate::failpoint::hit("verify-part-done");
                        }
                        report
                    }
                    None => compare_large_objects(&stx, &ttx).await?,
                };
                results.lock().unwrap()[i] = Some(report);
            }
            stx.commit().await?;
            ttx.commit().await?;
            Ok::<_, crate::Error>(())
        }
    });
    futures_util::future::try_join_all(workers).await?;
    progress.finish();
    // Done: the next verify compares everything again.
    record.execute(&forget_sql(plan), &[&plan.sync]).await?;
    let mut results: Vec<TableReport> =
        results.into_inner().unwrap().into_iter().flatten().collect();
    let large_objects = (results.len() > parts.len()).then(|| results.pop()).flatten();
    let mut out = per_table(&tables, &parts, results);
    out.extend(large_objects);
    Ok(out)
}
