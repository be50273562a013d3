//! The whole job in one command: preflight, catalog entries, schema,
//! capture, initial copy, sync, verify, cutover.
//!
//! Every step is one of the commands a user could run by hand, and every
//! step first checks whether it is already done, so rerunning `upgrade`
//! after an interruption resumes where it stopped (the initial copy itself
//! resumes by parts). Preflight writes nothing: a refusal leaves no catalog
//! entry and no server object behind.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::catalog::{Catalog, CatalogError, OneTimeCopy};
use crate::error::{Error, Result};
use crate::inventory::{self, Selection, display_name};
use crate::objects::{self, DbSpec, SyncSpec};
use crate::pg::{Conn, ConnParams, Env, NamedQuery, PasswordSource, ResolvedConn, Sql};
use crate::route::{DbConn, SyncRoute};
use crate::session::Session;
use crate::{cutover, fidelity, schema, verify};

/// Copy speed assumed for the estimate, from docs/BENCHMARKS.md (2 cores).
const ASSUMED_MB_PER_S: f64 = 40.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutoverMode {
    Prompt,
    Auto,
    Never,
}

#[derive(Clone)]
pub struct UpgradeOptions {
    pub name: String,
    pub source: ConnParams,
    pub target: ConnParams,
    pub jobs: usize,
    pub cutover: CutoverMode,
    pub max_lag: Duration,
    /// How the application moves at the cutover.
    pub switch: crate::switch::SwitchPlan,
    /// Where pg_dump and pg_restore are, if not found by themselves.
    pub pg_bin: Option<std::path::PathBuf>,
    /// Create the roles the source's grants and policies name (NOLOGIN).
    pub create_roles: bool,
    /// Cut over even with schema objects missing on the target.
    pub allow_schema_differences: bool,
    /// Replace rows the target's tables hold before the first run.
    pub overwrite_target: bool,
    /// Arm a sync back to the old server inside the fence (`NAME_back`),
    /// so that `pgleap rollback NAME` can move the application back.
    pub rollback: bool,
    /// Capture keyed tables with row triggers (`--trigger-level row`).
    pub row_triggers: bool,
    /// How keyed tables are captured (sync add --capture).
    pub capture: crate::decoding::Method,
}

#[derive(Debug, Serialize)]
pub struct Preflight {
    pub source_version: String,
    pub target_version: String,
    pub tables: usize,
    pub sequences: usize,
    pub keyless: Vec<String>,
    pub not_owned: Vec<String>,
    pub missing_extensions: Option<String>,
    pub source_can_create_schema: bool,
    pub target_can_create_schema: bool,
    pub target_replica_role: bool,
    pub size_bytes: i64,
    pub estimated_copy_seconds: f64,
    /// Large objects on the source, and how many of them (with the first
    /// oids) the role cannot read, so cannot copy.
    pub large_objects: bool,
    pub unreadable_large_objects: i64,
    pub unreadable_large_object_oids: Vec<u32>,
    /// How many of the source's tables the target has already (a schema
    /// restored beforehand has all of them; schema copy needs none).
    pub target_tables: usize,
    /// Tables the target has with other columns than the source's.
    pub mismatched_tables: Vec<String>,
    /// Why the target refuses writes (another migration's fence), if it
    /// does.
    pub target_fenced: Option<String>,
    /// Tables of the target that hold rows before the first run, with
    /// their row counts (capped): the initial copy would replace them.
    pub target_rows: Vec<(String, i64)>,
    #[serde(skip)]
    pub overwrite_target: bool,
    /// The pg_dump that will copy the schema (when the target has none of
    /// the tables), or why there is none.
    pub pg_dump: Option<String>,
    #[serde(skip)]
    pub tools_problem: Option<String>,
    /// Roles the source's grants, policies and settings name that the
    /// target lacks.
    pub missing_roles: Vec<String>,
    /// Tables with forced row security the role cannot read whole.
    pub forced_row_security: Vec<String>,
    /// Functions the schema copy cannot create as this role (C or an
    /// untrusted language), when pgleap copies the schema.
    pub untrusted_functions: Vec<String>,
    /// How keyed tables will be captured (`--capture`), and why not by
    /// decoding where it is not available.
    pub capture: String,
    /// `--capture decoding` where the source does not allow it: why.
    #[serde(skip)]
    pub decoding_refused: Option<String>,
}

