//! The applying session: one sync applied to one target, over two
//! connections that stay open, with the plan read and the target prepared
//! once. The daemon's workers, `kick`, verify, cutover and upgrade all apply
//! through it.
//!
//! Opening a session does not copy anything; [`Session::ensure_initial_copy`]
//! is the explicit step that runs the sync's initial copy the first time.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use crate::apply::{self, BatchStats, Plan, Purge};
use crate::backlog;
use crate::capture;
use crate::catalog::{Catalog, OneTimeCopy, RelGroup, RoundOutcome, Sync};
use crate::copy;
use crate::decoding;
use crate::error::{Error, Result};
use crate::evolve;
use crate::large_objects::Pass;
use crate::pg::{Conn, Env, Sql};
use crate::route::{DbConn, SyncRoute};
use crate::sequences;
use crate::target;

/// How long a failed attempt waits before the next, while catching up.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How often a session purges the deltas every target has applied: those
/// that changed since (see [`Purge`]), and every delta at the longer
/// interval.
const PURGE_EVERY: Duration = Duration::from_secs(1);
const PURGE_ALL_EVERY: Duration = Duration::from_secs(60);

/// A connected applier of one sync to one target.
pub struct Session {
    pub src: Conn,
    pub tgt: Conn,
    pub plan: Plan,
    /// The snapshot of the last batch applied, once known.
    pub prev: Option<String>,
    pub replica_role: bool,
    sync: Sync,
    relgroup: RelGroup,
    source: DbConn,
    target: DbConn,
    /// The sync's other targets, whose sessions apply beside this one.
    other_targets: Vec<DbConn>,
    /// Set when a failure may have left a connection unusable.
    broken: bool,
    /// When the last large-object pass ran, and where the next one goes on
    /// digesting.
    last_lo_pass: Option<Instant>,
    lo_cursor: u32,
    /// When this session last purged applied deltas on the source, and
    /// last purged every delta; the tables changed since the last purge.
    last_purge: Option<Instant>,
    last_full_purge: Option<Instant>,
    to_purge: BTreeSet<usize>,
    /// Workers of a catch-up (and of the initial copy).
    jobs: usize,
    /// The source's snapshot before the last probe that found nothing new
    /// (see [`Session::has_changes`]).
    idle_at: Option<String>,
}

impl Session {
    /// Connects to the sync's source and `target`, reads the installed
    /// capture and prepares the target.
    pub async fn connect(route: &SyncRoute, target: &DbConn, env: Env<'_>) -> Result<Session> {
        Session::connect_with(route, target, Columns::Recorded, env).await
    }

    async fn connect_with(
        route: &SyncRoute,
        target: &DbConn,
        before: Columns,
        env: Env<'_>,
    ) -> Result<Session> {
        route.check_active()?;
        let src = route.source.connect(env).await?;
        let mut tgt = target.connect(env).await?;
        let mut plan = Plan::load(&src, &route.sync, &route.relgroup).await?;
        let (replica_role, prev) = ready_target(&src, &mut tgt, &plan, before).await?;
        plan.note_copies(&tgt).await?;
        Ok(Session {
            src,
            tgt,
            plan,
            prev,
            replica_role,
            sync: route.sync.clone(),
            relgroup: route.relgroup.clone(),
            source: route.source.clone(),
            target: target.clone(),
            other_targets: route
                .targets
                .iter()
                .filter(|t| t.name != target.name)
                .cloned()
                .collect(),
            broken: false,
            last_lo_pass: None,
            lo_cursor: 0,
            last_purge: None,
            last_full_purge: None,
            to_purge: BTreeSet::new(),
            idle_at: None,
            jobs: default_jobs(),
        })
    }

    /// [`Session::connect`], then the initial copy if it is due.
    pub async fn open(
        route: &SyncRoute,
        target: &DbConn,
        jobs: usize,
        env: Env<'_>,
    ) -> Result<Session> {
        let mut session = Session::connect(route, target, env).await?;
        session.jobs = jobs;
        session.ensure_initial_copy(jobs, env).await?;
        Ok(session)
    }

    /// Reads the sync's slot, if it decodes, through a replication
    /// connection kept open from one pump to the next (see
    /// [`crate::decoding::Feed`]): for the daemon, whose session pumps at
    /// every poll for as long as it runs.
    pub async fn stream(&mut self) -> Result<()> {
        self.plan.stream(&self.src).await
    }

