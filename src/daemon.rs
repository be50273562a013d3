//! The sync daemon: one worker per (sync, target) applying batches as the
//! source commits, and the `start`/`stop`/`kick` plumbing around it.
//!
//! Waking: there is no NOTIFY (it serialises the source's commits, see
//! `capture`). A worker polls the source with an adaptive interval: right
//! after work it polls again within 10 ms, doubling while idle up to 100 ms,
//! so a commit is picked up within about 100 ms. A poll is one index probe
//! per delta table. Every 10 s a batch runs even without changes, to carry
//! sequences and let the source purge.
//!
//! Faults: any error marks the sync bad (recorded in the catalog with its
//! SQLSTATE), drops both connections and retries with backoff (1 s doubling
//! to 30 s). A batch is one target transaction, so a stop, a crash or a
//! lost connection never leaves half a batch applied.
//!
//! The pid file and log file live beside the catalog: one daemon per catalog.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::apply::{self, BatchStats, Plan};
use crate::catalog::{Catalog, CatalogError, OneTimeCopy, RoundOutcome};
use crate::copy;
use crate::error::{Error, Result};
use crate::objects::{self, Env};

const MIN_POLL: Duration = Duration::from_millis(10);
const MAX_POLL: Duration = Duration::from_millis(100);
const HEARTBEAT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the daemon looks for syncs added to or removed from the catalog.
const RELOAD: Duration = Duration::from_secs(2);

pub fn pid_file(catalog: &Path) -> PathBuf {
    catalog.with_extension("pid")
}

pub fn log_file(catalog: &Path) -> PathBuf {
    catalog.with_extension("log")
}

/// Whether a process runs. A killed daemon whose parent does not reap it
/// (PID 1 of a container often does not) stays a zombie, which `kill(pid,
/// 0)` still reports; /proc tells.
fn alive(pid: i32) -> bool {
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')').is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z'))
        }
        Err(_) => true,
    }
}

/// The pid of the running daemon of this catalog, if any.
pub fn running_pid(catalog: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(catalog)).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

/// A connected applier of one sync to one target.
pub struct Session {
    pub src: Client,
    pub tgt: Client,
    pub plan: Plan,
    pub target: String,
    /// The snapshot of the last batch applied, once known.
    pub prev: Option<String>,
    pub replica_role: bool,
}

impl Session {
    /// Connects, prepares the target and, the first time, runs the initial
    /// copy the sync asks for with `jobs` workers.
    pub async fn open(
        catalog: &Catalog,
        sync: &str,
        target: &str,
        jobs: usize,
        env: Env<'_>,
    ) -> Result<Session> {
        let sync = catalog.sync(sync)?;
        if sync.retired {
            return Err(Error::invalid(
                format!(
                    "sync \"{}\" was cut over (or is being torn down): it no longer replicates",
                    sync.name
                ),
                format!("pgleap teardown {} removes what is left of it", sync.name),
            ));
        }
        let relgroup = catalog.relgroup(&sync.relgroup)?;
        let source = catalog.dbgroup(&sync.dbgroup)?.source().to_string();
        let source_conn = objects::DbConn::from_catalog(catalog, &source)?;
        let target_conn = objects::DbConn::from_catalog(catalog, target)?;
        let src = source_conn.connect(env).await?;
        let mut tgt = target_conn.connect(env).await?;
        let plan = Plan::load(&src.client, &source, &sync, &relgroup).await?;
        let replica_role = apply::prepare_target(&mut tgt.client, target, &plan).await?;
        let mut prev = apply::applied_snapshot(&tgt.client, target, &plan).await?;
        if prev.is_none() && sync.onetimecopy != OneTimeCopy::Never {
            // One initial copy per sync at a time (the daemon and a kick may
            // both get here); the loser finds the copy done when it gets the
            // lock. A session lock: released at unlock or disconnect.
            let q = |e: tokio_postgres::Error| Error::query(target, &e);
            let lock = (apply::COPY_LOCK_CLASS, plan.sync_id);
            tgt.client
                .execute("select pg_advisory_lock($1, $2)", &[&lock.0, &lock.1])
                .await
                .map_err(q)?;
            prev = apply::applied_snapshot(&tgt.client, target, &plan).await?;
            if prev.is_none() {
                let (handoff, _) = copy::initial_copy(
                    &source_conn,
                    &target_conn,
                    &plan,
                    sync.onetimecopy,
                    jobs,
                    env,
                )
                .await?;
                let start = handoff.unwrap_or_else(|| apply::FROM_THE_START.to_string());
                apply::set_applied_snapshot(&tgt.client, target, &plan, &start).await?;
                if replica_role {
                    // Triggers and foreign keys cannot fire under replica
                    // role, so they need not wait for cutover.
                    finish_schema_now(&src.client, &source, &tgt.client, target, &plan).await?;
                }
                prev = Some(start);
            }
            tgt.client
                .execute("select pg_advisory_unlock($1, $2)", &[&lock.0, &lock.1])
                .await
                .map_err(q)?;
        }
        Ok(Session {
            src: src.client,
            tgt: tgt.client,
            plan,
            target: target.to_string(),
            prev,
            replica_role,
        })
    }

