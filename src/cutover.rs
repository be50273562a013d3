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
//! 6. This is the switch point: the fence time is measured here, recorded,
//!    and printed. Foreign keys are validated after it, while the
//!    application already runs on the target.
//!
//! Nothing inside the fence grows with the data. Every table's rows are
//! counted before it, on both servers at one point (in one batch's two
//! transactions, while the application still writes; `upgrade`, which has
//! just compared every row the same way, skips this); inside it, each key
//! the drain applies has its row compared with the source's. The counts
//! catch rows the target gained or lost outside the sync; the drained keys
//! catch a target that changes rows as pgleap writes them.
//!
//! Any failure before the switch point removes the fence (and the read-only
//! default) again, so the source keeps taking writes and the sync runs on.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::apply::{self, Plan};
use crate::capture;
use crate::catalog::{Catalog, ObjectKind, OneTimeCopy, SwitchPoint};
use crate::error::{Error, Result};
use crate::fidelity::{self, Difference, Stage};
use crate::inventory::Selection;
use crate::objects::{self, SyncSpec};
use crate::pg::{Conn, Env, NamedQuery, Sql, qualified, quote_ident, quote_literal};
use crate::route::{DbConn, SyncRoute};
use crate::sequences;
use crate::session::Session;
use crate::switch::{Switch, SwitchPlan};
use crate::target::{self, Unvalidated};

/// How long the catch-up before the fence may take.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(3600);
/// How long one round of applying may retry failures.
const ROUND_LIMIT: Duration = Duration::from_secs(600);

#[derive(Clone)]
pub struct CutoverOptions {
    pub max_lag: Duration,
    pub terminate: bool,
    pub sequence_margin: i64,
    pub dry_run: bool,
    /// Arm a sync back to the old server under this name, before the new
    /// one can take writes.
    pub rollback_sync: Option<String>,
    /// How the application moves: poolers and/or a command.
    pub switch: SwitchPlan,
    /// For a rollback: the fence the cutover left on the old server (the
    /// target now), lifted at the switch point.
    pub lift_fence: Option<Plan>,
    /// Switch even with schema objects missing on the target.
    pub allow_schema_differences: bool,
    /// The caller has just compared every row at one point (`upgrade`'s
    /// verify): the cutover does not count them again before its fence.
    pub rows_compared: bool,
    /// Of a sync with several targets, the one the application moves to.
    /// The others are brought to the same final state inside the fence.
    pub to: Option<String>,
    /// A sync under this name keeps the other targets following the new
    /// server, armed inside the fence (else they stay as they were at the
    /// switch point).
    pub keep_others: Option<String>,
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
    /// The last large-object pass, inside the fence (its time counts in
    /// `fence_ms`), when the sync carries large objects.
    pub large_objects_ms: Option<i64>,
    /// The sync back to the old server, when armed.
    pub rollback_sync: Option<String>,
    /// The sync's other targets, brought to the same final state.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<String>,
    /// The sync keeping them following the new server, when armed.
    pub keep_sync: Option<String>,
    /// How long the poolers held the clients' queries (from PAUSE to
    /// RESUME), when the switch went through poolers.
    pub paused_ms: Option<i64>,
    /// A dry run's schema objects the cutover would create on the target.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub would_create: Vec<String>,
    /// Where the time went before the fence (the application still
    /// writing) and inside it (the write downtime), step by step: what a
    /// rehearsal tells of a production cutover.
    pub before_fence: Vec<StepTime>,
    pub inside_fence: Vec<StepTime>,
}

/// One step of a cutover and its time.
#[derive(Debug, Clone, Serialize)]
pub struct StepTime {
    pub step: &'static str,
    pub ms: i64,
}

/// Times consecutive steps (a cutover's, an upgrade's).
pub(crate) struct Timer {
    at: Instant,
    pub(crate) steps: Vec<StepTime>,
}

impl Timer {
    pub(crate) fn new() -> Timer {
        Timer { at: Instant::now(), steps: Vec::new() }
    }

    /// Ends a step started when the previous one ended.
    pub(crate) fn lap(&mut self, step: &'static str) {
        self.steps.push(StepTime { step, ms: self.at.elapsed().as_millis() as i64 });
        self.at = Instant::now();
    }

    /// Records a step timed apart (the shortest of several rehearsals);
    /// the next step starts now.
    pub(crate) fn record(&mut self, step: &'static str, took: Duration) {
        self.steps.push(StepTime { step, ms: took.as_millis() as i64 });
        self.at = Instant::now();
    }
}

/// Set while a cutover is between its fence and the switch point (or the
/// undo): an interrupt waits for it rather than leave the source fenced.
static INSIDE_FENCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn inside_fence() -> bool {
    INSIDE_FENCE.load(std::sync::atomic::Ordering::SeqCst)
}

/// Marks the fence's span, however it ends.
struct FenceSpan;

impl FenceSpan {
    fn enter() -> FenceSpan {
        INSIDE_FENCE.store(true, std::sync::atomic::Ordering::SeqCst);
        FenceSpan
    }
}

impl Drop for FenceSpan {
    fn drop(&mut self) {
        INSIDE_FENCE.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Cuts a sync over to its one target.
pub async fn cutover(
    catalog: &mut Catalog,
    sync_name: &str,
    opts: &CutoverOptions,
    env: Env<'_>,
) -> Result<CutoverReport> {
    let route = SyncRoute::load(catalog, sync_name)?;
    let target = chosen(&route, opts.to.as_deref())?;
    if opts.keep_others.is_some() && route.targets.len() < 2 {
        return Err(Error::invalid(
            format!("sync \"{sync_name}\" has no other target for --keep-others to keep"),
            "leave --keep-others out",
        ));
    }
    let deadline = Some(Instant::now() + ROUND_LIMIT);
    // A cutover that died half-way is finished (past its switch point) or
    // undone (inside its fence) before anything else.
    if !opts.dry_run
        && let Some(report) = resume_unfinished(catalog, &route, target, &opts.switch, env).await?
    {
        return Ok(report);
    }
    // A cut-over sync is refused by the session at once (a permanent
    // error), before anything is touched.
    let mut session = Session::connect_retrying(catalog, &route, target, deadline, env).await?;
    let mut others = Vec::new();
    for other in route.targets.iter().filter(|t| t.name != target.name) {
        others.push(Session::connect_retrying(catalog, &route, other, deadline, env).await?);
    }
    // The initial copy takes minutes to hours: it is the daemon's (or a
    // kick's), never run inline by a command the operator expects to take
    // seconds.
    for session in std::iter::once(&session).chain(&others) {
        check_copied(catalog, sync_name, session).await?;
    }
    cutover_with(catalog, &route, &mut session, &mut others, opts, env).await
}

/// The target a cutover switches to: the one `--to` names, or the sync's
/// only one.
fn chosen<'r>(route: &'r SyncRoute, to: Option<&str>) -> Result<&'r DbConn> {
    match to {
        Some(name) => route.target(name),
        None if route.targets.len() > 1 => Err(Error::invalid(
            format!(
                "sync \"{}\" has {} targets: which one does the application move to?",
                route.name(),
                route.targets.len()
            ),
            "name it with --to NAME: the others are brought to the same final state inside the \
             fence, and --keep-others SYNC keeps them following the new server",
        )),
        None => route.sole_target(),
    }
}

