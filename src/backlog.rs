//! A large backlog, applied as a catch-up: table by table, by several
//! workers, each table in a target transaction of its own.
//!
//! A normal batch is one target transaction for every table (the target is
//! always a snapshot of the source). A backlog of millions of keys — what
//! piles up during a long initial copy, or a nightly job — would then be
//! hours in one transaction, with nothing to show and everything lost to a
//! crash. Past [`CATCH_UP_KEYS`] changed keys, a batch is a catch-up
//! instead:
//!
//! - The coordinator takes one source snapshot S and exports it; workers
//!   import it, so every table is brought to the same S.
//! - Each keyed table is applied in its own target transaction, which also
//!   records `(table, S)` in `<schema>.caught_up`. A table already recorded
//!   there by an interrupted catch-up from the same applied marker starts
//!   from its recorded snapshot, not the marker: a crash loses at most the
//!   tables in flight. Re-applying keys is harmless (state-based).
//! - Keyless tables, whose events must be replayed exactly once, are
//!   applied in the final transaction with the marker, from the marker.
//! - The final transaction records S as applied (the sync's marker moves
//!   only when every table has reached S) and forgets the per-table rows.
//!   After it, batches are one transaction again.
//!
//! While a catch-up runs the target shows tables at different snapshots;
//! it is never a cutover's switch point (the fence drains with a normal
//! batch once caught up, and a catch-up inside the fence ends at one
//! snapshot like any batch). Appliers of the sync are kept out by the
//! session-level form of the advisory lock a batch takes.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use crate::apply::{
    self, BatchStats, LOCK_CLASS, Plan, Purge, apply_table, keyed_changes, pending_counts,
    record_consumer,
};
use crate::error::Result;
use crate::large_objects::{self, Pass};
use crate::pg::{Conn, Env, Sql, quote_ident};
use crate::progress::Progress;
use crate::route::DbConn;

/// Changed keys (over every keyed table of a batch) from which the batch
/// is a catch-up.
pub const CATCH_UP_KEYS: i64 = 200_000;

/// Where and how a catch-up connects its workers.
pub struct Workers<'a> {
    pub source: &'a DbConn,
    pub target: &'a DbConn,
    pub jobs: usize,
    pub env: Env<'a>,
}

/// Applies the pending changes as a catch-up, and returns its statistics.
/// Called when a normal batch found [`CATCH_UP_KEYS`] or more (which it
/// never does for a sync capturing partition TRUNCATEs: they must be
/// applied before their table's changes, in one transaction). The backlog
/// cannot have shrunk since: deltas go only once this target applied them.
pub async fn run(
    src: &mut Conn,
    tgt: &mut Conn,
    plan: &Plan,
    workers: &Workers<'_>,
    lo: Option<Pass>,
    purge: Purge,
) -> Result<BatchStats> {
    tgt.execute(apply::HOLD_LOCK, &[&LOCK_CLASS, &plan.sync_id]).await?;
    let result = locked(src, tgt, plan, workers, lo, purge).await;
    let unlocked = tgt.execute(apply::RELEASE_LOCK, &[&LOCK_CLASS, &plan.sync_id]).await;
    let stats = result?;
    unlocked?;
    Ok(stats)
}