impl Preflight {
    /// Why the job cannot work, if it cannot.
    pub fn refusal(&self) -> Option<Error> {
        let mut problems = Vec::new();
        if let Some(m) = &self.missing_extensions {
            problems.push(m.clone());
        }
        if !self.not_owned.is_empty() {
            problems.push(format!(
                "the role does not own {}: its triggers cannot be created",
                self.not_owned.join(", ")
            ));
        }
        if !self.source_can_create_schema {
            problems.push("the role may not create a schema in the source database".into());
        }
        if !self.target_can_create_schema {
            problems.push("the role may not create a schema in the target database".into());
        }
        if self.target_tables > 0 && self.target_tables < self.tables {
            problems.push(format!(
                "the target has {} of the source's {} tables: it needs all of them (a schema \
                 restored beforehand) or none (pgleap copies the schema)",
                self.target_tables, self.tables
            ));
        }
        if let Some(p) = &self.tools_problem {
            problems.push(p.clone());
        }
        if let Some(why) = &self.decoding_refused {
            problems.push(format!("--capture decoding: {why}"));
        }
        if let Some(f) = &self.target_fenced {
            problems.push(f.clone());
        }
        if !self.target_rows.is_empty() && !self.overwrite_target {
            let named: Vec<String> = self
                .target_rows
                .iter()
                .map(|(t, n)| format!("{t} ({})", objects::rows_text(*n)))
                .collect();
            problems.push(format!(
                "the target's tables hold rows, which the initial copy would replace: {}; check \
                 --target (is it the new server?), or pass --overwrite-target to replace them",
                named.join(", ")
            ));
        }
        if !self.mismatched_tables.is_empty() {
            problems.push(format!(
                "tables on the target have other columns than on the source: {}",
                self.mismatched_tables.join("; ")
            ));
        }
        if !self.untrusted_functions.is_empty() {
            problems.push(format!(
                "the schema has functions only a superuser can create on the target: {}; have an \
                 administrator restore the schema (pg_dump --schema-only | psql) before the \
                 upgrade, which then copies only the data",
                self.untrusted_functions.join(", ")
            ));
        }
        if !self.forced_row_security.is_empty() {
            problems.push(format!(
                "row level security is forced on {} and applies to the role, which would read \
                 only the rows its policies let through: the role needs BYPASSRLS (ALTER ROLE \
                 ... BYPASSRLS, run by a superuser) for the move",
                self.forced_row_security.join(", ")
            ));
        }
        if problems.is_empty() {
            return None;
        }
        Some(Error::invalid(
            format!("preflight: {}", problems.join("; ")),
            "fix what is named (grant table ownership, CREATE on the databases, the extensions \
             on the target; drop or fix the target's tables) and run upgrade again; nothing was \
             created",
        ))
    }
}