/// Refuses a cutover while a target's initial copy is not done.
async fn check_copied(catalog: &Catalog, sync_name: &str, session: &Session) -> Result<()> {
    if !session.initial_copy_done() {
        let running = crate::daemon::running_pid(catalog.path()).is_some();
        let schema = &session.plan.schema;
        let share = crate::status::copy_share(&session.tgt, schema, sync_name).await?;
        return Err(Error::invalid(
            format!(
                "sync \"{sync_name}\" has not finished its initial copy to \"{}\" ({share}): \
                 nothing to cut over yet",
                session.target_name()
            ),
            if running {
                format!(
                    "the daemon is copying; pgleap ready {sync_name} says when a cutover can start"
                )
            } else {
                format!(
                    "start the daemon (pgleap start), which copies and then follows the source; \
                     pgleap ready {sync_name} says when a cutover can start"
                )
            },
        ));
    }
    Ok(())
}

/// Cuts over through a session already open to the target switched to
/// (and one to each other target): no connection is opened between the
/// fence and the switch point, unless a failure forces a session to
/// reconnect.
pub async fn cutover_with(
    catalog: &mut Catalog,
    route: &SyncRoute,
    session: &mut Session,
    others: &mut [Session],
    opts: &CutoverOptions,
    env: Env<'_>,
) -> Result<CutoverReport> {
    let target = session.target_name().to_string();
    let mut before = Timer::new();
    for s in std::iter::once(&mut *session).chain(others.iter_mut()) {
        catch_up(catalog, s, opts.max_lag, env).await?;
    }
    before.lap("catch-up");
    let (at_switch, would_create) =
        settle_schema(session, opts.allow_schema_differences, opts.dry_run).await?;
    let mut others_at_switch = Vec::new();
    for other in others.iter() {
        let (left, _) = settle_schema(other, opts.allow_schema_differences, opts.dry_run).await?;
        others_at_switch.push(left);
    }
    before.lap("schema");
    if !opts.rows_compared {
        for s in std::iter::once(&mut *session).chain(others.iter_mut()) {
            counts_at_one_point(s).await?;
        }
        before.lap("row counts at one point");
        // Counting a large database takes a while: the lag it left is
        // applied before the fence, not inside it.
        for s in std::iter::once(&mut *session).chain(others.iter_mut()) {
            catch_up(catalog, s, opts.max_lag, env).await?;
        }
        before.lap("catch-up after the counts");
    }
    let other_names: Vec<String> = others.iter().map(|o| o.target_name().to_string()).collect();
    if opts.dry_run {
        // The poolers are checked, not paused.
        crate::switch::check(&opts.switch, env).await?;
        let mut report = dry_run(catalog, session, others, env).await?;
        report.would_create = would_create;
        report.before_fence = before.steps;
        report.others = other_names;
        return Ok(report);
    }
    for name in opts.rollback_sync.iter().chain(&opts.keep_others) {
        check_new_sync_name(catalog, name)?;
    }
    let moved_to = format!("pgleap database \"{target}\" ({})", catalog.db(&target)?.conninfo);
    let to = route.target(&target)?.resolve(env)?;

    // Recorded before the fence: a rerun after a kill undoes it.
    catalog.begin_cutover(
        route.name(),
        opts.terminate,
        opts.rollback_sync.as_deref(),
        opts.keep_others.as_deref(),
    )?;
    // The clients' pause starts here: the poolers hold their new queries.
    let paused_at = Instant::now();
    let span = FenceSpan::enter();
    let mut pooler = match Switch::pause(&opts.switch, env).await {
        Ok(pooler) => pooler,
        Err(e) => {
            // Nothing was fenced: nothing is left to finish or undo.
            catalog.end_cutover(route.name())?;
            return Err(e);
        }
    };
    let started = Instant::now();
    let mut inside = Timer::new();
    let result = async {
        let targets: Vec<&Conn> =
            std::iter::once(&session.tgt).chain(others.iter().map(|o| &o.tgt)).collect();
        fence(&mut session.src, &targets, &session.plan, &moved_to).await?;
        crate::failpoint::hit("cutover-fenced");
        if opts.terminate {
            read_only(&session.src, true).await?;
        }
        inside.lap("fence (taking the tables' locks)");
        let switched = switch(
            catalog,
            session,
            others,
            opts,
            (&at_switch, &others_at_switch),
            &mut inside,
            env,
        )
        .await?;
        pooler.repoint(&opts.switch, &to, route.name(), &target).await?;
        inside.lap("switch");
        Ok::<_, Error>(switched)
    }
    .await;
    let switched = match result {
        Ok(switched) => switched,
        Err(e) => {
            tracing::warn!("cutover failed before the switch; unfencing the source: {e}");
            let armed = Armed {
                rollback: opts.rollback_sync.as_deref(),
                keep: opts.keep_others.as_deref(),
            };
            let left = (&at_switch[..], &others_at_switch[..]);
            undo(catalog, session, others, opts.terminate, armed, left).await;
            pooler.abort(env).await;
            catalog.end_cutover(route.name())?;
            return Err(e);
        }
    };
    let fence_ms = started.elapsed().as_millis() as i64;
    // Past the switch point: a rerun after a kill finishes what follows.
    catalog.switch_point(&[SwitchPoint {
        sync: route.name(),
        target: &target,
        fence_ms,
        rollback_sync: opts.rollback_sync.as_deref(),
    }])?;
    crate::failpoint::hit("cutover-switched");
    // A rollback: the fence the cutover left on the old server comes off
    // only now, past the switch point, before the clients go on: a kill
    // before it is finished by a rerun (which lifts it), never undone into
    // two servers taking writes.
    let lifted = match &opts.lift_fence {
        Some(old) => lift_fence(&mut session.tgt, old).await,
        None => Ok(()),
    };
    let resumed = pooler.resume().await;
    let paused_ms =
        (!opts.switch.bouncers.is_empty()).then(|| paused_at.elapsed().as_millis() as i64);
    drop(span);
    let armed = opts.rollback_sync.is_some() || opts.keep_others.is_some();
    past_switch_point(catalog, armed, resumed)?;
    lifted.map_err(|e| unlifted(route.name(), e))?;
    target::validate_foreign_keys(&session.tgt, &switched.to_validate).await?;
    for (other, to_validate) in others.iter().zip(&switched.others_to_validate) {
        target::validate_foreign_keys(&other.tgt, to_validate).await?;
    }
    stop_decoding(&session.src, &session.plan).await?;
    catalog.end_cutover(route.name())?;
    Ok(CutoverReport {
        sync: route.name().into(),
        target,
        dry_run: false,
        fence_ms,
        sequences: switched.sequences,
        foreign_keys: switched.to_validate.len(),
        triggers: switched.triggers,
        tables: session.plan.tables.len(),
        large_objects_ms: switched.large_objects_ms,
        rollback_sync: opts.rollback_sync.clone(),
        others: other_names,
        keep_sync: opts.keep_others.clone(),
        paused_ms,
        would_create: Vec::new(),
        before_fence: before.steps,
        inside_fence: inside.steps,
    })
}