async fn locked(
    src: &mut Conn,
    tgt: &mut Conn,
    plan: &Plan,
    workers: &Workers<'_>,
    lo: Option<Pass>,
    purge: Purge,
) -> Result<BatchStats> {
    let started = Instant::now();
    let s = quote_ident(&plan.schema);
    let prev = apply::applied_snapshot(tgt, plan).await?;
    let from = prev.clone().unwrap_or_default();
    let cond = Plan::pending(prev.as_deref());
    // Where the sync decodes, what the slot holds goes into the deltas
    // first, in a transaction of its own (the workers must see it). A
    // transaction that commits between that pump and the snapshot below
    // is visible there without its keys: the catch-up's marker is then the
    // pump's snapshot, every transaction of which is in the deltas; the
    // rows it brings are as new or newer, and the next batch re-reads the
    // keys of what committed in between.
    let decoded = plan.pump(src).await?;
    let ctx = src.snapshot().await?;
    let (exported, snapshot) = ctx.export_snapshot().await?;
    let marker = decoded.unwrap_or_else(|| snapshot.clone());
    plan.check_shape(&ctx, None).await?;
    apply::set_after(&ctx, prev.as_deref()).await?;
    let named = plan.candidates(&ctx).await?;
    let counts = counts_by_slices(workers, &exported, prev.as_deref(), plan, &named).await?;

    tgt.batch_execute(&format!(
        "create table if not exists {s}.caught_up (
             sync text not null,
             table_name text not null,
             snapshot text not null,
             from_snapshot text not null,
             primary key (sync, table_name))"
    ))
    .await?;
    // Tables an interrupted catch-up from the same marker brought further.
    let done: HashMap<String, String> = tgt
        .query(
            &format!(
                "select table_name, snapshot from {s}.caught_up
                 where sync = $1 and from_snapshot = $2"
            ),
            &[&plan.sync, &from],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Biggest first, so that no big table starts last.
    let mut queue: Vec<(usize, i64, bool)> = (0..plan.tables.len())
        .filter(|&i| !plan.tables[i].keys.is_empty() && (counts[i].0 > 0 || counts[i].1))
        .map(|i| (i, counts[i].0, counts[i].1))
        .collect();
    queue.sort_by_key(|&(_, changes, _)| std::cmp::Reverse(changes));
    tracing::info!(
        sync = plan.sync,
        keys = keyed_changes(plan, &counts),
        tables = queue.len(),
        resumed = done.len(),
        jobs = workers.jobs,
        "catching up table by table"
    );
    // Hours on a big backlog: shown as it goes, in keys.
    let keys: i64 = queue.iter().map(|q| q.1).sum();
    let progress = Progress::counted("catch-up", "keys", queue.len() as u64, keys.max(0) as u64);
    let queue = Mutex::new(VecDeque::from(queue));
    let stats = Mutex::new(BatchStats::default());
    let job = Job {
        plan,
        exported: &exported,
        snapshot: &marker,
        from: &from,
        done: &done,
        progress: &progress,
    };
    let runs = (0..workers.jobs.max(1)).map(|_| job.worker(workers, &queue, &cond, &stats));
    for r in futures_util::future::join_all(runs).await {
        r?;
    }
    progress.phase("tables without a key, and the marker");
    let mut stats = stats.into_inner().unwrap();

    // The marker moves only now that every keyed table has reached the
    // snapshot; keyless tables go from the marker, exactly once, with it.
    let ttx = tgt.transaction().await?;
    // Their events are replayed once: those the marker sees, not the
    // snapshot's (the next batch replays the others).
    let events = match marker == snapshot {
        true => cond.clone(),
        false => format!(
            "{cond} and txid_visible_in_snapshot(_pgleap_txid, {}::txid_snapshot)",
            crate::pg::quote_literal(&marker)
        ),
    };
    for (t, (changes, truncated)) in plan.tables.iter().zip(&counts) {
        if t.keys.is_empty() {
            apply_table(&ctx, &ttx, t, &events, *changes, *truncated, &mut stats).await?;
        }
    }
    if let Some(mode) = lo.filter(|_| plan.large_objects) {
        let pass = large_objects::pass(&ctx, &ttx, &plan.schema, &plan.sync, mode).await?;
        stats.large_objects = Some(pass);
    }
    apply::set_applied_snapshot(&ttx, plan, &marker).await?;
    ttx.execute(&format!("delete from {s}.caught_up where sync = $1"), &[&plan.sync]).await?;
    ttx.commit().await?;
    progress.finish();
    ctx.commit().await?;
    let target_name = tgt.name().to_string();
    // A catch-up touched many tables: when a purge is due, all of them.
    let purge = if matches!(purge, Purge::No) { Purge::No } else { Purge::All };
    record_consumer(src, plan, &target_name, &marker, &purge).await?;
    stats.snapshot = marker;
    stats.millis = started.elapsed().as_millis() as i64;
    tracing::info!(sync = plan.sync, ms = stats.millis, "caught up");
    Ok(stats)
}