    pub async fn batch(&mut self) -> Result<BatchStats> {
        let stats = apply::apply_batch(
            &mut self.src,
            &mut self.tgt,
            &self.target,
            &self.target,
            &self.plan,
        )
        .await?;
        self.prev = Some(stats.snapshot.clone());
        Ok(stats)
    }

    pub async fn has_changes(&self) -> Result<bool> {
        self.plan.has_changes(&self.src, self.prev.as_deref()).await
    }
}

/// Creates the source's foreign keys (NOT VALID) and triggers the target
/// lacks.
async fn finish_schema_now(
    src: &Client,
    source: &str,
    tgt: &Client,
    target: &str,
    plan: &Plan,
) -> Result<()> {
    let (fks, triggers) = crate::cutover::deferred(src, source, tgt, target, plan).await?;
    let q = |e: tokio_postgres::Error| Error::query(target, &e);
    for (table, name, def) in &fks {
        let name = crate::pg::quote_ident(name);
        // Validated at cutover: parts copied under different snapshots (a
        // resumed copy) may disagree until the changes between are applied.
        tgt.batch_execute(&format!("alter table {table} add constraint {name} {def} not valid"))
            .await
            .map_err(q)?;
    }
    for def in &triggers {
        tgt.batch_execute(def).await.map_err(q)?;
    }
    Ok(())
}

fn record(
    catalog: &mut Catalog,
    sync: &str,
    target: &str,
    result: &Result<BatchStats>,
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
            sqlstate: match e {
                Error::Query { sqlstate, .. } => sqlstate.as_deref(),
                _ => None,
            },
        },
    };
    // Status is informative; a busy catalog must not stop replication.
    if let Err(e) = catalog.record_round(sync, target, outcome) {
        tracing::warn!(sync, target, "cannot record the round: {e}");
    }
}