/// The cutover of a server move: every database's sync, in one fence.
#[derive(Debug, Serialize)]
pub struct ServerCutoverReport {
    /// The whole server's write downtime: from the first database fenced
    /// to the one switch point, in milliseconds.
    pub fence_ms: i64,
    /// How long the poolers held the clients' queries, when they did.
    pub paused_ms: Option<i64>,
    /// Each database's cutover; its `fence_ms` runs from its own fence to
    /// the common switch point.
    pub databases: Vec<CutoverReport>,
    pub before_fence: Vec<StepTime>,
    pub inside_fence: Vec<StepTime>,
}

/// One database of a server move at its cutover (or its rollback).
pub struct Member {
    pub route: SyncRoute,
    pub session: Session,
    /// The sync back to the old server armed inside the fence, if asked for.
    pub rollback_sync: Option<String>,
    /// A rollback: the fence the cutover left on this database's old
    /// server, lifted at the switch point.
    pub lift_fence: Option<Plan>,
}

/// Cuts several syncs over at one switch point (a server move): every
/// source fenced, then every database finished side by side (drain,
/// sequences, deferred schema, the sync back armed), then one switch (the
/// poolers' databases each pointed at their new database, the command run
/// once with `server`), then one catalog transaction past the switch point
/// for all. A failure before it undoes every database; a kill leaves all
/// before it or all past it.
pub async fn cutover_server(
    catalog: &mut Catalog,
    members: &mut [Member],
    opts: &CutoverOptions,
    name: &str,
    server: &crate::pg::ResolvedConn,
    env: Env<'_>,
) -> Result<ServerCutoverReport> {
    let mut before = Timer::new();
    for m in members.iter_mut() {
        catch_up(catalog, &mut m.session, opts.max_lag, env).await?;
    }
    before.lap("catch-up");
    let mut at_switch = Vec::new();
    for m in members.iter() {
        at_switch.push(settle_schema(&m.session, opts.allow_schema_differences, false).await?.0);
    }
    before.lap("schema");
    if !opts.rows_compared {
        for m in members.iter_mut() {
            counts_at_one_point(&mut m.session).await?;
        }
        before.lap("row counts at one point");
        for m in members.iter_mut() {
            catch_up(catalog, &mut m.session, opts.max_lag, env).await?;
        }
        before.lap("catch-up after the counts");
    }
    // Everything the fence needs is read before it: where each database
    // moves to, what the pooler's entry of each is, each one's options.
    let mut moves = Vec::new();
    for m in members.iter() {
        let target = m.session.target_name().to_string();
        let moved_to = format!("pgleap database \"{target}\" ({})", catalog.db(&target)?.conninfo);
        let pooled = m.route.source.resolve(env)?.dbname;
        let to = m.route.target(&target)?.resolve(env)?;
        let own = CutoverOptions { rollback_sync: m.rollback_sync.clone(), ..opts.clone() };
        if let Some(back) = &m.rollback_sync {
            check_new_sync_name(catalog, back)?;
        }
        moves.push((target, moved_to, pooled, to, own));
    }
    // The databases are finished side by side inside the fence, each
    // recording its rounds through a catalog connection of its own.
    let mut catalogs = Vec::new();
    for _ in members.iter() {
        catalogs.push(Catalog::open(catalog.path())?);
    }
    for m in members.iter() {
        catalog.begin_cutover(m.route.name(), false, m.rollback_sync.as_deref(), None)?;
    }
    let paused_at = Instant::now();
    let span = FenceSpan::enter();
    let mut pooler = match Switch::pause(&opts.switch, env).await {
        Ok(pooler) => pooler,
        Err(e) => {
            for m in members.iter() {
                catalog.end_cutover(m.route.name())?;
            }
            return Err(e);
        }
    };
    let started = Instant::now();
    let mut inside = Timer::new();
    let mut fenced_at = Vec::new();
    let mut steps: Vec<Timer> = Vec::new();
    let mut finished = Vec::new();
    let result = async {
        for (m, mv) in members.iter_mut().zip(&moves) {
            fence(&mut m.session.src, &[&m.session.tgt], &m.session.plan, &mv.1).await?;
            fenced_at.push(Instant::now());
        }
        crate::failpoint::hit("cutover-fenced");
        inside.lap("fence (taking every database's tables' locks)");
        // Side by side: the fence is the slowest database's drain, not the
        // sum of them.
        let each = members.iter_mut().zip(&at_switch).zip(catalogs.iter_mut()).zip(&moves).map(
            |(((m, left), own), mv)| async move {
                let mut timer = Timer::new();
                let s = &mut m.session;
                let done = switch(own, s, &mut [], &mv.4, (left, &[]), &mut timer, env).await?;
                Ok::<_, Error>((done, timer))
            },
        );
        // Every one runs to its end, so none is cancelled half-way through
        // a batch before an undo.
        for result in futures_util::future::join_all(each).await {
            let (done, timer) = result?;
            finished.push(done);
            steps.push(timer);
        }
        inside.lap("drain, sequences and deferred schema of every database");
        let to_of = |db: &str| moves.iter().find(|m| m.2 == db).map_or(server, |m| &m.3);
        pooler.repoint_each(&opts.switch, server, name, "server", &to_of).await?;
        inside.lap("switch");
        Ok::<_, Error>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!("server cutover failed before the switch; unfencing every source: {e}");
        for (m, left) in members.iter_mut().zip(&at_switch) {
            let armed = Armed { rollback: m.rollback_sync.as_deref(), keep: None };
            undo(catalog, &mut m.session, &mut [], false, armed, (&left[..], &[])).await;
        }
        pooler.abort(env).await;
        for m in members.iter() {
            catalog.end_cutover(m.route.name())?;
        }
        return Err(e);
    }
    let switch_point = Instant::now();
    let fence_ms = started.elapsed().as_millis() as i64;
    let each_ms: Vec<i64> =
        fenced_at.iter().map(|at| (switch_point - *at).as_millis() as i64).collect();
    let points: Vec<SwitchPoint<'_>> = members
        .iter()
        .zip(&moves)
        .zip(&each_ms)
        .map(|((m, mv), ms)| SwitchPoint {
            sync: m.route.name(),
            target: &mv.0,
            fence_ms: *ms,
            rollback_sync: m.rollback_sync.as_deref(),
        })
        .collect();
    catalog.switch_point(&points)?;
    crate::failpoint::hit("cutover-switched");
    // A rollback's old fences come off past the switch point, as in
    // `cutover_with`.
    let mut lifted = Ok(());
    for m in members.iter_mut() {
        if let Some(old) = &m.lift_fence
            && let Err(e) = lift_fence(&mut m.session.tgt, old).await
        {
            lifted = Err(unlifted(m.route.name(), e));
        }
    }
    let resumed = pooler.resume().await;
    let paused_ms =
        (!opts.switch.bouncers.is_empty()).then(|| paused_at.elapsed().as_millis() as i64);
    drop(span);
    let armed = members.iter().any(|m| m.rollback_sync.is_some());
    past_switch_point(catalog, armed, resumed)?;
    lifted?;
    let mut databases = Vec::new();
    for (i, m) in members.iter_mut().enumerate() {
        target::validate_foreign_keys(&m.session.tgt, &finished[i].to_validate).await?;
        stop_decoding(&m.session.src, &m.session.plan).await?;
        catalog.end_cutover(m.route.name())?;
        databases.push(CutoverReport {
            sync: m.route.name().into(),
            target: moves[i].0.clone(),
            dry_run: false,
            fence_ms: each_ms[i],
            sequences: finished[i].sequences,
            foreign_keys: finished[i].to_validate.len(),
            triggers: finished[i].triggers,
            tables: m.session.plan.tables.len(),
            large_objects_ms: finished[i].large_objects_ms,
            rollback_sync: m.rollback_sync.clone(),
            others: Vec::new(),
            keep_sync: None,
            paused_ms,
            would_create: Vec::new(),
            before_fence: Vec::new(),
            inside_fence: std::mem::take(&mut steps[i].steps),
        });
    }
    Ok(ServerCutoverReport {
        fence_ms,
        paused_ms,
        databases,
        before_fence: before.steps,
        inside_fence: inside.steps,
    })
}