/// [`pending_counts`] of the tables `named`, as of the exported snapshot,
/// by slices of tables in transactions of their own that import it: the
/// coordinator's transaction lasts the whole catch-up, and would hold a
/// lock on every delta it had counted.
async fn counts_by_slices(
    workers: &Workers<'_>,
    exported: &str,
    prev: Option<&str>,
    plan: &Plan,
    named: &[usize],
) -> Result<Vec<(i64, bool)>> {
    let mut counts = vec![(0, false); plan.tables.len()];
    let mut src = workers.source.connect(workers.env).await?;
    for slice in named.chunks(src.tables_per_statement()) {
        let tx = src.imported_snapshot(exported).await?;
        apply::set_after(&tx, prev).await?;
        let part = pending_counts(&tx, plan, slice).await?;
        tx.commit().await?;
        for &i in slice {
            counts[i] = part[i];
        }
    }
    Ok(counts)
}

/// What every worker of one catch-up shares.
struct Job<'a> {
    plan: &'a Plan,
    /// The coordinator's exported snapshot, imported by every worker.
    exported: &'a str,
    /// The same as txid_snapshot text: what each table is brought to.
    snapshot: &'a str,
    /// The applied marker the catch-up started from.
    from: &'a str,
    /// Per table, the snapshot an interrupted catch-up brought it to.
    done: &'a HashMap<String, String>,
    progress: &'a Progress,
}

impl Job<'_> {
    async fn worker(
        &self,
        workers: &Workers<'_>,
        queue: &Mutex<VecDeque<(usize, i64, bool)>>,
        cond: &str,
        stats: &Mutex<BatchStats>,
    ) -> Result<()> {
        if queue.lock().unwrap().is_empty() {
            return Ok(());
        }
        let mut src = workers.source.connect(workers.env).await?;
        let mut tgt = workers.target.connect(workers.env).await?;
        // As the session that prepared the target: the fence lets pgleap's
        // appliers through; triggers and foreign keys do not fire (where
        // the role may not say so, they were set aside).
        tgt.batch_execute("set pgleap.applying = on").await?;
        let _ = tgt.batch_execute("set session_replication_role = replica").await;
        let s = quote_ident(&self.plan.schema);
        loop {
            // The guard must go before the await: other workers take it.
            let Some((i, mut changes, mut truncated)) = queue.lock().unwrap().pop_front() else {
                break;
            };
            let t = &self.plan.tables[i];
            // A source transaction per table, importing the one snapshot:
            // one for all a worker's tables would hold locks on them all.
            let stx = src.imported_snapshot(self.exported).await?;
            let resumed = self.done.get(&t.table).map(|c| Plan::pending(Some(c)));
            if let Some(done) = self.done.get(&t.table) {
                apply::set_after(&stx, Some(done)).await?;
                (changes, truncated) = pending_counts(&stx, self.plan, &[i]).await?[i];
            }
            let cond = resumed.as_deref().unwrap_or(cond);
            let unit = self.progress.start_unit(&t.display, changes.max(0) as u64);
            let ttx = tgt.transaction().await?;
            let mut table_stats = BatchStats::default();
            apply_table(&stx, &ttx, t, cond, changes, truncated, &mut table_stats).await?;
            ttx.execute(
                &format!(
                    "insert into {s}.caught_up (sync, table_name, snapshot, from_snapshot)
                     values ($1, $2, $3, $4)
                     on conflict (sync, table_name)
                     do update set snapshot = excluded.snapshot,
                                   from_snapshot = excluded.from_snapshot"
                ),
                &[&self.plan.sync, &t.table, &self.snapshot, &self.from],
            )
            .await?;
            ttx.commit().await?;
            stx.commit().await?;
            self.progress.advance(&unit, changes.max(0) as u64);
            self.progress.finish_unit(unit, table_stats.inserts + table_stats.deletes);
            let mut st = stats.lock().unwrap();
            st.inserts += table_stats.inserts;
            st.deletes += table_stats.deletes;
            st.truncates += table_stats.truncates;
        }
        Ok(())
    }
}