/// `created`: the target database does not exist yet and will be created
/// by the role (a server move); `opts.target` then names a stand-in on the
/// target server with what the new database will start from (template1).
async fn preflight(
    opts: &UpgradeOptions,
    resuming: bool,
    created: bool,
    env: Env<'_>,
) -> Result<Preflight> {
    let none = PasswordSource::default();
    let src = Conn::connect("source", &opts.source, &none, env).await?;
    let tgt = Conn::connect("target", &opts.target, &none, env).await?;
    if tgt.version().major() < src.version().major() {
        return Err(Error::invalid(
            format!(
                "the target runs PostgreSQL {} and the source {}: that is a downgrade",
                tgt.version(),
                src.version()
            ),
            "upgrade moves to the same or a newer major",
        ));
    }
    crate::objects::check_supported_source(&src)?;
    crate::objects::check_same_encoding(&src, &tgt)?;
    if crate::objects::fingerprint(&src).await? == crate::objects::fingerprint(&tgt).await? {
        return Err(Error::invalid(
            "the source and the target are the same database on the same server",
            "point --target at the new server; nothing was created",
        ));
    }
    let sel = Selection { all_tables: true, all_sequences: true, ..Default::default() };
    let relations = inventory::resolve(&src, &sel).await?;
    let tables: Vec<_> = relations.iter().filter(|r| r.kind != "sequence").collect();
    let names: Vec<String> =
        tables.iter().map(|r| crate::pg::qualified(&r.schema, &r.name)).collect();
    let not_owned: Vec<String> =
        src.query(NOT_OWNED, &[&names]).await?.iter().map(|r| r.get(0)).collect();
    let can_create = CAN_CREATE;
    let source_can_create_schema: bool = src.query_one(can_create, &[]).await?.get(0);
    // The role owns a database it creates.
    let target_can_create_schema: bool = created || tgt.query_one(can_create, &[]).await?.get(0);
    let target_replica_role = tgt
        .batch_execute("begin; set local session_replication_role = replica; rollback")
        .await
        .is_ok();
    if !target_replica_role {
        let _ = tgt.batch_execute("rollback").await;
    }
    let missing_extensions = match schema::check_extensions(&src, &tgt).await {
        Ok(()) => None,
        Err(e) => Some(match e.hint() {
            Some(hint) => format!("{e} ({hint})"),
            None => e.to_string(),
        }),
    };
    let size_bytes: i64 = tables.iter().map(|r| r.est_bytes).sum();
    let named: Vec<(String, String)> = tables
        .iter()
        .map(|r| (crate::pg::qualified(&r.schema, &r.name), display_name(&r.schema, &r.name)))
        .collect();
    let (present, mismatched_tables) = compare_tables(&src, &tgt, &named).await?;
    let target_fenced = match crate::target::check_not_fenced(&tgt, &present).await {
        Ok(()) => None,
        Err(Error::Invalid { message, .. }) => Some(message),
        Err(e) => return Err(e),
    };
    // A rerun resumes its own copy: the rows are pgleap's.
    let target_rows = if resuming {
        Vec::new()
    } else {
        let shown =
            |q: &str| named.iter().find(|(t, _)| t == q).map_or(q.to_string(), |t| t.1.clone());
        let rows = objects::tables_with_rows(&tgt, &present).await?;
        rows.into_iter().map(|(t, n)| (shown(&t), n)).collect()
    };
    // Checked before anything is written: the schema copy needs a pg_dump
    // at least as new as the source.
    let (pg_dump, tools_problem) = if present.is_empty() {
        match crate::dump::tools_for(&src, &tgt, opts.pg_bin.as_deref()).await {
            Ok(t) => (Some(t.describe()), None),
            Err(e) => (None, Some(format!("{e} ({})", e.hint().unwrap_or_default()))),
        }
    } else {
        (None, None)
    };
    let scope = fidelity::Scope { exclude: vec!["pgleap".into()], ..Default::default() };
    let missing_roles = fidelity::missing_roles(&src, &tgt, &scope).await?;
    let forced_row_security = fidelity::forced_row_security(&src).await?;
    let target_is_superuser: bool = tgt.query_one(IS_SUPERUSER, &[]).await?.get(0);
    let untrusted_functions = if present.is_empty() && !target_is_superuser {
        fidelity::untrusted_functions(&src, &scope).await?
    } else {
        Vec::new()
    };
    let large_objects = crate::large_objects::any(&src).await?;
    let (unreadable_large_objects, unreadable_large_object_oids) =
        crate::large_objects::unreadable(&src).await?;
    let (capture, decoding_refused) = crate::decoding::preflight(&src, opts.capture).await?;
    Ok(Preflight {
        capture,
        decoding_refused,
        source_version: src.version().to_string(),
        target_version: tgt.version().to_string(),
        tables: tables.len(),
        sequences: relations.len() - tables.len(),
        keyless: tables
            .iter()
            .filter(|r| r.key_columns.is_empty())
            .map(|r| display_name(&r.schema, &r.name))
            .collect(),
        not_owned,
        missing_extensions,
        source_can_create_schema,
        target_can_create_schema,
        target_replica_role,
        size_bytes,
        estimated_copy_seconds: size_bytes as f64 / 1e6 / ASSUMED_MB_PER_S,
        large_objects,
        unreadable_large_objects,
        unreadable_large_object_oids,
        target_tables: present.len(),
        mismatched_tables,
        target_rows,
        target_fenced,
        overwrite_target: opts.overwrite_target,
        pg_dump,
        tools_problem,
        missing_roles,
        forced_row_security,
        untrusted_functions,
    })
}