    /// [`Session::open`], retried like a batch by [`Session::catch_up`]
    /// (failures recorded, until the deadline) — for the callers that wait.
    pub async fn open_retrying(
        catalog: &mut Catalog,
        route: &SyncRoute,
        target: &DbConn,
        jobs: usize,
        deadline: Option<Instant>,
        env: Env<'_>,
    ) -> Result<Session> {
        Session::retrying(catalog, route, target, Some(jobs), deadline, env).await
    }

    /// [`Session::connect`], retried like [`Session::open_retrying`]: the
    /// initial copy is left to whoever runs it (`initial_copy_done` says).
    pub async fn connect_retrying(
        catalog: &mut Catalog,
        route: &SyncRoute,
        target: &DbConn,
        deadline: Option<Instant>,
        env: Env<'_>,
    ) -> Result<Session> {
        Session::retrying(catalog, route, target, None, deadline, env).await
    }

    /// Opens (copying with `copy` workers) or only connects, retrying.
    async fn retrying(
        catalog: &mut Catalog,
        route: &SyncRoute,
        target: &DbConn,
        copy: Option<usize>,
        deadline: Option<Instant>,
        env: Env<'_>,
    ) -> Result<Session> {
        loop {
            let started = Instant::now();
            let attempt = match copy {
                Some(jobs) => Session::open(route, target, jobs, env).await,
                None => Session::connect(route, target, env).await,
            };
            match attempt {
                Ok(session) => return Ok(session),
                Err(e) => {
                    let millis = started.elapsed().as_millis() as i64;
                    record(catalog, route.name(), &target.name, Err(&e), millis);
                    retry_or_fail(e, deadline, route.name(), &target.name).await?;
                }
            }
        }
    }

    /// The workers a catch-up or a verify may use.
    pub fn jobs(&self) -> usize {
        self.jobs
    }

    /// A fresh pair of connections to the source and the target, for a
    /// worker beside the session's own.
    pub async fn connect_pair(&self, env: Env<'_>) -> Result<(Conn, Conn)> {
        Ok((self.source.connect(env).await?, self.connect_target(env).await?))
    }

    /// One more connection to the target, for bookkeeping beside the
    /// session's own.
    pub async fn connect_target(&self, env: Env<'_>) -> Result<Conn> {
        self.target.connect(env).await
    }

    pub fn sync_name(&self) -> &str {
        &self.sync.name
    }

    pub fn target_name(&self) -> &str {
        self.tgt.name()
    }

    /// Runs the initial copy the sync asks for with `jobs` workers, unless
    /// the target has applied something already.
    /// Whether the initial copy is done (or the sync has none): until it
    /// is, the first batch is the copy.
    pub fn initial_copy_done(&self) -> bool {
        !self.copy_due()
    }

    /// Whether a copy must run before any batch: the sync's first (unless
    /// `onetimecopy` is never), or one a lost slot asked for.
    fn copy_due(&self) -> bool {
        match self.prev.as_deref() {
            None => self.sync.onetimecopy != OneTimeCopy::Never,
            Some(prev) => prev == apply::RECOPY,
        }
    }

    pub async fn ensure_initial_copy(&mut self, jobs: usize, env: Env<'_>) -> Result<()> {
        if !self.copy_due() {
            return Ok(());
        }
        // One initial copy per sync at a time (the daemon and a kick may
        // both get here); the loser finds the copy done when it gets the
        // lock. A session lock: released at unlock or disconnect.
        let lock = (apply::COPY_LOCK_CLASS, self.plan.sync_id);
        self.tgt.execute(apply::HOLD_LOCK, &[&lock.0, &lock.1]).await?;
        self.prev = apply::applied_snapshot(&self.tgt, &self.plan).await?;
        if self.copy_due() {
            // A copy again after a lost slot empties and copies every table.
            let mode = match self.prev {
                Some(_) => OneTimeCopy::Always,
                None => self.sync.onetimecopy,
            };
            let (handoff, _) =
                copy::initial_copy(&self.source, &self.target, &self.plan, mode, jobs, env).await?;
            let start = handoff.unwrap_or_else(|| apply::FROM_THE_START.to_string());
            apply::set_applied_snapshot(&self.tgt, &self.plan, &start).await?;
            if self.replica_role {
                // Triggers and foreign keys cannot fire under replica role,
                // so they need not wait for cutover. Foreign keys stay NOT
                // VALID until cutover: parts copied under different
                // snapshots (a resumed copy) may disagree until the changes
                // between are applied.
                let missing = target::missing(&self.src, &self.tgt, &self.plan).await?;
                target::create_missing(&self.tgt, &missing).await?;
            }
            self.prev = Some(start);
        }
        // Whoever copied (this session, or another that held the lock
        // meanwhile), the keyless tables' copy snapshots are known now; read
        // before the copy, they could be missing, and the first batches
        // would replay rows the copy already holds.
        self.plan.note_copies(&self.tgt).await?;
        self.tgt.execute(apply::RELEASE_LOCK, &[&lock.0, &lock.1]).await?;
        Ok(())
    }

