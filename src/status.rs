//! What each sync is doing: the last rounds (from the catalog, written by
//! whoever ran them), live from the source the changes still waiting and
//! how old the oldest is, and from each target how far the initial copy
//! is; from all of it one phase per (sync, target). Works whether or not
//! the daemon runs.

use serde::Serialize;

use crate::apply::{self, Plan};
use crate::catalog::{Catalog, Sync, SyncState};
use crate::error::Result;
use crate::pg::{Conn, Env, PgVersion, Sql, quote_ident};
use crate::route::SyncRoute;

/// Lag above which a sync is catching up rather than streaming.
const STREAMING_LAG: f64 = 10.0;

/// How long status waits on each server: it answers whatever they do (a
/// stopped server, a lock), saying which did not answer.
const STATUS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn no_answer() -> String {
    format!("no answer in {} s", STATUS_WAIT.as_secs())
}

#[derive(Debug, Serialize)]
pub struct SyncStatus {
    pub name: String,
    pub source: String,
    pub relgroup: String,
    pub autokick: bool,
    pub onetimecopy: String,
    /// Whether the sync carries the database's large objects.
    pub large_objects: bool,
    /// Seconds between two large-object passes of the daemon.
    pub lo_interval: u32,
    pub tables: Vec<String>,
    pub targets: Vec<TargetStatus>,
    /// Why pending changes and lag could not be read, if they could not.
    pub source_error: Option<String>,
    /// Why apply is paused (a schema change), until `sync resume`.
    pub paused: Option<String>,
    /// Tables the sync does not carry although the relgroup took their
    /// schema whole (created since), and partitions of its partitioned
    /// tables the target lacks.
    pub not_captured: Vec<String>,
    /// Where the source is (`user@host:port/dbname`, no password) and the
    /// version it answered with (None: it did not answer).
    pub source_address: Option<String>,
    pub source_version: Option<String>,
    /// The write downtime its cutover measured, once cut over, and when.
    pub write_downtime_ms: Option<i64>,
    pub cut_over_at: Option<String>,
    /// The sync back its cutover armed (what `rollback` cuts over to).
    pub rollback_sync: Option<String>,
    /// The sync whose way back this sync is.
    pub rollback_of: Option<String>,
    /// Where the sync captures by logical decoding: its slot, how many
    /// tables it decodes, and the WAL the slot keeps on the source.
    pub decoding: Option<crate::decoding::SlotState>,
    /// Why a cutover cannot start now, at the default lag (empty: it can),
    /// as `ready` judges it but for the schema comparison, which `ready`
    /// and `cutover` add (it reads every object of both servers).
    pub not_ready: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct TargetStatus {
    pub target: String,
    /// As for the source: where, and the version it answered with.
    pub address: Option<String>,
    pub version: Option<String>,
    #[serde(flatten)]
    pub last: SyncState,
    pub pending: Option<i64>,
    pub lag_seconds: Option<f64>,
    /// After a cutover: where the writes go now.
    pub writes_go_to: Option<String>,
    /// waiting for daemon, copying (N%, ETA), building indexes, catching
    /// up, streaming, paused, bad, cut over, unreachable.
    pub phase: String,
    /// Whether the target has its initial copy and applies changes.
    pub copied: bool,
    /// The share of the initial copy's parts done, while it runs.
    pub copy_ratio: Option<f64>,
    /// Why the target could not be read, if it could not.
    pub target_error: Option<String>,
    /// What pgleap's apply on the target waits for, when it waits on a
    /// lock: "waiting 40 s for a lock on public.t held by pid 123".
    pub waiting: Option<String>,
    /// Roles that log in on the source and exist on this target without
    /// LOGIN (created by pgleap, which cannot read passwords): an
    /// administrator gives each a password and LOGIN before the
    /// application moves.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roles_without_login: Vec<String>,
}

impl TargetStatus {
    /// Whether the phase needs someone: a bad sync, a target that cannot
    /// be read, or nobody applying while autokick is on.
    pub fn needs_attention(&self) -> bool {
        tone(&self.phase) == Tone::Attention
    }
}

/// How a phase reads at a glance (the status page's colours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// Following the source closely.
    Good,
    /// Under way: copying, building indexes, catching up, cutting over.
    Working,
    /// Someone is needed (status exits 1).
    Attention,
    /// Over: cut over, or rolled back.
    Done,
}