/// The schema objects left for the switch point (forced row security): the
/// target switched to's, and each other target's in their order.
type Left<'a> = (&'a [Difference], &'a [Vec<Difference>]);

/// Lifts the fence a cutover left on the old server (and the read-only
/// default of `--terminate`): the last step of a rollback.
async fn lift_fence(old: &mut Conn, plan: &Plan) -> Result<()> {
    unfence(old, plan).await?;
    capture::reset_read_only(old).await
}

fn unlifted(sync: &str, e: Error) -> Error {
    Error::invalid(
        format!("switched back, but the old server's fence could not be lifted: {e}"),
        format!("pgleap rollback again (or pgleap cutover {sync}) finishes it"),
    )
}

/// Right after a switch point: a sync armed inside the fence needs the
/// daemon to follow it; a pooler that did not resume holds its clients.
fn past_switch_point(catalog: &Catalog, armed: bool, resumed: Result<()>) -> Result<()> {
    if armed && crate::daemon::running_pid(catalog.path()).is_none() {
        crate::daemon::start_detached(catalog.path(), &crate::daemon::listen_setting())?;
    }
    resumed.map_err(|e| {
        Error::invalid(
            format!("cut over, but a pooler did not resume: {e}"),
            "run RESUME on its admin console: its clients wait until then",
        )
    })
}

/// The syncs a cutover arms inside its fence (removed again by an undo).
#[derive(Clone, Copy)]
struct Armed<'a> {
    rollback: Option<&'a str>,
    keep: Option<&'a str>,
}

/// Puts everything back as the sync had it after a failure before the
/// switch point: the source unfenced (and writable by default again), the
/// targets' foreign keys and triggers set aside again (they would fire
/// during the next batches), the syncs armed removed. Best effort: the
/// original error is the one reported. `at_switch`: the objects left for
/// the switch point, of the target switched to and of the others.
async fn undo(
    catalog: &mut Catalog,
    session: &mut Session,
    others: &mut [Session],
    terminate: bool,
    armed: Armed<'_>,
    at_switch: Left<'_>,
) {
    if terminate {
        let _ = read_only(&session.src, false).await;
    }
    if let Err(e) = unfence(&mut session.src, &session.plan).await {
        tracing::error!(
            "could not unfence the source: {e}; run pgleap cutover again or unfence by hand"
        );
    }
    let left = std::iter::once(at_switch.0).chain(at_switch.1.iter().map(Vec::as_slice));
    let targets = std::iter::once(&mut *session).chain(others.iter_mut());
    for (s, at_switch) in targets.zip(left.chain(std::iter::repeat(&[][..]))) {
        // Forced, row security would filter the sync's own writes.
        for d in at_switch.iter().filter(|d| d.kind == fidelity::FORCED_ROW_SECURITY) {
            let _ = s
                .tgt
                .batch_execute(&format!("alter table {} no force row level security", d.name))
                .await;
        }
        if !s.replica_role
            && let Err(e) = target::prepare(&s.src, &mut s.tgt, &s.plan).await
        {
            tracing::error!(
                "could not set the foreign keys and triggers of {} aside again: {e}",
                s.target_name()
            );
        }
    }
    for name in armed.rollback.iter().chain(&armed.keep) {
        // It did not exist before this cutover (checked up front), so
        // whatever carries its name is this cutover's, however far arming
        // it went (a killed run may have left only some of it).
        if let Err(e) = capture::remove(&mut session.tgt, &session.plan.schema, name, false).await {
            tracing::error!("could not remove sync \"{name}\" from the new server: {e}");
        }
        let _ = catalog.remove_sync(name);
        let _ = catalog.remove_dbgroup(name);
        let _ = catalog.remove_relgroup(name);
    }
}

/// What a cutover of `route` that died half-way left: finished when it had
/// passed its switch point (its report returned), undone when it died
/// inside its fence (None: the caller cuts over afresh).
pub(crate) async fn resume_unfinished(
    catalog: &mut Catalog,
    route: &SyncRoute,
    target: &DbConn,
    switch: &SwitchPlan,
    env: Env<'_>,
) -> Result<Option<CutoverReport>> {
    let sync_name = route.name();
    let Some(progress) = catalog.cutover_progress(sync_name)? else {
        return Ok(None);
    };
    if progress.running() {
        return Err(Error::invalid(
            format!(
                "a cutover of sync \"{sync_name}\" runs now (pid {}, since {})",
                progress.pid, progress.started_at
            ),
            format!("wait for it; pgleap status {sync_name} shows where it is"),
        ));
    }
    if progress.step == "switched" {
        return finish_switched(catalog, route, switch, env).await.map(Some);
    }
    let deadline = Some(Instant::now() + ROUND_LIMIT);
    tracing::warn!(
        "resuming: the cutover of sync \"{sync_name}\" started at {} was killed inside its \
         fence; undoing it first",
        progress.started_at
    );
    // The fence is the source's and the armed syncs capture on the target
    // switched to: undone from whichever target this rerun names (the
    // others' foreign keys and triggers are set aside again too).
    let mut session = Session::connect_retrying(catalog, route, target, deadline, env).await?;
    let mut others = Vec::new();
    for other in route.targets.iter().filter(|t| t.name != target.name) {
        others.push(Session::connect_retrying(catalog, route, other, deadline, env).await?);
    }
    let armed =
        Armed { rollback: progress.rollback_sync.as_deref(), keep: progress.keep_sync.as_deref() };
    undo(catalog, &mut session, &mut others, progress.terminate, armed, (&[], &[])).await;
    // Its poolers may still hold their clients: the rerun names the same.
    crate::switch::resume_left_paused(switch, env).await;
    catalog.end_cutover(sync_name)?;
    Ok(None)
}