    /// After the sync's slot was lost (`lost`): its tables are captured by
    /// triggers from now on, and copied again, since the changes made
    /// since its last batch cannot be read from anywhere. Loud (a warning
    /// naming the slot in the log; status shows no slot from then on),
    /// and in an order a kill cannot break: triggers first, then the
    /// target marked to be copied again (no batch applies until it is),
    /// then the slot and publication dropped; until the last step, every
    /// pump finds the slot lost and this runs again (each step does what
    /// is left). The copy then runs here, as a first copy would.
    async fn fall_back(&mut self, lost: Error, env: Env<'_>) -> Result<()> {
        let (schema, sync_id) = (self.plan.schema.clone(), self.plan.sync_id);
        tracing::warn!(
            sync = self.sync.name,
            target = self.target.name,
            "{lost}; capturing its tables by triggers from now on and copying them again"
        );
        // The failed batch's pump lock is released already (`apply_once`).
        let tables = capture::fall_back_to_triggers(&mut self.src, &schema, sync_id).await?;
        crate::failpoint::hit("fall-back-triggers");
        // Every target: the sessions of the others would otherwise go on
        // without the slot, and without the changes it lost.
        apply::mark_recopy(&mut self.tgt, &self.plan).await?;
        for other in &self.other_targets {
            apply::mark_recopy(&mut other.connect(env).await?, &self.plan).await?;
        }
        crate::failpoint::hit("fall-back-marked");
        decoding::stop(&self.src, &schema, sync_id).await?;
        tracing::warn!(sync = self.sync.name, tables, "capture by triggers installed; copying");
        self.plan = Plan::load(&self.src, &self.sync, &self.relgroup).await?;
        self.prev = Some(apply::RECOPY.to_string());
        self.ensure_initial_copy(self.jobs, env).await
    }

    /// Applies one batch; every `lo_interval` seconds it also runs an
    /// incremental large-object pass.
    pub async fn batch(&mut self, env: Env<'_>) -> Result<BatchStats> {
        let lo = self.large_objects_due().then_some(Pass::After(self.lo_cursor));
        self.batch_with(lo, env).await
    }

    /// Applies one batch with a full large-object pass: every object
    /// brought exactly to the batch's snapshot (cutover's last pass).
    pub async fn batch_with_all_large_objects(&mut self, env: Env<'_>) -> Result<BatchStats> {
        self.batch_with(Some(Pass::Full), env).await
    }

    /// One batch, or a catch-up when the backlog is large (see `backlog`).
    async fn apply_once(
        &mut self,
        lo: Option<Pass>,
        purge: Purge,
        env: Env<'_>,
    ) -> Result<BatchStats> {
        let (src, tgt, plan) = (&mut self.src, &mut self.tgt, &self.plan);
        let result = async {
            let catch_up = Some(backlog::CATCH_UP_KEYS);
            if let Some(stats) =
                apply::apply_batch(src, tgt, plan, lo, purge.clone(), catch_up).await?
            {
                return Ok(stats);
            }
            let workers = backlog::Workers {
                source: &self.source,
                target: &self.target,
                jobs: self.jobs,
                env,
            };
            backlog::run(src, tgt, plan, &workers, lo, purge).await
        }
        .await;
        // A failed pump leaves its lock with the connection; this session
        // may go on with it (after following a schema change, say), and
        // every other process's pump would wait for it until it ends.
        if result.is_err() && self.plan.decoding.is_some() {
            let _ = decoding::release(&self.src, self.plan.sync_id).await;
        }
        result
    }