/// Which of `tables` (quoted names, and names as shown) the target has,
/// and those of them whose columns (names and types, in order) differ from
/// the source's.
async fn compare_tables(
    src: &Conn,
    tgt: &Conn,
    tables: &[(String, String)],
) -> Result<(Vec<String>, Vec<String>)> {
    let columns = TABLE_COLUMNS;
    let quoted: Vec<&str> = tables.iter().map(|(q, _)| q.as_str()).collect();
    let read = |rows: Vec<tokio_postgres::Row>| -> Vec<(String, Option<String>)> {
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    let on_source = read(src.query(columns, &[&quoted]).await?);
    let on_target = read(tgt.query(columns, &[&quoted]).await?);
    let shown =
        |q: &str| tables.iter().find(|(t, _)| t == q).map_or(q.to_string(), |t| t.1.clone());
    let mut mismatched = Vec::new();
    for (table, cols) in &on_target {
        let source = on_source.iter().find(|(t, _)| t == table).and_then(|(_, c)| c.clone());
        if source != *cols {
            mismatched.push(format!(
                "{} (target: {}; source: {})",
                shown(table),
                cols.as_deref().unwrap_or("no columns"),
                source.as_deref().unwrap_or("no columns")
            ));
        }
    }
    Ok((on_target.into_iter().map(|(t, _)| t).collect(), mismatched))
}

/// One step of a run: what a rehearsal tells of a production move.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: String,
    pub seconds: f64,
    /// Of the whole run's time, 0 to 1.
    pub share: f64,
}

/// The steps a timer recorded, with their shares.
pub(crate) fn steps_of(clock: &cutover::Timer) -> Vec<Step> {
    let total: i64 = clock.steps.iter().map(|s| s.ms).sum();
    clock
        .steps
        .iter()
        .map(|s| Step {
            step: s.step.to_string(),
            seconds: s.ms as f64 / 1000.0,
            share: if total > 0 { s.ms as f64 / total as f64 } else { 0.0 },
        })
        .collect()
}

/// What happened, for the final report.
#[derive(Debug, Serialize)]
pub struct UpgradeReport {
    pub preflight: Preflight,
    pub cutover: Option<cutover::CutoverReport>,
    /// Each step, how long it took and its share of the whole run.
    pub steps: Vec<Step>,
    /// What to do next.
    pub next: Vec<String>,
}