impl Tone {
    pub fn as_str(self) -> &'static str {
        match self {
            Tone::Good => "good",
            Tone::Working => "working",
            Tone::Attention => "attention",
            Tone::Done => "done",
        }
    }
}

pub fn tone(phase: &str) -> Tone {
    if phase == "bad"
        || phase == "waiting for daemon"
        || phase == "unreachable"
        || phase == PAUSED
        || phase.starts_with(COPY_INTERRUPTED)
        || phase.starts_with(BLOCKED)
        || phase.starts_with(UNFINISHED)
    {
        Tone::Attention
    } else if phase == "cut over" || phase.starts_with(ROLLED_BACK) {
        Tone::Done
    } else if phase == "streaming" {
        Tone::Good
    } else {
        Tone::Working
    }
}

/// How far a target's initial copy is.
struct CopyProgress {
    units: i64,
    done: i64,
    /// Seconds since the first unit was done.
    elapsed: f64,
    /// Whether change apply has started (the copy is handed over).
    applied: bool,
    /// Whether a process runs the copy now (it holds the copy's lock).
    running: bool,
}

/// How far a target's initial copy is, for a command that waits on it:
/// "40% of its parts done".
pub(crate) async fn copy_share(tgt: &Conn, schema: &str, sync: &str) -> Result<String> {
    let p = copy_progress(tgt, schema, sync, None).await?;
    Ok(if p.units == 0 {
        "not started".to_string()
    } else {
        format!("{:.0}% of its parts done", p.done as f64 / p.units as f64 * 100.0)
    })
}

async fn copy_progress(
    tgt: &Conn,
    schema: &str,
    sync: &str,
    sync_id: Option<i32>,
) -> Result<CopyProgress> {
    let s = quote_ident(schema);
    let mut p = CopyProgress { units: 0, done: 0, elapsed: 0.0, applied: false, running: true };
    if tgt.relation_exists(&format!("{s}.applied")).await? {
        let sql = format!("select 1 from {s}.applied where sync = $1");
        p.applied = tgt.query_opt(&sql, &[&sync]).await?.is_some();
    }
    if tgt.relation_exists(&format!("{s}.copy_units")).await? {
        let row = tgt
            .query_one(
                &format!(
                    "select count(*), count(*) filter (where done),
                            coalesce(extract(epoch from now() - min(done_at)), 0)::float8
                     from {s}.copy_units where sync = $1"
                ),
                &[&sync],
            )
            .await?;
        (p.units, p.done, p.elapsed) = (row.get(0), row.get(1), row.get(2));
    }
    // Asked only while a copy is unfinished (status runs every few
    // seconds). Without the source's sync id, whether one runs is unknown:
    // it is not claimed to have stopped.
    if !p.applied
        && p.units > 0
        && let Some(id) = sync_id
    {
        p.running = tgt.query_one(COPY_RUNNING, &[&apply::COPY_LOCK_CLASS, &id]).await?.get(0);
    }
    Ok(p)
}

const PAUSED: &str = "paused: schema changed";

/// Whether a session holds the initial copy's lock (`pg_advisory_lock`
/// of two int4 keys: classid, objid, objsubid 2) in this database.
const COPY_RUNNING: &str = "select exists (select 1 from pg_locks
     where locktype = 'advisory' and granted and classid::int8 = $1::int4
       and objid::int8 = $2::int4 and objsubid = 2
       and database = (select oid from pg_database where datname = current_database()))";

/// Roles that log in on the source (not superusers, not predefined).
const LOGIN_ROLES: &str = "select rolname::text from pg_roles
    where rolcanlogin and not rolsuper and rolname !~ '^pg_' order by 1";