    async fn batch_with(&mut self, lo: Option<Pass>, env: Env<'_>) -> Result<BatchStats> {
        // Purging deletes on the source: once a second is enough to keep
        // the deltas small, and spares a busy source a delete per batch.
        let due = |last: Option<Instant>, every| last.is_none_or(|t| t.elapsed() >= every);
        let purge = if !due(self.last_purge, PURGE_EVERY) {
            Purge::No
        } else if due(self.last_full_purge, PURGE_ALL_EVERY) {
            Purge::All
        } else {
            Purge::Changed(self.to_purge.clone())
        };
        let stats = match self.apply_once(lo, purge.clone(), env).await {
            Err(lost @ Error::SlotLost { .. }) => {
                self.fall_back(lost, env).await?;
                self.apply_once(lo, purge.clone(), env).await?
            }
            // The next pump goes by slices of tables (see `Plan::pump_by_slices`).
            Err(Error::PumpTooWide { .. }) => self.apply_once(lo, purge.clone(), env).await?,
            Err(Error::SchemaChanged { .. }) => {
                // Columns changed on the source: followed when they can be
                // (the target gets them and the plan is read again), else
                // the refusal pauses the sync.
                let before = evolve::columns(&self.plan);
                evolve::follow(&self.src, &mut self.tgt, &self.plan, &before).await?;
                let streams = self.plan.streams();
                self.plan = Plan::load(&self.src, &self.sync, &self.relgroup).await?;
                if streams {
                    self.plan.stream(&self.src).await?;
                }
                self.plan.note_copies(&self.tgt).await?;
                self.plan.check_target(&self.tgt).await?;
                evolve::record(&self.tgt, &self.plan).await?;
                self.apply_once(lo, purge.clone(), env).await?
            }
            Err(e)
                if e.sqlstate() == Some(&SqlState::CHECK_VIOLATION)
                    && e.to_string().contains("no partition") =>
            {
                // A row for a partition the source got since.
                if evolve::create_partitions(&mut self.src, &mut self.tgt, &self.plan)
                    .await?
                    .is_empty()
                {
                    return Err(e);
                }
                self.apply_once(lo, purge.clone(), env).await?
            }
            other => other?,
        };
        sequences::carry_forward(&self.src, &self.tgt, &self.plan.sequences).await?;
        match purge {
            Purge::No => self.to_purge.extend(&stats.changed),
            Purge::Changed(_) => {
                self.last_purge = Some(Instant::now());
                self.to_purge.clear();
            }
            Purge::All => {
                self.last_purge = Some(Instant::now());
                self.last_full_purge = self.last_purge;
                self.to_purge.clear();
            }
        }
        self.prev = Some(stats.snapshot.clone());
        self.idle_at = None;
        if let Some(pass) = &stats.large_objects {
            self.last_lo_pass = Some(Instant::now());
            self.lo_cursor = pass.cursor;
        }
        Ok(stats)
    }

    /// Whether a large-object pass is due: large objects change without a
    /// trace in the deltas, so they are looked at on a clock.
    pub fn large_objects_due(&self) -> bool {
        let interval = Duration::from_secs(self.sync.lo_interval.into());
        self.plan.large_objects && self.last_lo_pass.is_none_or(|t| t.elapsed() >= interval)
    }

    /// Whether the source has deltas this target has not applied. Probing
    /// every delta costs the source in proportion to the tables (120 ms at
    /// 10,000), so an idle source is not probed again until its snapshot
    /// moved: while no transaction has ended since a probe that found
    /// nothing (same xmin, xmax and running transactions), nothing can
    /// have become visible.
    pub async fn has_changes(&mut self) -> Result<bool> {
        let now = apply::set_after(&self.src, self.prev.as_deref()).await?;
        if self.idle_at.as_deref() == Some(now.as_str()) {
            return Ok(false);
        }
        // Where the sync decodes, what committed since is in the slot, not
        // yet in the deltas (nothing committed since the last poll: the
        // slot has nothing new either).
        match self.plan.pump(&mut self.src).await {
            // The batch falls back (see `Session::fall_back`).
            Err(Error::SlotLost { .. }) => return Ok(true),
            other => other?,
        };
        let changed = self.plan.has_changes(&self.src).await?;
        self.idle_at = if changed { None } else { Some(now) };
        Ok(changed)
    }

    /// The source's current snapshot: what "everything committed so far" is.
    pub async fn source_snapshot(&self) -> Result<String> {
        Ok(self.src.query_one("select txid_current_snapshot()::text", &[]).await?.get(0))
    }