/// Finishes a cutover that died past its switch point: the application
/// already writes to the target; what is left is validating the foreign
/// keys added NOT VALID inside the fence.
async fn finish_switched(
    catalog: &mut Catalog,
    route: &SyncRoute,
    switch: &SwitchPlan,
    env: Env<'_>,
) -> Result<CutoverReport> {
    let sync = route.name();
    tracing::warn!(
        "resuming: the cutover of sync \"{sync}\" passed its switch point; finishing it"
    );
    // A rollback killed past its switch point: the fence the forward
    // cutover left on the old server (this sync's target) comes off, then
    // the poolers it may have left paused let their clients go.
    if let Some(forward) = catalog.rollback_for(sync)? {
        let forward = SyncRoute::load(catalog, &forward)?;
        let mut old = route.sole_target()?.connect(env).await?;
        let fence = Plan::load(&old, &forward.sync, &forward.relgroup).await?;
        lift_fence(&mut old, &fence).await?;
    }
    crate::switch::resume_left_paused(switch, env).await;
    let src = route.source.connect(env).await?;
    let plan = Plan::load(&src, &route.sync, &route.relgroup).await?;
    // Every target's foreign keys: the one switched to and the others
    // were all finished inside the fence.
    let mut foreign_keys = 0;
    for db in &route.targets {
        let tgt = db.connect(env).await?;
        let to_validate = target::not_validated(&tgt, &plan).await?;
        target::validate_foreign_keys(&tgt, &to_validate).await?;
        foreign_keys += to_validate.len();
    }
    stop_decoding(&src, &plan).await?;
    let record = catalog.last_cutover(sync)?;
    let to = match record.as_ref().and_then(|r| r.target.clone()) {
        Some(name) => name,
        None => route.sole_target()?.name.clone(),
    };
    catalog.end_cutover(sync)?;
    Ok(CutoverReport {
        sync: sync.into(),
        target: to.clone(),
        dry_run: false,
        fence_ms: record.map_or(0, |r| r.fence_ms),
        sequences: plan.sequences.len(),
        foreign_keys,
        triggers: 0,
        tables: plan.tables.len(),
        large_objects_ms: None,
        rollback_sync: catalog.rollback_sync_of(sync)?,
        others: route.targets.iter().filter(|t| t.name != to).map(|t| t.name.clone()).collect(),
        keep_sync: None,
        paused_ms: None,
        would_create: Vec::new(),
        before_fence: Vec::new(),
        inside_fence: Vec::new(),
    })
}

/// Drops the slot of a sync past its switch point, if it decodes: its
/// source is fenced, and the slot would only hold the old server's WAL
/// back (a rollback sync writes there). Teardown removes the rest.
async fn stop_decoding(src: &Conn, plan: &Plan) -> Result<()> {
    crate::decoding::stop(src, &plan.schema, plan.sync_id).await
}

/// What happened inside the fence.
struct Switched {
    large_objects_ms: Option<i64>,
    sequences: usize,
    triggers: usize,
    to_validate: Vec<Unvalidated>,
    /// The other targets' foreign keys to validate, in their order.
    others_to_validate: Vec<Vec<Unvalidated>>,
}

/// Creates on the target what pgleap can of the schema it lacks (a dry
/// run only rehearses it: nothing stays), and refuses, unless `allow`,
/// while objects it cannot create are missing. Returns the differences
/// left for the switch point, and for a dry run what it would create.
async fn settle_schema(
    session: &Session,
    allow: bool,
    dry_run: bool,
) -> Result<(Vec<Difference>, Vec<String>)> {
    let plan = &session.plan;
    let (at_switch, blocking, would_create) =
        schema_left(&session.src, &session.tgt, plan, dry_run).await?;
    if !blocking.is_empty() {
        let message = blocking_message(&blocking);
        if !allow {
            return Err(Error::invalid(
                format!("cutover refused: {message}"),
                format!(
                    "create them on the target (pgleap verify {} lists them all), or pass \
                     --allow-schema-differences to switch anyway; nothing was fenced",
                    plan.sync
                ),
            ));
        }
        tracing::warn!("switching with --allow-schema-differences: {message}");
    }
    Ok((at_switch, would_create.iter().map(fidelity::describe).collect()))
}

/// The schema the target lacks, after pgleap creates (or, with
/// `rehearse`, rehearses creating) what it can: (left for the switch
/// point, blocking the cutover, created or creatable).
async fn schema_left(
    src: &Conn,
    tgt: &Conn,
    plan: &Plan,
    rehearse: bool,
) -> Result<(Vec<Difference>, Vec<Difference>, Vec<Difference>)> {
    let scope = fidelity::Scope::of_plan(plan);
    let differences = fidelity::compare(src, tgt, &scope).await?;
    let (created, left) = if rehearse {
        fidelity::rehearse_create(tgt, differences, Stage::AfterData).await?
    } else {
        (Vec::new(), fidelity::create(tgt, differences, Stage::AfterData).await?)
    };
    let (at_switch, blocking): (Vec<_>, Vec<_>) =
        left.into_iter().partition(|d| d.stage == Stage::Cutover);
    Ok((at_switch, blocking, created))
}

fn blocking_message(blocking: &[Difference]) -> String {
    let shown: Vec<String> = blocking.iter().take(5).map(fidelity::describe).collect();
    let more = blocking.len().saturating_sub(shown.len());
    format!(
        "the target lacks or differs in {} schema object(s): {}{}",
        blocking.len(),
        shown.join("; "),
        if more > 0 { format!("; and {more} more") } else { String::new() }
    )
}

/// Why the schema would stop a cutover of `sync` now (nothing: it would
/// not): the same judgement as the cutover's, rehearsed, so `ready` and
/// `cutover` agree.
pub async fn schema_not_ready(catalog: &Catalog, sync: &str, env: Env<'_>) -> Result<Vec<String>> {
    let route = SyncRoute::load(catalog, sync)?;
    if route.sync.retired {
        return Ok(Vec::new());
    }
    let src = route.source.connect(env).await?;
    let plan = Plan::load(&src, &route.sync, &route.relgroup).await?;
    let mut reasons = Vec::new();
    for db in &route.targets {
        let tgt = db.connect(env).await?;
        let (_, blocking, _) = schema_left(&src, &tgt, &plan, true).await?;
        if !blocking.is_empty() {
            let on =
                if route.targets.len() > 1 { format!(" ({})", db.name) } else { String::new() };
            reasons.push(format!(
                "{}{on} (pgleap verify {sync} lists them; or cutover --allow-schema-differences)",
                blocking_message(&blocking)
            ));
        }
    }
    Ok(reasons)
}