/// Runs the job; `say` reports each step, `confirm` asks before a cutover
/// in prompt mode.
pub async fn upgrade(
    catalog: &mut Catalog,
    opts: &UpgradeOptions,
    say: &dyn Fn(&str),
    confirm: fn(&str) -> bool,
    env: Env<'_>,
) -> Result<UpgradeReport> {
    let mut clock = cutover::Timer::new();
    let resuming = catalog.sync(&opts.name).is_ok();
    let pre = step_preflight(opts, resuming, false, say, env).await?;
    clock.lap("preflight");
    let Prepared { route, mut session, differing } =
        prepare(catalog, opts, say, &mut clock, env).await?;
    let name = &opts.name;
    let go = match opts.cutover {
        CutoverMode::Auto => differing.is_empty(),
        CutoverMode::Never => false,
        CutoverMode::Prompt if differing.is_empty() => {
            let (pending, lag) = session.pending().await?;
            let question = format!(
                "cut over now? writes to the source stop (lag {lag:.1} s, {pending} keys \
                 pending; the sync goes on while you decide)"
            );
            let yes =
                ask_while_following(catalog, &mut [&mut session], question, confirm, env).await?;
            clock.lap("waiting for the answer");
            yes
        }
        CutoverMode::Prompt => false,
    };
    if !differing.is_empty() {
        return Err(Error::Differences { sync: name.clone(), tables: differing.len(), objects: 0 });
    }
    let cut = if go {
        let copts = cutover::CutoverOptions {
            max_lag: opts.max_lag,
            terminate: false,
            sequence_margin: 0,
            dry_run: false,
            rollback_sync: opts.rollback.then(|| format!("{name}_back")),
            switch: opts.switch.clone(),
            lift_fence: None,
            allow_schema_differences: opts.allow_schema_differences,
            // Verify compared every row just now; a prompt may have
            // waited for hours since.
            rows_compared: matches!(opts.cutover, CutoverMode::Auto),
            to: None,
            keep_others: None,
        };
        let report =
            cutover::cutover_with(catalog, &route, &mut session, &mut [], &copts, env).await?;
        clock.lap("cutover");
        Some(report)
    } else {
        // Nothing may stop following the source: without the daemon the
        // target falls behind from here on.
        let following = match crate::daemon::running_pid(catalog.path()) {
            Some(pid) => format!("the daemon (pid {pid}) follows the source"),
            None => {
                let pid = crate::daemon::start_detached(
                    catalog.path(),
                    &crate::daemon::listen_setting(),
                )?;
                format!("started the daemon (pid {pid}): it follows the source")
            }
        };
        say(&format!(
            "the sync is in place and {following}; pgleap status {name} shows the lag; \
             pgleap cutover {name} when ready"
        ));
        None
    };
    let next = match &cut {
        Some(_) if opts.switch.bouncers.is_empty() && opts.switch.command.is_none() => vec![
            format!(
                "point the application at the new server (pgleap db show {name}_target); the \
                 old one refuses writes with an error naming it"
            ),
            format!(
                "pgleap teardown {name} removes pgleap's objects (the old server stays fenced)"
            ),
        ],
        Some(_) => vec![
            "the application already writes to the new server".into(),
            format!(
                "pgleap teardown {name} removes pgleap's objects (the old server stays fenced)"
            ),
        ],
        None => vec![
            format!("pgleap ready {name} says when a cutover can start"),
            format!("pgleap cutover {name} switches (add --pgbouncer or --switch-command)"),
        ],
    };
    Ok(UpgradeReport { preflight: pre, cutover: cut, steps: steps_of(&clock), next })
}

/// One database brought to "verified and following": the route, the
/// session that goes on applying, and the tables verify found different.
pub(crate) struct Prepared {
    pub route: SyncRoute,
    pub session: Session,
    pub differing: Vec<String>,
}