    /// Changes waiting on the source for this target, and the age in
    /// seconds of the oldest.
    pub async fn pending(&self) -> Result<(i64, f64)> {
        apply::pending(&self.src, &self.plan, self.tgt.name()).await
    }

    /// Applies batches until the target has every transaction visible in the
    /// source snapshot `until`. A failure is recorded and, with a deadline,
    /// retried (on new connections) until the deadline passes.
    pub async fn catch_up(
        &mut self,
        catalog: &mut Catalog,
        until: &str,
        deadline: Option<Instant>,
        env: Env<'_>,
    ) -> Result<BatchStats> {
        loop {
            let started = Instant::now();
            let attempt = self.batch_covering(until, env).await;
            let millis = started.elapsed().as_millis() as i64;
            record(catalog, &self.sync.name, &self.target.name, attempt.as_ref(), millis);
            let e = match attempt {
                Ok(stats) => return Ok(stats),
                Err(e) => e,
            };
            self.broken = true;
            retry_or_fail(e, deadline, &self.sync.name, &self.target.name).await?;
        }
    }

    async fn batch_covering(&mut self, until: &str, env: Env<'_>) -> Result<BatchStats> {
        if self.broken {
            self.reconnect(env).await?;
        }
        loop {
            // A batch's snapshot is taken after `until`, so it covers it;
            // the check keeps that true whatever the caller passed.
            let stats = self.batch(env).await?;
            if apply::covers(&self.src, &stats.snapshot, until).await? {
                return Ok(stats);
            }
        }
    }

    /// Replaces both connections after a failure.
    async fn reconnect(&mut self, env: Env<'_>) -> Result<()> {
        let src = self.source.connect(env).await?;
        let mut tgt = self.target.connect(env).await?;
        (self.replica_role, self.prev) =
            ready_target(&src, &mut tgt, &self.plan, Columns::Recorded).await?;
        self.src = src;
        self.tgt = tgt;
        self.broken = false;
        Ok(())
    }
}

/// What the columns of a sync's tables are compared with on connect.
#[derive(Clone, Copy, PartialEq)]
enum Columns {
    /// Those recorded on the target at the last connect: a change made
    /// while nobody watched is followed or refused as if seen live.
    Recorded,
    /// The target's as they are now (`sync resume`: someone changed it).
    Target,
}

/// Prepares a freshly connected target for `plan` (bookkeeping; triggers
/// and foreign keys that must not fire), follows the column changes of the
/// source since `before` (or refuses them), refuses a target that still
/// lacks some of the source's columns, records the columns now applied,
/// and reads where apply goes on from: (replica role, last applied
/// snapshot).
async fn ready_target(
    src: &Conn,
    tgt: &mut Conn,
    plan: &Plan,
    before: Columns,
) -> Result<(bool, Option<String>)> {
    let replica_role = target::prepare(src, tgt, plan).await?;
    let recorded = evolve::recorded(tgt, plan).await?;
    let now = evolve::columns(plan);
    let mut target_matches = plan.check_target(tgt).await.is_ok();
    if before == Columns::Recorded {
        let changed = recorded.iter().any(|(t, names)| now.get(t) != Some(names));
        if changed || !target_matches {
            evolve::follow(src, tgt, plan, &recorded).await?;
            target_matches = false;
        }
    }
    if !target_matches {
        // The refusal, or the check after following a change.
        plan.check_target(tgt).await?;
    }
    if before == Columns::Target {
        let extra = evolve::extra_columns(src, tgt, plan).await?;
        if !extra.is_empty() {
            return Err(Error::invalid(
                format!(
                    "sync \"{}\" stays paused: target \"{}\" has columns the source no longer \
                     has: {}",
                    plan.sync,
                    tgt.name(),
                    extra.join(", ")
                ),
                "drop (or rename) them on the target as on the source, then resume again",
            ));
        }
    }
    if recorded != now {
        evolve::record(tgt, plan).await?;
    }
    Ok((replica_role, apply::applied_snapshot(tgt, plan).await?))
}

/// After a failed attempt: waits and returns Ok (try again) while the
/// deadline allows and the error may go away; otherwise returns the error
/// to report (a permanent one at once, with its own hint).
async fn retry_or_fail(
    e: Error,
    deadline: Option<Instant>,
    sync: &str,
    target: &str,
) -> Result<()> {
    if !e.is_transient() {
        return Err(e);
    }
    match deadline {
        Some(d) if Instant::now() < d => {
            tracing::info!(sync, target, "kick: {e}; retrying");
            tokio::time::sleep(RETRY_PAUSE).await;
            Ok(())
        }
        Some(_) => Err(Error::KickTimeout {
            sync: sync.into(),
            target: target.into(),
            last: e.to_string(),
        }),
        None => Err(e),
    }
}