/// Of those, the ones a target has without LOGIN.
const NO_LOGIN: &str = "select rolname::text from pg_roles
    where rolname = any($1) and not rolcanlogin order by 1";

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries(v: PgVersion) -> Vec<crate::pg::NamedQuery> {
    vec![
        crate::pg::NamedQuery::new("status: login roles", LOGIN_ROLES),
        crate::pg::NamedQuery::new("status: roles without login", NO_LOGIN),
        crate::pg::NamedQuery::new("status: the initial copy runs", COPY_RUNNING),
        crate::pg::NamedQuery::new("status: pgleap's lock waits", lock_wait_sql(v)),
    ]
}

/// How long pgleap's apply may wait on a lock before the sync is shown
/// blocked (and status exits 1).
const BLOCKED_AFTER: f64 = 30.0;

/// pgleap's longest lock wait on this database ($1: its application_name):
/// seconds, the relations, the blocking pids.
fn lock_wait_sql(v: PgVersion) -> String {
    let since = if v.has_lock_waitstart() {
        "coalesce((select min(l.waitstart) from pg_locks l
                   where l.pid = a.pid and not l.granted), a.query_start)"
    } else {
        "a.query_start"
    };
    format!(
        "select extract(epoch from now() - {since})::float8,
                coalesce((select string_agg(distinct l.relation::regclass::text, ', ')
                          from pg_locks l where l.pid = a.pid and not l.granted
                            and l.relation is not null), 'an object'),
                array_to_string(pg_blocking_pids(a.pid), ', ')
         from pg_stat_activity a
         where a.datname = current_database() and a.usename = current_user
           and a.application_name = $1 and a.wait_event_type = 'Lock'
           and a.pid <> pg_backend_pid()
         order by 1 desc limit 1"
    )
}

/// What pgleap's sessions on `c` (those of its application_name) wait for,
/// if they wait on a lock: (seconds, text).
async fn lock_wait(c: &Conn) -> Result<Option<(f64, String)>> {
    let row = c.query_qualified(&lock_wait_sql(c.version()), &[&c.application_name()]).await?;
    Ok(row.first().map(|r| {
        let (waited, on, by): (f64, String, String) = (r.get(0), r.get(1), r.get(2));
        let by = if by.is_empty() { String::new() } else { format!(" held by pid {by}") };
        (waited, format!("waiting {waited:.0} s for a lock on {on}{by}"))
    }))
}

/// The phase of a sync whose cutover died half-way.
const UNFINISHED: &str = "cutover unfinished";
const ROLLED_BACK: &str = "rolled back";

/// The phase of a sync whose apply waits on a lock past [`BLOCKED_AFTER`].
const BLOCKED: &str = "blocked";

/// Phases that say the copy stopped with nobody to resume it.
const COPY_INTERRUPTED: &str = "copy interrupted";

/// The phase of one (sync, target).
fn phase(
    cut_over: bool,
    sync: &Sync,
    daemon: bool,
    last: &SyncState,
    copy: Option<&CopyProgress>,
    lag: Option<f64>,
) -> String {
    if cut_over {
        return "cut over".into();
    }
    if sync.paused.is_some() {
        return PAUSED.into();
    }
    let autokick = sync.autokick;
    let Some(copy) = copy else { return "unreachable".into() };
    if last.state == "bad" {
        return "bad".into();
    }
    if !copy.applied && copy.units > 0 && !copy.running {
        // Nobody copies: progress would be a lie.
        let ratio = copy.done as f64 / copy.units as f64 * 100.0;
        return if daemon && autokick {
            format!("copy resuming ({ratio:.0}% done)")
        } else {
            format!(
                "{COPY_INTERRUPTED} ({ratio:.0}% done): nothing is copying; pgleap start, or \
                 rerun the command that started it"
            )
        };
    }
    if !copy.applied && copy.units > 0 && copy.done < copy.units {
        let ratio = copy.done as f64 / copy.units as f64;
        let eta = (copy.done > 0 && copy.elapsed > 0.0)
            .then(|| copy.elapsed / copy.done as f64 * (copy.units - copy.done) as f64);
        return match eta {
            Some(eta) => format!("copying ({:.0}%, ETA {eta:.0}s)", ratio * 100.0),
            None => format!("copying ({:.0}%)", ratio * 100.0),
        };
    }
    if !copy.applied && copy.units > 0 {
        return "building indexes".into();
    }
    if !copy.applied && daemon && autokick {
        // The copy is being planned (or about to be): no lag to speak of.
        return "copy starting".into();
    }
    if !autokick {
        return "paused (autokick off)".into();
    }
    if !daemon {
        return "waiting for daemon".into();
    }
    match lag {
        Some(l) if l <= STREAMING_LAG && copy.applied => "streaming".into(),
        _ => "catching up".into(),
    }
}

