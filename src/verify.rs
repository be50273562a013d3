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

use std::collections::{HashMap, VecDeque};
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
    /// How many parts (ranges of its key, or itself whole) the table was
    /// looked at in.
    pub parts: u32,
    /// Parts of the table found equal by an earlier verify that was
    /// interrupted, taken from it instead of compared again.
    #[serde(skip_serializing_if = "is_zero")]
    pub resumed_parts: u32,
    /// Parts found equal by the last verify that ended and touched by no
    /// batch since, not compared again (`--incremental`).
    #[serde(skip_serializing_if = "is_zero")]
    pub unchanged_parts: u32,
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
        parts: 1,
        resumed_parts: 0,
        unchanged_parts: 0,
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
    into.parts += part.parts;
    into.resumed_parts += part.resumed_parts;
    into.unchanged_parts += part.unchanged_parts;
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
    /// The range of the table's integer key `predicate` selects: from `lo`
    /// (included) to `hi` (excluded), None where open; both None for a
    /// whole table. What a batch's keys are matched with (see
    /// `apply::touch`).
    lo: Option<i64>,
    hi: Option<i64>,
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
        let spans = if t.est_bytes > PART_BYTES {
            crate::copy::key_spans(src, t, wanted).await?
        } else {
            None
        };
        let spans = spans.unwrap_or_else(|| vec![(None, None)]);
        let estimate = bytes(t) / spans.len() as u64;
        out.extend(spans.into_iter().enumerate().map(|(n, (lo, hi))| Part {
            table: i,
            predicate: match (lo, hi) {
                (None, None) => WHOLE.to_string(),
                _ => crate::copy::span_predicate(&t.keys[0], lo, hi),
            },
            lo,
            hi,
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
        parts: 1,
        resumed_parts: 0,
        unchanged_parts: 0,
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
    incremental: bool,
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
            let tables = compare_live(&mut session, only, incremental, env).await?;
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
    incremental: bool,
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
    let mut record = session.connect_target(env).await?;
    let tables = selected(&plan, only);
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
        // At least one worker (see above).
        let first = &pairs[0].0;
        let (parts, earlier) =
            plan_live(first, &mut record, &plan, &tables, pairs.len(), incremental).await?;
        held.execute(apply::RELEASE_LOCK, &[&key.0, &key.1]).await?;
        let lo = large_objects_asked(&plan, only);
        let reports = compare_in(
            pairs,
            record,
            &src_snapshot,
            &tgt_snapshot,
            &plan,
            &tables,
            parts,
            earlier,
            lo,
        )
        .await?;
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

/// A part as an earlier verify of the sync recorded it on the target.
struct Recorded {
    table: String,
    predicate: String,
    lo: Option<i64>,
    hi: Option<i64>,
    shape: String,
    source_rows: i64,
    target_rows: i64,
    equal: bool,
    touched: bool,
    finished: bool,
    /// Within [`RESUMABLE_FOR`].
    recent: bool,
}

/// What a live verify compares, and what it takes from earlier ones
/// instead (per item, at the same index: the parts, then the large
/// objects, which are compared every time).
///
/// Earlier verifies' parts are recorded in the target's `verified_parts`
/// (one row per part: its range, the table's columns, whether it was
/// found equal, whether a batch touched it since, whether its verify
/// ended). A part is taken:
/// - resumed: found equal by a verify that did not end (killed), within
///   a day, whatever was applied to it since (trusted as any batch is);
/// - unchanged (`incremental`): found equal by the last verify that ended
///   and touched by no batch since. The table is then compared in that
///   verify's parts (they cover every key), not in new ones.
///
/// Written under the sync's applier lock, before it is released: every
/// batch after the verify's snapshot finds this verify's rows and marks
/// those it touches, so that a later incremental verify compares them.
async fn plan_live(
    src: &impl Sql,
    record: &mut Conn,
    plan: &Plan,
    tables: &[&TablePlan],
    workers: usize,
    incremental: bool,
) -> Result<(Vec<Part>, Vec<Option<TableReport>>)> {
    let fresh = parts(src, tables, workers).await?;
    let vp = verified_parts(plan);
    let rows = record
        .query(
            &format!(
                "select table_name, predicate, lo, hi, shape, source_rows, target_rows, equal,
                        touched, finished, verified_at > now() - interval '{RESUMABLE_FOR}'
                 from {vp} where sync = $1"
            ),
            &[&plan.sync],
        )
        .await?;
    let recorded: Vec<Recorded> = rows
        .iter()
        .map(|r| Recorded {
            table: r.get(0),
            predicate: r.get(1),
            lo: r.get(2),
            hi: r.get(3),
            shape: r.get(4),
            source_rows: r.get(5),
            target_rows: r.get(6),
            equal: r.get(7),
            touched: r.get(8),
            finished: r.get(9),
            recent: r.get(10),
        })
        .collect();
    let taken = |t: &TablePlan, r: &Recorded, resumed: bool| TableReport {
        table: t.display.clone(),
        source_rows: r.source_rows,
        target_rows: r.target_rows,
        equal: true,
        differing_keys: Vec::new(),
        missing: Vec::new(),
        parts: 1,
        resumed_parts: u32::from(resumed),
        unchanged_parts: u32::from(!resumed),
    };
    let mut by_table: HashMap<&str, Vec<&Recorded>> = HashMap::new();
    for r in &recorded {
        by_table.entry(r.table.as_str()).or_default().push(r);
    }
    let (mut parts, mut earlier) = (Vec::new(), Vec::new());
    // `parts` gives each table's parts together, biggest table first.
    for fresh in fresh.chunk_by(|a, b| a.table == b.table) {
        let i = fresh[0].table;
        let t = tables[i];
        let mut mine = by_table.remove(t.table.as_str()).unwrap_or_default();
        let basis = incremental
            && !mine.is_empty()
            && mine.iter().all(|r| r.finished && r.shape == t.columns);
        if basis {
            mine.sort_by_key(|r| r.lo);
            let estimate = bytes(t) / mine.len() as u64;
            for (n, r) in mine.iter().enumerate() {
                parts.push(Part {
                    table: i,
                    predicate: r.predicate.clone(),
                    lo: r.lo,
                    hi: r.hi,
                    estimate,
                    first: n == 0,
                });
                earlier.push((r.equal && !r.touched).then(|| taken(t, r, false)));
            }
            continue;
        }
        for p in fresh {
            let resumed = mine.iter().find(|r| {
                r.predicate == p.predicate
                    && r.equal
                    && !r.finished
                    && r.recent
                    && r.shape == t.columns
            });
            earlier.push(resumed.map(|r| taken(t, r, true)));
            parts.push(Part { predicate: p.predicate.clone(), ..*p });
        }
    }
    // This verify's rows: those taken stay as they are (a resumed part
    // keeps what batches marked), the others are written anew.
    let names: Vec<&str> = tables.iter().map(|t| t.table.as_str()).collect();
    let (mut kept_t, mut kept_p) = (Vec::new(), Vec::new());
    let (mut new_t, mut new_p, mut new_lo, mut new_hi, mut new_shape) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (p, e) in parts.iter().zip(&earlier) {
        let t = tables[p.table];
        if e.is_some() {
            kept_t.push(t.table.as_str());
            kept_p.push(p.predicate.as_str());
        } else {
            new_t.push(t.table.as_str());
            new_p.push(p.predicate.as_str());
            new_lo.push(p.lo);
            new_hi.push(p.hi);
            new_shape.push(t.columns.as_str());
        }
    }
    let tx = record.transaction().await?;
    tx.execute(
        &format!(
            "delete from {vp} v where v.sync = $1 and v.table_name = any($2)
             and not exists (select 1 from unnest($3::text[], $4::text[]) k(t, p)
                             where k.t = v.table_name and k.p = v.predicate)"
        ),
        &[&plan.sync, &names, &kept_t, &kept_p],
    )
    .await?;
    tx.execute(
        &format!(
            "insert into {vp} (sync, table_name, predicate, source_rows, target_rows, lo, hi,
                               shape, equal)
             select $1, u.t, u.p, 0, 0, u.lo, u.hi, u.shape, false
             from unnest($2::text[], $3::text[], $4::int8[], $5::int8[], $6::text[])
                  u(t, p, lo, hi, shape)"
        ),
        &[&plan.sync, &new_t, &new_p, &new_lo, &new_hi, &new_shape],
    )
    .await?;
    tx.commit().await?;
    Ok((parts, earlier))
}

/// Records a part found equal, for a verify that resumes this one or an
/// incremental one after it.
async fn record_part(
    record: &Conn,
    plan: &Plan,
    t: &TablePlan,
    part: &Part,
    report: &TableReport,
) -> Result<()> {
    let sql = format!(
        "update {} set equal = true, source_rows = $4, target_rows = $5, verified_at = now()
         where sync = $1 and table_name = $2 and predicate = $3",
        verified_parts(plan)
    );
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&plan.sync, &t.table, &part.predicate, &report.source_rows, &report.target_rows];
    record.execute(&sql, &params).await?;
    Ok(())
}

/// Ends a verify's record: its tables' parts are the basis of an
/// incremental verify, but for a table with a part found different
/// (compared whole next time).
async fn finish_record(record: &mut Conn, plan: &Plan, tables: &[&TablePlan]) -> Result<()> {
    let vp = verified_parts(plan);
    let names: Vec<&str> = tables.iter().map(|t| t.table.as_str()).collect();
    let tx = record.transaction().await?;
    tx.execute(
        &format!(
            "delete from {vp} v where v.sync = $1 and v.table_name in (
                 select table_name from {vp} w
                 where w.sync = $1 and w.table_name = any($2) and not w.equal)"
        ),
        &[&plan.sync, &names],
    )
    .await?;
    tx.execute(
        &format!("update {vp} set finished = true where sync = $1 and table_name = any($2)"),
        &[&plan.sync, &names],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

fn verified_parts(plan: &Plan) -> String {
    format!("{}.verified_parts", crate::pg::quote_ident(&plan.schema))
}

/// [`compare`] of `parts` but those `earlier` verifies give, with the
/// tables shared out to `pairs` of connections, each reading in the
/// snapshots given (exported by the caller, who keeps them open until this
/// returns).
#[allow(clippy::too_many_arguments)]
async fn compare_in(
    pairs: Vec<(Conn, Conn)>,
    mut record: Conn,
    src_snapshot: &str,
    tgt_snapshot: &str,
    plan: &Plan,
    tables: &[&TablePlan],
    parts: Vec<Part>,
    mut earlier: Vec<Option<TableReport>>,
    large_objects: bool,
) -> Result<Vec<TableReport>> {
    let items = parts.len() + usize::from(large_objects);
    earlier.resize(items, None);
    let progress = progress_of(&parts);
    let queue = Mutex::new((0..items).filter(|i| earlier[*i].is_none()).collect::<VecDeque<_>>());
    let results: Mutex<Vec<Option<TableReport>>> = Mutex::new(earlier);
    let record_ref = &record;
    let workers = pairs.into_iter().map(|(mut s, mut t)| {
        let (queue, results, parts, progress) = (&queue, &results, &parts, &progress);
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
                            record_part(record_ref, plan, t, part, &report).await?;
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
    finish_record(&mut record, plan, tables).await?;
    let mut results: Vec<TableReport> =
        results.into_inner().unwrap().into_iter().flatten().collect();
    let large_objects = (results.len() > parts.len()).then(|| results.pop()).flatten();
    let mut out = per_table(tables, &parts, results);
    out.extend(large_objects);
    Ok(out)
}