/// Inside the fence, up to the switch point: every target brought to the
/// final state (drain, sequences, deferred schema), the syncs armed if
/// asked for, and last the objects left for the switch point.
async fn switch(
    catalog: &mut Catalog,
    session: &mut Session,
    others: &mut [Session],
    opts: &CutoverOptions,
    (at_switch, others_at_switch): Left<'_>,
    timer: &mut Timer,
    env: Env<'_>,
) -> Result<Switched> {
    let large_objects_ms = drain(catalog, session, env).await?;
    timer.lap("drain");
    let (src, tgt, margin) = (&session.src, &session.tgt, opts.sequence_margin);
    let sequences = sequences::set_exact(src, tgt, &session.plan.sequences, margin).await?;
    timer.lap("sequences");
    let (to_validate, triggers) = deferred_schema(session).await?;
    crate::failpoint::hit("cutover-schema-restored");
    timer.lap("deferred schema");
    let mut others_to_validate = Vec::new();
    for (other, left) in others.iter_mut().zip(others_at_switch) {
        drain(catalog, other, env).await?;
        sequences::set_exact(&other.src, &other.tgt, &other.plan.sequences, margin).await?;
        others_to_validate.push(deferred_schema(other).await?.0);
        create_at_switch(other, left).await?;
    }
    if !others.is_empty() {
        timer.lap("other targets");
    }
    if let Some(back) = &opts.rollback_sync {
        arm_sync(catalog, back, &mut session.tgt, &session.plan, &[&session.src]).await?;
        timer.lap("sync back");
    }
    if let Some(keep) = &opts.keep_others {
        let kept: Vec<&Conn> = others.iter().map(|o| &o.tgt).collect();
        arm_sync(catalog, keep, &mut session.tgt, &session.plan, &kept).await?;
        timer.lap("sync to the other targets");
    }
    // Last: once forced, row security applies to pgleap's own writes.
    create_at_switch(session, at_switch).await?;
    Ok(Switched { large_objects_ms, sequences, triggers, to_validate, others_to_validate })
}

/// The foreign keys and triggers set aside during the sync, or missing:
/// put back or created (keys NOT VALID). Returns the keys to validate
/// after the switch point, and how many triggers were created.
async fn deferred_schema(session: &Session) -> Result<(Vec<Unvalidated>, usize)> {
    let schema = &session.plan.schema;
    let mut to_validate = target::restore(&session.tgt, schema, &session.plan.sync, false).await?;
    let missing = target::missing(&session.src, &session.tgt, &session.plan).await?;
    to_validate.extend(target::create_missing(&session.tgt, &missing).await?);
    // Foreign keys added NOT VALID earlier (under replica role, after the
    // initial copy) are validated with the others.
    to_validate.extend(target::not_validated(&session.tgt, &session.plan).await?);
    to_validate.sort();
    to_validate.dedup();
    Ok((to_validate, missing.triggers.len()))
}

/// Creates the objects left for the switch point (forced row security).
async fn create_at_switch(session: &Session, at_switch: &[Difference]) -> Result<()> {
    let failed = fidelity::create(&session.tgt, at_switch.to_vec(), Stage::Cutover).await?;
    if let Some(d) = failed.iter().find(|d| d.create_failed()) {
        return Err(Error::invalid(
            format!(
                "cutover: could not create {} on {}",
                fidelity::describe(d),
                session.target_name()
            ),
            "the source was unfenced; fix what is named on the target and run cutover again",
        ));
    }
    Ok(())
}

/// Applies everything committed on the source so far (inside the fence:
/// everything), then brings every large object up to date. Returns the
/// time of the large-object pass, if the sync has one.
async fn drain(catalog: &mut Catalog, session: &mut Session, env: Env<'_>) -> Result<Option<i64>> {
    let until = session.source_snapshot().await?;
    // A refusal here leaves the target as the sync had it: the batch that
    // found the difference rolls back.
    session.plan.compare_applied_rows();
    session.catch_up(catalog, &until, Some(Instant::now() + ROUND_LIMIT), env).await?;
    if !session.plan.large_objects {
        return Ok(None);
    }
    // Large objects have no trigger to say what changed: one more batch
    // looks at every one of them.
    let started = Instant::now();
    session.batch_with_all_large_objects(env).await?;
    Ok(Some(started.elapsed().as_millis() as i64))
}

/// Everything inside the fence rehearsed without fencing, each step timed:
/// a prediction of the fence.
///
/// - Taking the fence's locks waits for the transactions that hold a lock
///   on a synced table when it asks (new ones queue behind it): the dry
///   run waits for the same transactions to end, without asking for any
///   lock (so it blocks no one), then runs the fence's DDL on the target,
///   rolled back, for its catalog work.
/// - The drain, the largest and noisiest step, is rehearsed three times,
///   and the shortest counts: a rehearsal races the application's writes
///   and the daemon's batches (it waits for the applier lock), which the
///   real drain, behind the fence, does not (the median of three
///   predicted 1.5-2.6x the drain measured, docs/BENCHMARKS.md).
///
/// The prediction is the sum of the steps, not the dry run's own length.
async fn dry_run(
    catalog: &mut Catalog,
    session: &mut Session,
    others: &mut [Session],
    env: Env<'_>,
) -> Result<CutoverReport> {
    let mut timer = Timer::new();
    wait_for_writers(&session.src, &session.plan).await?;
    rehearse_fence_ddl(&mut session.tgt, &session.plan).await?;
    timer.lap("fence (taking the tables' locks)");
    let mut drains = Vec::new();
    let mut large_objects_ms = None;
    for _ in 0..DRAIN_REHEARSALS {
        let started = Instant::now();
        large_objects_ms = drain(catalog, session, env).await?;
        drains.push(started.elapsed());
    }
    timer.record("drain", drains.into_iter().min().unwrap_or_default());
    let sequences = sequences::read(&session.src, &session.plan.sequences).await?;
    timer.lap("sequences");
    let missing = target::missing(&session.src, &session.tgt, &session.plan).await?;
    timer.lap("deferred schema");
    for other in others.iter_mut() {
        drain(catalog, other, env).await?;
        target::missing(&other.src, &other.tgt, &other.plan).await?;
    }
    if !others.is_empty() {
        timer.lap("other targets");
    }
    Ok(CutoverReport {
        sync: session.sync_name().into(),
        target: session.target_name().into(),
        dry_run: true,
        fence_ms: timer.steps.iter().map(|s| s.ms).sum(),
        sequences: sequences.len(),
        foreign_keys: missing.foreign_keys.len(),
        triggers: missing.triggers.len(),
        tables: session.plan.tables.len(),
        large_objects_ms,
        rollback_sync: None,
        others: Vec::new(),
        keep_sync: None,
        paused_ms: None,
        would_create: Vec::new(),
        before_fence: Vec::new(),
        inside_fence: timer.steps,
    })
}