/// Runs batches for one sync and target until cancelled.
async fn worker(catalog_path: PathBuf, sync: String, target: String, token: CancellationToken) {
    let mut catalog = match Catalog::open(&catalog_path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(sync, target, "cannot open the catalog: {e}");
            return;
        }
    };
    let env = &objects::process_env;
    let mut session: Option<Session> = None;
    let mut backoff = Duration::from_secs(1);
    let mut interval = MIN_POLL;
    let mut last_batch: Option<Instant> = None;
    tracing::info!(sync, target, "worker started");
    loop {
        if token.is_cancelled() {
            break;
        }
        let autokick = match catalog.sync(&sync) {
            Ok(s) if s.retired => break,
            Ok(s) => s.autokick,
            Err(CatalogError::NotFound { .. }) => break,
            Err(e) => {
                tracing::warn!(sync, "catalog: {e}");
                true
            }
        };
        if !autokick {
            // Deltas accumulate until `pgleap kick`.
            session = None;
            if sleep_or_cancel(&token, Duration::from_millis(500)).await {
                break;
            }
            continue;
        }
        let started = Instant::now();
        let step: Result<Option<BatchStats>> = async {
            if session.is_none() {
                session = Some(Session::open(&catalog, &sync, &target, default_jobs(), env).await?);
                let s = session.as_ref().unwrap();
                tracing::info!(
                    sync,
                    target,
                    replica_role = s.replica_role,
                    tables = s.plan.tables.len(),
                    "connected"
                );
            }
            let s = session.as_mut().unwrap();
            let due = last_batch.is_none_or(|t| t.elapsed() >= HEARTBEAT);
            if due || s.has_changes().await? {
                return Ok(Some(s.batch().await?));
            }
            Ok(None)
        }
        .await;
        match step {
            Ok(Some(stats)) => {
                if stats.inserts + stats.deletes + stats.truncates > 0 {
                    tracing::info!(
                        sync,
                        target,
                        inserts = stats.inserts,
                        deletes = stats.deletes,
                        truncates = stats.truncates,
                        ms = stats.millis,
                        "batch applied"
                    );
                }
                record(&mut catalog, &sync, &target, &Ok(stats), 0);
                last_batch = Some(Instant::now());
                backoff = Duration::from_secs(1);
                interval = MIN_POLL;
            }
            Ok(None) => interval = (interval * 2).min(MAX_POLL),
            Err(e) => {
                tracing::warn!(sync, target, "batch failed, retrying in {backoff:?}: {e}");
                let millis = started.elapsed().as_millis() as i64;
                record(&mut catalog, &sync, &target, &Err(e), millis);
                session = None;
                if sleep_or_cancel(&token, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        }
        if sleep_or_cancel(&token, interval).await {
            break;
        }
    }
    tracing::info!(sync, target, "worker stopped");
}

/// Sleeps; returns true when cancelled instead.
async fn sleep_or_cancel(token: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = token.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Parallel copy workers unless told otherwise: one per core.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Removes the pid file when the daemon ends, however it ends normally.
struct PidFile(PathBuf);

impl PidFile {
    fn acquire(catalog: &Path) -> Result<PidFile> {
        let path = pid_file(catalog);
        if let Some(pid) = running_pid(catalog) {
            return Err(Error::invalid(
                format!("the daemon for catalog {} already runs (pid {pid})", catalog.display()),
                "stop it first with pgleap stop",
            ));
        }
        std::fs::write(&path, format!("{}\n", std::process::id())).map_err(|e| {
            Error::invalid(
                format!("cannot write the pid file {}: {e}", path.display()),
                "check the permissions of the catalog's directory",
            )
        })?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the daemon in this process until SIGTERM or SIGINT.
pub async fn run_foreground(catalog_path: &Path) -> Result<()> {
    let _pid = PidFile::acquire(catalog_path)?;
    let token = CancellationToken::new();
    let signals = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("stopping: letting batches in flight finish");
        signals.cancel();
    });
    tracing::info!(pid = std::process::id(), catalog = %catalog_path.display(), "daemon started");

    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let mut workers: Vec<(String, String, CancellationToken, tokio::task::JoinHandle<()>)> =
                Vec::new();
            loop {
                let wanted = match Catalog::open(catalog_path).and_then(|c| pairs(&c)) {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::warn!("cannot read the catalog: {e}");
                        workers.iter().map(|(s, t, ..)| (s.clone(), t.clone())).collect()
                    }
                };
                workers.retain(|(s, t, child, handle)| {
                    let keep = wanted.contains(&(s.clone(), t.clone())) && !handle.is_finished();
                    if !keep {
                        child.cancel();
                    }
                    keep
                });
                for (s, t) in wanted {
                    if !workers.iter().any(|(ws, wt, ..)| *ws == s && *wt == t) {
                        let child = token.child_token();
                        let handle = tokio::task::spawn_local(worker(
                            catalog_path.to_path_buf(),
                            s.clone(),
                            t.clone(),
                            child.clone(),
                        ));
                        workers.push((s, t, child, handle));
                    }
                }
                if sleep_or_cancel(&token, RELOAD).await {
                    break;
                }
            }
            for (.., handle) in workers {
                let _ = handle.await;
            }
        })
        .await;
    tracing::info!("daemon stopped");
    Ok(())
}