/// Every step after preflight and before the cutover: catalog entries,
/// schema, capture, initial copy and catch-up, verify. Each step first
/// checks whether it is done, so a rerun resumes.
pub(crate) async fn prepare(
    catalog: &mut Catalog,
    opts: &UpgradeOptions,
    say: &dyn Fn(&str),
    clock: &mut cutover::Timer,
    env: Env<'_>,
) -> Result<Prepared> {
    let name = &opts.name;
    let (source, target) = step_declare(catalog, opts, say, env).await?;
    step_schema(catalog, name, &source, &target, opts, say, env).await?;
    clock.lap("catalog and schema");
    step_capture(catalog, opts, say, env).await?;
    clock.lap("capture");
    let route = SyncRoute::load(catalog, name)?;
    let mut session = step_copy(catalog, &route, opts.jobs, say, env).await?;
    clock.lap("initial copy and catch-up");
    let differing = step_verify(&mut session, say, env).await?;
    clock.lap("verify");
    Ok(Prepared { route, session, differing })
}

/// Asks `question`, applying the sources' changes to every session while
/// it waits (the lag stays where it was, and the cutover that follows
/// drains seconds, not the think time).
pub(crate) async fn ask_while_following(
    catalog: &mut Catalog,
    sessions: &mut [&mut Session],
    question: String,
    confirm: fn(&str) -> bool,
    env: Env<'_>,
) -> Result<bool> {
    let answer = tokio::task::spawn_blocking(move || confirm(&question));
    while !answer.is_finished() {
        for session in sessions.iter_mut() {
            let until = session.source_snapshot().await?;
            let round = Some(Instant::now() + Duration::from_secs(60));
            if let Err(e) = session.catch_up(catalog, &until, round, env).await {
                tracing::warn!("applying while asking: {e}");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(answer.await.unwrap_or(false))
}

/// Reports what the servers hold and refuses what cannot work, before
/// anything is written.
pub(crate) async fn step_preflight(
    opts: &UpgradeOptions,
    resuming: bool,
    created: bool,
    say: &dyn Fn(&str),
    env: Env<'_>,
) -> Result<Preflight> {
    if resuming {
        say(&format!(
            "resuming: upgrade \"{}\" was started before; its steps done are kept",
            opts.name
        ));
    }
    let pre = preflight(opts, resuming, created, env).await?;
    say(&format!(
        "preflight: PostgreSQL {} -> {}; {} tables, {} sequences, {:.1} MB, copy in about {:.0} s; \
         target triggers and foreign keys during sync: {}",
        pre.source_version,
        pre.target_version,
        pre.tables,
        pre.sequences,
        pre.size_bytes as f64 / 1e6,
        pre.estimated_copy_seconds,
        if pre.target_replica_role { "off by replica role" } else { "set aside until cutover" }
    ));
    say(&format!("preflight: capture by {}", pre.capture));
    if !pre.keyless.is_empty() {
        say(&format!(
            "preflight: {} table(s) without a usable key, replicated by whole rows: {}",
            pre.keyless.len(),
            pre.keyless.join(", ")
        ));
    }
    if let Some(tools) = &pre.pg_dump {
        say(&format!("preflight: the schema is copied with {tools}"));
    }
    if pre.unreadable_large_objects > 0 {
        let oids: Vec<String> =
            pre.unreadable_large_object_oids.iter().map(|o| o.to_string()).collect();
        say(&format!(
            "preflight: {} large object(s) the role cannot read are not migrated (oids {}{}); \
             grant SELECT on them (GRANT SELECT ON LARGE OBJECT ...) or run as their owner",
            pre.unreadable_large_objects,
            oids.join(", "),
            if pre.unreadable_large_objects > oids.len() as i64 { ", ..." } else { "" }
        ));
    }
    if !pre.missing_roles.is_empty() {
        let what = if opts.create_roles {
            "created NOLOGIN without a password (--create-roles)".to_string()
        } else {
            let commands: Vec<String> =
                pre.missing_roles.iter().map(|r| fidelity::create_role_sql(r, false)).collect();
            format!(
                "their grants and policies are not created unless they exist: run on the target \
                 {}; (or pass --create-roles)",
                commands.join("; ")
            )
        };
        say(&format!(
            "preflight: the target lacks role(s) {}: {what}",
            pre.missing_roles.join(", ")
        ));
    }
    if let Some(e) = pre.refusal() {
        return Err(e);
    }
    Ok(pre)
}

/// The catalog entries: both databases, the relgroup of every table and
/// sequence, the dbgroup. Returns the source's and target's connections.
async fn step_declare(
    catalog: &mut Catalog,
    opts: &UpgradeOptions,
    say: &dyn Fn(&str),
    env: Env<'_>,
) -> Result<(DbConn, DbConn)> {
    let name = &opts.name;
    let (source, target) = (format!("{name}_source"), format!("{name}_target"));
    // A rerun resumes the same job: entries left by a run against other
    // servers are refused before anything is written.
    for (db, params) in [(&source, &opts.source), (&target, &opts.target)] {
        if catalog.db(db).is_ok() {
            let known = DbConn::from_catalog(catalog, db)?.resolve(env)?.to_string();
            let given = ResolvedConn::resolve(params, &PasswordSource::default(), env)
                .map_err(|source| crate::pg::PgError::Resolve { db: db.clone(), source })?
                .to_string();
            if known != given {
                return Err(Error::invalid(
                    format!(
                        "upgrade \"{name}\" was started with database \"{db}\" at {known}, \
                         not {given}"
                    ),
                    format!(
                        "use another --name for these servers, or remove the earlier run \
                         (pgleap teardown {name}, then pgleap db remove {db} --force)"
                    ),
                ));
            }
        }
    }
    for (db, params) in [(&source, &opts.source), (&target, &opts.target)] {
        if catalog.db(db).is_err() {
            let spec =
                DbSpec { params: params.clone(), password_file: None, store_password: false };
            objects::add_db(catalog, db, spec, env).await?;
            say(&format!("added database \"{db}\""));
        }
    }
    if catalog.relgroup(name).is_err() {
        let sel = Selection { all_tables: true, all_sequences: true, ..Default::default() };
        objects::add_relgroup(catalog, name, &source, &sel, env).await?;
        say(&format!("added relgroup \"{name}\" (every table and sequence)"));
    }
    if catalog.dbgroup(name).is_err() {
        objects::add_dbgroup(
            catalog,
            name,
            &[format!("{source}:source"), format!("{target}:target")],
        )?;
    }
    Ok((DbConn::from_catalog(catalog, &source)?, DbConn::from_catalog(catalog, &target)?))
}

/// The target's schema, unless its first table is there already.
async fn step_schema(
    catalog: &Catalog,
    name: &str,
    source: &DbConn,
    target: &DbConn,
    opts: &UpgradeOptions,
    say: &dyn Fn(&str),
    env: Env<'_>,
) -> Result<()> {
    let (pg_bin, create_roles) = (opts.pg_bin.as_deref(), opts.create_roles);
    let relgroup = catalog.relgroup(name)?;
    if let Some(m) = relgroup.members.iter().find(|m| m.kind != "sequence") {
        let tgt = target.connect(env).await?;
        if tgt.relation_exists(&crate::pg::qualified(&m.schema, &m.name)).await? {
            // A schema restored beforehand: the roles are still wanted.
            if create_roles {
                let src = source.connect(env).await?;
                let scope =
                    fidelity::Scope { exclude: vec!["pgleap".into()], ..Default::default() };
                for role in schema::create_missing_roles(&src, &tgt, &scope).await? {
                    say(&format!("created role {role} on the target (NOLOGIN, no password)"));
                }
            }
            return Ok(());
        }
    } else {
        return Ok(());
    }
    let job = schema::SchemaCopy {
        source,
        target,
        schemas: &[],
        pg_bin,
        exclude_schema: "pgleap",
        create_roles,
    };
    let copied = schema::copy_pre_data(&job, env).await?;
    say("copied the schema (indexes follow the data; foreign keys and triggers at cutover)");
    for line in copied.lines() {
        say(&line);
    }
    Ok(())
}

/// The sync, and with it capture on the source; refuses a finished run.
async fn step_capture(
    catalog: &mut Catalog,
    opts: &UpgradeOptions,
    say: &dyn Fn(&str),
    env: Env<'_>,
) -> Result<()> {
    let name = &opts.name;
    match catalog.sync(name) {
        Ok(s) if s.retired => Err(Error::invalid(
            format!("upgrade \"{name}\" was already cut over"),
            format!(
                "pgleap teardown {name} removes what is left; use another --name for a new run"
            ),
        )),
        Ok(_) => Ok(()),
        Err(CatalogError::NotFound { .. }) => {
            let spec = SyncSpec {
                name: name.to_string(),
                relgroup: name.to_string(),
                dbgroup: name.to_string(),
                onetimecopy: OneTimeCopy::Always,
                autokick: true,
                allow_downgrade: false,
                capture_schema: "pgleap".into(),
                lo_interval: 10,
                row_triggers: opts.row_triggers,
                capture: opts.capture,
            };
            objects::add_sync(catalog, &spec, env).await?;
            say("installed change capture on the source");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The initial copy (resumed by parts) and the catch-up after it, on the
/// session that verify and cutover go on using.
async fn step_copy(
    catalog: &mut Catalog,
    route: &SyncRoute,
    jobs: usize,
    say: &dyn Fn(&str),
    env: Env<'_>,
) -> Result<Session> {
    say("initial copy and catch-up ...");
    let deadline = Some(Instant::now() + Duration::from_secs(24 * 3600));
    let target = route.sole_target()?;
    let mut session = Session::open_retrying(catalog, route, target, jobs, deadline, env).await?;
    let until = session.source_snapshot().await?;
    session.catch_up(catalog, &until, deadline, env).await?;
    Ok(session)
}

/// Compares every table at one consistent point; returns the differing.
async fn step_verify(
    session: &mut Session,
    say: &dyn Fn(&str),
    env: Env<'_>,
) -> Result<Vec<String>> {
    let reports = verify::compare_live(session, &[], true, env).await?;
    let differing: Vec<String> =
        reports.iter().filter(|r| !r.equal).map(|r| r.table.clone()).collect();
    say(&format!(
        "verify: {}",
        if differing.is_empty() {
            "every table equal".to_string()
        } else {
            format!("differences in {}", differing.join(", "))
        }
    ));
    // The objects: what the cutover creates itself (foreign keys, triggers,
    // forced row security) is not counted; the cutover refuses while
    // anything else is missing.
    let objects = verify::compare_schema(&session.src, &session.tgt, &session.plan, false).await?;
    if objects.is_empty() {
        say("verify: every object of the source on the target, every table analyzed");
    }
    for d in &objects {
        say(&format!("verify: {}", crate::fidelity::describe(d)));
    }
    Ok(differing)
}

// The catalog queries of this module, named.

const NOT_OWNED: &str = "select t from unnest($1::text[]) t join pg_class c on c.oid = t::regclass
    where not pg_has_role(current_user, c.relowner, 'USAGE')";

const CAN_CREATE: &str = "select has_database_privilege(current_database(), 'CREATE')";

const IS_SUPERUSER: &str = "select rolsuper from pg_roles where rolname = current_user";

const TABLE_COLUMNS: &str =
    "select t, (select string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', '
                         order by a.attnum)
            from pg_attribute a
            where a.attrelid = to_regclass(t) and a.attnum > 0 and not a.attisdropped)
    from unnest($1::text[]) t where to_regclass(t) is not null";

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries() -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("upgrade: tables not owned", NOT_OWNED),
        NamedQuery::new("upgrade: may create schemas", CAN_CREATE),
        NamedQuery::new("upgrade: superuser", IS_SUPERUSER),
        NamedQuery::new("upgrade: tables' columns", TABLE_COLUMNS),
    ]
}