/// Status of the named sync, or of every sync; `daemon`: whether the
/// daemon runs.
pub async fn gather(
    catalog: &Catalog,
    only: Option<&str>,
    daemon: bool,
    env: Env<'_>,
) -> Result<Vec<SyncStatus>> {
    let syncs = match only {
        Some(name) => vec![catalog.sync(name)?],
        None => catalog.syncs()?,
    };
    let mut out = Vec::new();
    for sync in syncs {
        let route = SyncRoute::resolve(catalog, sync)?;
        let sync = &route.sync;
        let source = route.source.name.clone();
        let record = if sync.retired { catalog.last_cutover(&sync.name)? } else { None };
        let cut_over = record.is_some();
        // Of several targets, the one the application moved to.
        let switched_to = record.as_ref().and_then(|r| r.target.clone());
        let back_sync = catalog.rollback_sync_of(&sync.name)?;
        // Moved back with `rollback`: the sync back was cut over in turn,
        // and the application writes to this sync's source again.
        let rolled_back = match &back_sync {
            Some(back)
                if cut_over
                    && catalog.sync(back).is_ok_and(|b| b.retired)
                    && catalog.was_cut_over(back)? =>
            {
                Some(back.clone())
            }
            _ => None,
        };
        let mut states = catalog.sync_states(&sync.name)?;
        // A cutover under way, or left unfinished by a process that died:
        // it says so whatever else the sync shows.
        let cutting = catalog.cutover_progress(&sync.name)?.map(|p| {
            if p.running() {
                format!("cutting over (pid {})", p.pid)
            } else if p.step == "switched" {
                format!(
                    "{UNFINISHED}: past its switch point, foreign keys not validated; pgleap \
                     cutover {} finishes it",
                    sync.name
                )
            } else {
                format!(
                    "{UNFINISHED}: the source may refuse writes since {}; pgleap cutover {} \
                     undoes the fence and cuts over again",
                    p.started_at, sync.name
                )
            }
        });
        if cut_over {
            for s in &mut states {
                s.state = if rolled_back.is_some() { ROLLED_BACK } else { "cut over" }.into();
            }
        }
        let live = async {
            let mut src = route.source.connect(env).await?;
            let plan = Plan::load(&src, sync, &route.relgroup).await?;
            // A cut-over sync follows nothing any more: what its capture
            // still records (writes the application makes after a
            // rollback) is no lag, and not read.
            let mut pending = Vec::new();
            for target in route.targets.iter().filter(|_| !cut_over) {
                pending.push(apply::pending(&src, &plan, &target.name).await?);
            }
            let not_captured =
                crate::evolve::not_captured(&src, &route.relgroup, &sync.capture_schema).await?;
            let logins: Vec<String> =
                src.query(LOGIN_ROLES, &[]).await?.iter().map(|r| r.get(0)).collect();
            let decoding = match &plan.decoding {
                Some(stream) => Some(crate::decoding::slot_state(&src, stream).await?),
                None => None,
            };
            // What the slot holds and no pump read yet is pending too, for
            // every target.
            if let Some(stream) = plan.decoding.as_ref().filter(|_| !cut_over)
                && let Some(unread) =
                    crate::decoding::unread(&mut src, stream, plan.sync_id).await?
            {
                for (n, lag) in &mut pending {
                    *n += unread.changes;
                    if unread.changes > 0 {
                        *lag = lag.max(unread.oldest);
                    }
                }
            }
            Ok::<_, crate::Error>((src, plan, pending, (not_captured, logins, decoding)))
        };
        let live = tokio::time::timeout(STATUS_WAIT, live).await;
        let (live, pending, source_error, (mut not_captured, logins, decoding)) = match live {
            Ok(Ok((src, plan, pending, read))) => (Some((src, plan)), Some(pending), None, read),
            Ok(Err(e)) => (None, None, Some(e.to_string()), Default::default()),
            Err(_) => (None, None, Some(format!("{source}: {}", no_answer())), Default::default()),
        };
        let tables = live.as_ref().map_or_else(Vec::new, |(_, plan)| {
            plan.tables.iter().map(|t| t.display.clone()).collect()
        });
        let mut targets = Vec::new();
        for (i, db) in route.targets.iter().enumerate() {
            let target = db.name.as_str();
            let last = states.iter().find(|s| s.target == target).cloned().unwrap_or_else(|| {
                SyncState { target: target.to_string(), state: "new".into(), ..Default::default() }
            });
            // One connection per target: copy progress, and its partitions
            // against the source's.
            let read = async {
                let tgt = db.connect(env).await?;
                let sync_id = live.as_ref().map(|(_, plan)| plan.sync_id);
                let copy = copy_progress(&tgt, &sync.capture_schema, &sync.name, sync_id).await?;
                let mut missing = Vec::new();
                if let Some((src, plan)) = &live
                    && let Ok(m) = crate::evolve::missing_partitions(src, &tgt, plan).await
                {
                    missing = m;
                }
                let waiting = lock_wait(&tgt).await?;
                let answered = (tgt.address(), tgt.version().to_string());
                let no_login: Vec<String> =
                    tgt.query(NO_LOGIN, &[&logins]).await?.iter().map(|r| r.get(0)).collect();
                Ok::<_, crate::Error>((copy, missing, waiting, answered, no_login))
            };
            let (copy, target_error, waiting, answered, roles_without_login) =
                match tokio::time::timeout(STATUS_WAIT, read).await {
                    Ok(Ok((copy, missing, waiting, answered, no_login))) => {
                        not_captured.extend(missing);
                        (Some(copy), None, waiting, Some(answered), no_login)
                    }
                    Ok(Err(e)) => (None, Some(e.to_string()), None, None, Vec::new()),
                    Err(_) => {
                        (None, Some(format!("{target}: {}", no_answer())), None, None, Vec::new())
                    }
                };
            let blocked = waiting.as_ref().filter(|(s, _)| *s > BLOCKED_AFTER).map(|(_, w)| w);
            let lag = pending.as_ref().and_then(|p| p.get(i)).map(|p| p.1);
            targets.push(TargetStatus {
                // From the open connection; resolved again (the password
                // file read) only for a server that did not answer.
                address: answered
                    .as_ref()
                    .map(|a| a.0.clone())
                    .or_else(|| db.resolve(env).ok().map(|r| r.to_string())),
                version: answered.map(|a| a.1),
                copied: copy.as_ref().is_some_and(|c| c.applied),
                copy_ratio: copy
                    .as_ref()
                    .filter(|c| c.units > 0)
                    .map(|c| if c.applied { 1.0 } else { c.done as f64 / c.units as f64 }),
                target: target.to_string(),
                phase: match (&cutting, blocked) {
                    (Some(c), _) => c.clone(),
                    (None, Some(w)) if !cut_over => format!("{BLOCKED}: {w}"),
                    _ if let Some(back) = &rolled_back => format!(
                        "{ROLLED_BACK}: writes go to {source} again; to move again, remove both \
                         syncs (pgleap teardown {name}, then pgleap teardown {back} --unfence, \
                         which lets {target} take writes again), fix what made you roll back, \
                         and copy again: pgleap sync add NEW --relgroup {rg} --dbgroup {dg} \
                         --onetimecopy always (it replaces {target}'s rows), then cut over NEW",
                        name = sync.name,
                        rg = sync.relgroup,
                        dg = sync.dbgroup,
                    ),
                    _ => phase(cut_over, sync, daemon, &last, copy.as_ref(), lag),
                },
                waiting: waiting.map(|(_, w)| w),
                last,
                pending: pending.as_ref().and_then(|p| p.get(i)).map(|p| p.0),
                writes_go_to: cut_over.then(|| match (&rolled_back, &switched_to) {
                    (Some(_), _) => source.clone(),
                    (None, Some(to)) => to.clone(),
                    (None, None) => target.to_string(),
                }),
                lag_seconds: lag,
                target_error,
                roles_without_login,
            });
        }
        out.push(SyncStatus {
            name: sync.name.clone(),
            source,
            relgroup: sync.relgroup.clone(),
            autokick: sync.autokick,
            onetimecopy: sync.onetimecopy.as_str().into(),
            large_objects: route.relgroup.large_objects,
            lo_interval: sync.lo_interval,
            tables,
            targets,
            source_error,
            paused: sync.paused.clone(),
            not_captured,
            source_address: match &live {
                Some((src, _)) => Some(src.address()),
                None => route.source.resolve(env).ok().map(|r| r.to_string()),
            },
            source_version: live.as_ref().map(|(src, _)| src.version().to_string()),
            write_downtime_ms: record.as_ref().map(|r| r.fence_ms),
            cut_over_at: record.map(|r| r.at),
            rollback_sync: back_sync,
            rollback_of: catalog.rollback_for(&sync.name)?,
            decoding,
            not_ready: Vec::new(),
        });
    }
    for s in &mut out {
        s.not_ready = not_ready(s, DEFAULT_MAX_LAG);
    }
    Ok(out)
}