/// Every (sync, target) pair of the catalog.
fn pairs(catalog: &Catalog) -> Result<Vec<(String, String)>, CatalogError> {
    let mut out = Vec::new();
    for sync in catalog.syncs()?.into_iter().filter(|s| !s.retired) {
        for target in catalog.dbgroup(&sync.dbgroup)?.targets() {
            out.push((sync.name.clone(), target.to_string()));
        }
    }
    Ok(out)
}

/// Starts the daemon in the background and waits until it has written its
/// pid file. Returns its pid.
pub fn start_detached(catalog_path: &Path) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    if let Some(pid) = running_pid(catalog_path) {
        return Err(Error::invalid(
            format!("the daemon already runs (pid {pid})"),
            "pgleap status shows what it does; pgleap stop stops it",
        ));
    }
    let log_path = log_file(catalog_path);
    let open_log = || {
        std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| {
            Error::invalid(format!("cannot open the log file {}: {e}", log_path.display()), "")
        })
    };
    let exe = std::env::current_exe()
        .map_err(|e| Error::invalid(format!("cannot find the pgleap binary: {e}"), ""))?;
    let mut child = std::process::Command::new(exe)
        .arg("--catalog")
        .arg(catalog_path)
        .args(["start", "--foreground"])
        .stdin(std::process::Stdio::null())
        .stdout(open_log()?)
        .stderr(open_log()?)
        // Its own process group: a Ctrl-C in this terminal does not reach it.
        .process_group(0)
        .spawn()
        .map_err(|e| Error::invalid(format!("cannot start the daemon: {e}"), ""))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(pid) = running_pid(catalog_path)
            && pid == child.id() as i32
        {
            return Ok(pid);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::invalid(
                format!("the daemon exited at start ({status})"),
                format!("see its log: {}", log_path.display()),
            ));
        }
        if Instant::now() > deadline {
            return Err(Error::invalid(
                "the daemon did not report ready within 15 s",
                format!("see its log: {}", log_path.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the daemon: SIGTERM, then waits for it to finish its batch and
/// exit. Returns the pid it stopped, if one ran.
pub fn stop(catalog_path: &Path, timeout: Duration) -> Result<Option<i32>> {
    let Some(pid) = running_pid(catalog_path) else {
        return Ok(None);
    };
    let target = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() > deadline {
            return Err(Error::invalid(
                format!("the daemon (pid {pid}) did not stop within {timeout:?}"),
                format!("look at its log; kill -9 {pid} is safe (batches are transactional)"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Some(pid))
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
    let s = catalog.sync(sync)?;
    let group = catalog.dbgroup(&s.dbgroup)?;
    let targets: Vec<String> = group.targets().map(str::to_string).collect();
    let source = group.source().to_string();
    let deadline = wait.map(|w| Instant::now() + w);
    // Everything committed before this snapshot must reach the targets.
    let kick_snapshot: String = {
        let src = objects::connect_db(catalog, &source, env).await?;
        src.client
            .query_one("select txid_current_snapshot()::text", &[])
            .await
            .map_err(|e| Error::query(&source, &e))?
            .get(0)
    };
    let mut results = Vec::new();
    for target in targets {
        loop {
            let started = Instant::now();
            let attempt: Result<BatchStats> = async {
                let mut session = Session::open(catalog, sync, &target, jobs, env).await?;
                let stats = session.batch().await?;
                if !apply::covers(&session.src, &source, &stats.snapshot, &kick_snapshot).await? {
                    return Err(Error::invalid("batch did not reach the kick's snapshot", ""));
                }
                Ok(stats)
            }
            .await;
            let millis = started.elapsed().as_millis() as i64;
            record(catalog, sync, &target, &attempt, millis);
            match attempt {
                Ok(stats) => {
                    results.push((target.clone(), stats));
                    break;
                }
                Err(e) => match deadline {
                    Some(d) if Instant::now() < d => {
                        tracing::info!(sync, target, "kick: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Some(_) => {
                        return Err(Error::KickTimeout {
                            sync: sync.into(),
                            target,
                            last: e.to_string(),
                        });
                    }
                    None => return Err(e),
                },
            }
        }
    }
    Ok(results)
}