/// How many times a dry run drains (see [`dry_run`]).
const DRAIN_REHEARSALS: usize = 3;

/// Waits until every transaction that now holds a lock on one of the
/// plan's tables in a mode the fence's would wait for (any but ACCESS
/// SHARE and ROW SHARE: a writer, DDL, a VACUUM) has ended: what the
/// fence's lock requests would wait for, were they made now. Polls; past
/// [`REHEARSED_WAIT`] refuses, naming the oldest such transaction's session,
/// as the fence itself would wait for it (up to its own retries) while
/// the application's writes queue.
async fn wait_for_writers(src: &Conn, plan: &Plan) -> Result<()> {
    let tables: Vec<&str> = plan.tables.iter().map(|t| t.table.as_str()).collect();
    let rows = src.query(WRITERS, &[&tables]).await?;
    let holders: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    if holders.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let left: Option<String> =
            src.query_opt(STILL_RUNNING, &[&holders]).await?.map(|r| r.get(0));
        let Some(oldest) = left else { return Ok(()) };
        if started.elapsed() > REHEARSED_WAIT {
            return Err(Error::invalid(
                format!(
                    "sync \"{}\": a transaction writing to a synced table did not end in {} s \
                     ({oldest}); the fence would wait for it while the application's writes \
                     queue behind the fence",
                    plan.sync,
                    REHEARSED_WAIT.as_secs()
                ),
                "let that transaction end (or end it: pg_terminate_backend) before the cutover",
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// How long a dry run waits for the transactions the fence would wait for.
const REHEARSED_WAIT: Duration = Duration::from_secs(30);

/// The transactions (virtual ids: one per transaction, and visible to any
/// role, where pg_stat_activity hides other roles' transaction starts)
/// holding a lock the fence's SHARE ROW EXCLUSIVE locks conflict with, on
/// the tables named in $1.
const WRITERS: &str = "select distinct l.virtualtransaction
    from pg_locks l
    where l.granted and l.locktype = 'relation'
      and l.mode not in ('AccessShareLock', 'RowShareLock')
      and l.relation = any($1::text[]::regclass[]::oid[])
      and l.pid <> pg_backend_pid()";

/// Of the transactions in $1, one still running, described; none when all
/// ended (a transaction holds the lock on its own virtual id to its end).
const STILL_RUNNING: &str =
    "select format('pid %s, role %s', l.pid, coalesce(a.usename::text, '?'))
    from pg_locks l left join pg_stat_activity a on a.pid = l.pid
    where l.locktype = 'virtualxid' and l.granted and l.virtualxid = any($1::text[])
    limit 1";

/// The fence's DDL run on the target and rolled back: its catalog work
/// for as many tables, which the real fence does on the source.
async fn rehearse_fence_ddl(tgt: &mut Conn, plan: &Plan) -> Result<()> {
    let ddl = fence_ddl(plan, "a rehearsal");
    let tx = tgt.transaction().await?;
    // Under the sync's applier lock: the DDL's locks, taken table by table,
    // would otherwise deadlock with a batch writing the same tables in
    // another order (seen: a second's wait, the server's deadlock_timeout,
    // in the prediction).
    tx.execute(apply::XACT_LOCK, &[&apply::LOCK_CLASS, &plan.sync_id]).await?;
    // Best effort: a target that cannot take the fence (another major's
    // rules) only leaves the prediction without its DDL.
    if let Err(e) = tx.batch_execute(&format!("set local lock_timeout = '2s'; {ddl}")).await {
        tracing::debug!(error = %e, "the fence's DDL not rehearsed on the target");
    }
    tx.rollback().await?;
    Ok(())
}

fn check_new_sync_name(catalog: &Catalog, name: &str) -> Result<()> {
    objects::check_name(ObjectKind::Sync, name)?;
    if catalog.sync(name).is_ok() || catalog.relgroup(name).is_ok() || catalog.dbgroup(name).is_ok()
    {
        return Err(Error::invalid(
            format!("\"{name}\" is already used by a sync, relgroup or dbgroup"),
            "choose another name for --rollback-sync or --keep-others",
        ));
    }
    Ok(())
}

/// Declares and installs a sync `name` from the new server (the session's
/// target) to `targets` (the old server, for the sync back; the other
/// targets, to keep them following): capture on the new server starts
/// before it takes any write, so nothing is lost. The targets are at the
/// new server's state (all drained inside the fence): nothing to copy. On
/// failure, whatever it created is removed.
async fn arm_sync(
    catalog: &mut Catalog,
    name: &str,
    new: &mut Conn,
    plan: &Plan,
    targets: &[&Conn],
) -> Result<()> {
    let new_name = new.name().to_string();
    let selection = Selection {
        tables: plan.tables.iter().map(|t| t.table.clone()).collect(),
        sequences: plan.sequences.clone(),
        large_objects: Some(plan.large_objects),
        ..Default::default()
    };
    let spec = SyncSpec {
        name: name.to_string(),
        relgroup: name.to_string(),
        dbgroup: name.to_string(),
        onetimecopy: OneTimeCopy::Never,
        autokick: true,
        // The old server is usually the older major; the other targets
        // were the user's choice already.
        allow_downgrade: true,
        capture_schema: plan.schema.clone(),
        lo_interval: 10,
        // The way back is captured as the forward sync's default, by
        // triggers: a slot's creation waits for every running transaction
        // on the new server to end, which a cutover must not.
        row_triggers: false,
        capture: crate::decoding::Method::Triggers,
    };
    let result = async {
        objects::add_relgroup_on(catalog, name, new, &selection).await?;
        let members: Vec<String> = std::iter::once(format!("{new_name}:source"))
            .chain(targets.iter().map(|t| format!("{}:target", t.name())))
            .collect();
        objects::add_dbgroup(catalog, name, &members)?;
        objects::add_sync_on(catalog, &spec, new, targets).await
    }
    .await;
    if let Err(e) = result {
        let _ = catalog.remove_sync(name);
        let _ = catalog.remove_dbgroup(name);
        let _ = catalog.remove_relgroup(name);
        return Err(e);
    }
    crate::failpoint::hit("cutover-armed");
    Ok(())
}

/// Applies until the oldest pending change is younger than `max_lag`.
async fn catch_up(
    catalog: &mut Catalog,
    session: &mut Session,
    max_lag: Duration,
    env: Env<'_>,
) -> Result<()> {
    let deadline = Instant::now() + CATCH_UP_LIMIT;
    loop {
        let until = session.source_snapshot().await?;
        session.catch_up(catalog, &until, Some(Instant::now() + ROUND_LIMIT), env).await?;
        let (_, lag) = session.pending().await?;
        if lag <= max_lag.as_secs_f64() {
            if session.plan.large_objects {
                // Large objects changed since the last pass are written now,
                // while writes go on: the fence's own pass then writes only
                // those changed in the last moments.
                session.batch_with_all_large_objects(env).await?;
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::invalid(
                format!("sync \"{}\" stayed {lag:.1} s behind for an hour", session.sync_name()),
                "lower the write load, or raise --max-lag",
            ));
        }
    }
}

fn fence_function(plan: &Plan) -> String {
    qualified(&plan.schema, &capture::fence_function(plan.sync_id))
}

/// Fences the source, holding the sync's applier lock on every target
/// while it does: an applier connecting meanwhile (the daemon's worker, a
/// `kick`) either set its target's foreign keys and triggers aside before
/// the fence (this cutover puts them back later), or finds the fence and
/// leaves them (`target::prepare`), never takes them away after the
/// cutover put them back.
async fn fence(src: &mut Conn, targets: &[&Conn], plan: &Plan, moved_to: &str) -> Result<()> {
    let key = (apply::LOCK_CLASS, plan.sync_id);
    for t in targets {
        t.execute(apply::HOLD_LOCK, &[&key.0, &key.1]).await?;
    }
    let fenced = fence_source(src, plan, moved_to).await;
    for t in targets {
        // A lock not released (the connection failed) ends with it.
        let _ = t.execute(apply::RELEASE_LOCK, &[&key.0, &key.1]).await;
    }
    fenced
}

async fn fence_source(src: &mut Conn, plan: &Plan, moved_to: &str) -> Result<()> {
    let message = format!("{} no longer takes writes: it moved to {moved_to}", src.name());
    let ddl = fence_ddl(plan, &message);
    capture::with_lock_retries(src, "fencing the source", &ddl).await
}

/// The fence: a function raising `message`, and a statement trigger calling
/// it on every table of the plan.
fn fence_ddl(plan: &Plan, message: &str) -> String {
    let function = fence_function(plan);
    let trigger = quote_ident(&capture::fence_trigger(plan.sync_id));
    let message = quote_literal(message);
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
                 for each statement execute procedure {function}();\n",
            table = t.table
        ));
    }
    ddl
}

async fn unfence(src: &mut Conn, plan: &Plan) -> Result<()> {
    let trigger = quote_ident(&capture::fence_trigger(plan.sync_id));
    let mut ddl = String::new();
    for t in &plan.tables {
        ddl.push_str(&format!("drop trigger if exists {trigger} on {};\n", t.table));
    }
    ddl.push_str(&format!("drop function if exists {}();", fence_function(plan)));
    capture::with_lock_retries(src, "unfencing the source", &ddl).await
}

/// Moves the application back to the old server after a cutover armed with
/// `--rollback-sync`: a cutover of the sync back (fence the new server,
/// drain, sequences, deferred schema, the poolers or the command pointed at
/// the old server), whose last step lifts the fence the first cutover left
/// on the old server.
pub async fn rollback(
    catalog: &mut Catalog,
    sync_name: &str,
    opts: &CutoverOptions,
    env: Env<'_>,
) -> Result<CutoverReport> {
    let forward = SyncRoute::load(catalog, sync_name)?;
    if !forward.sync.retired {
        return Err(Error::invalid(
            format!("sync \"{sync_name}\" was not cut over: there is nothing to roll back"),
            format!("pgleap cutover {sync_name} --rollback-sync NAME moves to the new server"),
        ));
    }
    let Some(back_name) = catalog.rollback_sync_of(sync_name)? else {
        return Err(Error::invalid(
            format!(
                "sync \"{sync_name}\" was cut over without --rollback-sync: nothing replicates \
                 the new server's writes back to the old one"
            ),
            "going back now would lose them; migrate back with a new sync instead",
        ));
    };
    let back = SyncRoute::load(catalog, &back_name)?;
    let old = back.sole_target()?;
    if !opts.dry_run
        && let Some(report) = resume_unfinished(catalog, &back, old, &opts.switch, env).await?
    {
        return Ok(report);
    }
    let deadline = Some(Instant::now() + ROUND_LIMIT);
    let mut session = Session::open_retrying(catalog, &back, old, 1, deadline, env).await?;
    let old_fence = Plan::load(&session.tgt, &forward.sync, &forward.relgroup).await?;
    let opts = CutoverOptions { lift_fence: Some(old_fence), rollback_sync: None, ..opts.clone() };
    cutover_with(catalog, &back, &mut session, &mut [], &opts, env).await
}

/// Ends other sessions and makes new transactions read-only (or undoes it).
async fn read_only(src: &Conn, on: bool) -> Result<()> {
    let name: String = src.query_one("select current_database()", &[]).await?.get(0);
    let setting = if on {
        "set default_transaction_read_only = on"
    } else {
        "reset default_transaction_read_only"
    };
    src.batch_execute(&format!("alter database {} {setting}", quote_ident(&name))).await?;
    if on {
        src.execute(TERMINATE_OTHERS, &[]).await?;
    }
    Ok(())
}

/// Brings the target to one source snapshot in a batch and compares every
/// table's row count in that batch's two transactions, both servers at
/// once: rows the target gained or lost outside the sync show here, before
/// the fence, while the application still writes.
async fn counts_at_one_point(session: &mut Session) -> Result<()> {
    let plan = &session.plan;
    let (stx, ttx, decoded) = apply::begin_batch(&mut session.src, &mut session.tgt, plan).await?;
    apply::apply_within(&stx, &ttx, plan, None).await?;
    for t in &plan.tables {
        let q = format!("select count(*) from {}", t.rel());
        let (a, b) =
            futures_util::future::try_join(stx.query_one(&q, &[]), ttx.query_one(&q, &[])).await?;
        let (a, b): (i64, i64) = (a.get(0), b.get(0));
        if a != b {
            return Err(Error::invalid(
                format!(
                    "cutover refused: {} has {a} rows on the source and {b} on the target at one \
                     point of the sync: something wrote to the target outside it",
                    t.display
                ),
                format!("nothing was fenced; pgleap verify {} names the differing keys", plan.sync),
            ));
        }
    }
    ttx.commit().await?;
    stx.commit().await?;
    plan.end_pump(&session.src, decoded).await?;
    Ok(())
}

// The catalog queries of this module, named.

const TERMINATE_OTHERS: &str = "select pg_terminate_backend(pid) from pg_stat_activity
    where datname = current_database() and pid <> pg_backend_pid()
      and application_name <> 'pgleap'";

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries() -> Vec<NamedQuery> {
    vec![NamedQuery::new("cutover: end other sessions", TERMINATE_OTHERS)]
}