/// Records how a round ended, for `status`.
pub fn record(
    catalog: &mut Catalog,
    sync: &str,
    target: &str,
    result: std::result::Result<&BatchStats, &Error>,
    millis: i64,
) {
    let outcome = match result {
        Ok(s) => RoundOutcome::Good {
            millis: s.millis,
            inserts: s.inserts as i64,
            deletes: s.deletes as i64,
        },
        Err(e) => RoundOutcome::Bad {
            millis,
            error: &e.to_string(),
            sqlstate: e.sqlstate().map(|c| c.code()),
        },
    };
    // Status is informative; a busy catalog must not stop replication.
    if let Err(e) = catalog.record_round(sync, target, outcome) {
        tracing::warn!(sync, target, "cannot record the round: {e}");
    }
    // A schema change pgleap cannot follow stops the sync until someone
    // says the target matches again (`sync resume`): retrying would not
    // help, and a later plan read from the changed source could look fine
    // while the target holds a column the source dropped.
    if let Err(e @ Error::SchemaChanged { .. }) = result {
        tracing::error!(sync, target, "paused: {e}");
        if let Err(e) = catalog.set_paused(sync, Some(&e.to_string())) {
            tracing::error!(sync, "cannot record the pause: {e}");
        }
    }
}

/// Runs batches for every target of `sync` now, in this process (safe next
/// to a running daemon: appliers of one sync are serialised on the target).
/// With `wait`, retries until each target has every transaction committed
/// on the source before the call, or the time is up.
pub async fn kick(
    catalog: &mut Catalog,
    sync: &str,
    wait: Option<Duration>,
    jobs: usize,
    env: Env<'_>,
) -> Result<Vec<(String, BatchStats)>> {
    let route = SyncRoute::load(catalog, sync)?;
    let Some(wait) = wait else {
        return kick_until(catalog, &route, None, jobs, env).await;
    };
    // The wait bounds the whole kick, whatever the servers do: a batch
    // blocked on a lock or a server that stopped answering is abandoned
    // (its transaction rolls back; applying again is harmless).
    let deadline = Instant::now() + wait;
    match tokio::time::timeout(wait, kick_until(catalog, &route, Some(deadline), jobs, env)).await {
        Ok(result) => result,
        Err(_) => Err(Error::KickTimeout {
            sync: sync.into(),
            target: route.targets.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", "),
            last: format!(
                "no answer within {} s: a server stopped answering or a lock holds the batch",
                wait.as_secs()
            ),
        }),
    }
}

async fn kick_until(
    catalog: &mut Catalog,
    route: &SyncRoute,
    deadline: Option<Instant>,
    jobs: usize,
    env: Env<'_>,
) -> Result<Vec<(String, BatchStats)>> {
    // Everything committed before this snapshot must reach the targets.
    let until: String = route
        .source
        .connect(env)
        .await?
        .query_one("select txid_current_snapshot()::text", &[])
        .await?
        .get(0);
    let mut results = Vec::new();
    for target in &route.targets {
        let mut session =
            Session::open_retrying(catalog, route, target, jobs, deadline, env).await?;
        let stats = session.catch_up(catalog, &until, deadline, env).await?;
        results.push((target.name.clone(), stats));
    }
    Ok(results)
}

/// Lets a sync paused by a schema change go on, once every target's
/// tables have the source's columns again (and no column the source no
/// longer has). Returns why it was paused.
pub async fn resume(catalog: &mut Catalog, sync: &str, env: Env<'_>) -> Result<String> {
    let mut route = SyncRoute::load(catalog, sync)?;
    let Some(reason) = route.sync.paused.take() else {
        return Err(Error::invalid(
            format!("sync \"{sync}\" is not paused"),
            format!("pgleap status {sync} shows what it does"),
        ));
    };
    for target in &route.targets {
        Session::connect_with(&route, target, Columns::Target, env).await?;
    }
    catalog.set_paused(sync, None)?;
    Ok(reason)
}

/// Parallel copy workers unless told otherwise: one per core.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