/// The lag a cutover accepts unless told (`ready --max-lag`, `cutover
/// --max-lag`).
pub const DEFAULT_MAX_LAG: f64 = 5.0;

/// Why `sync` cannot be cut over now (nothing: it can).
pub fn not_ready(sync: &SyncStatus, max_lag: f64) -> Vec<String> {
    let mut reasons = Vec::new();
    if let Some(e) = &sync.source_error {
        reasons.push(format!("the source cannot be read: {e}"));
    }
    for t in &sync.targets {
        let name = &t.target;
        match t.phase.as_str() {
            "cut over" => reasons.push(format!("it was cut over to {name} already")),
            p if p.starts_with(ROLLED_BACK) => {
                reasons.push(format!("it was cut over to {name} and rolled back: {p}"))
            }
            "bad" => reasons.push(format!(
                "the last round to {name} failed: {}",
                t.last.last_error.as_deref().unwrap_or("see pgleap status")
            )),
            PAUSED => reasons.push(format!(
                "it is paused: {}",
                sync.paused.as_deref().unwrap_or("a schema change")
            )),
            "unreachable" => reasons.push(format!(
                "{name} cannot be read: {}",
                t.target_error.as_deref().unwrap_or("see pgleap status")
            )),
            p if p.starts_with(BLOCKED) => reasons.push(format!("the apply to {name} is {p}")),
            p if p.starts_with(UNFINISHED) || p.starts_with("cutting over") => {
                reasons.push(format!("its {p}"))
            }
            p if p.starts_with("copy") || p == "building indexes" => {
                reasons.push(format!("the initial copy to {name} is not done ({p})"))
            }
            _ if !t.copied => reasons.push(format!(
                "nothing was applied to {name} yet: its initial copy has not run (pgleap start)"
            )),
            _ => {}
        }
        match t.lag_seconds {
            Some(lag) if lag > max_lag => {
                reasons.push(format!("{name} is {lag:.1} s behind (at most {max_lag:.0} s)"))
            }
            None => reasons.push(format!("the lag of {name} cannot be read")),
            _ => {}
        }
    }
    reasons
}
