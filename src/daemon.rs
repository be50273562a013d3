//! The sync daemon as a process: one worker per (sync, target) applying
//! batches (through `session`) as the source commits, its signals, and the
//! `start`/`stop` plumbing with pid and log files.
//!
//! Waking: there is no NOTIFY (it serialises the source's commits, see
//! `capture`). A worker polls the source with an adaptive interval: right
//! after work it polls again within 10 ms, doubling while idle up to 100 ms,
//! so a commit is picked up within about 100 ms. A poll is one index probe
//! per delta table, skipped while the source's snapshot has not moved since
//! a poll that found nothing (see `Session::has_changes`). Every 10 s a
//! batch runs even without changes, to carry sequences and let the source
//! purge.
//!
//! Faults: any error marks the sync bad (recorded in the catalog with its
//! SQLSTATE), drops both connections and retries with backoff (1 s doubling
//! to 30 s). A batch is one target transaction, so a stop, a crash or a
//! lost connection never leaves half a batch applied.
//!
//! The pid file and log file live beside the catalog: one daemon per catalog.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::apply::BatchStats;
use crate::catalog::{Catalog, CatalogError};
use crate::error::{Error, Result};
use crate::route::SyncRoute;
use crate::session::{self, Session};

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

/// The pid of the running daemon of this catalog, if any. The daemon holds
/// an exclusive lock on its pid file for as long as it runs, so a file
/// nobody holds locked is stale whatever pid it names (that pid may belong
/// to another process by now): it is removed, and never signalled.
pub fn running_pid(catalog: &Path) -> Option<i32> {
    use nix::fcntl::{Flock, FlockArg};
    let path = pid_file(catalog);
    let file = std::fs::File::open(&path).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(free) => {
            let stale = std::fs::read_to_string(&path).unwrap_or_default();
            if !stale.trim().is_empty() {
                tracing::warn!(
                    "removed the stale pid file {} (pid {}: no pgleap daemon holds it)",
                    path.display(),
                    stale.trim()
                );
                let _ = std::fs::remove_file(&path);
            }
            drop(free);
            None
        }
        // Held: a daemon runs. It writes its pid right after locking.
        Err(_) => std::fs::read_to_string(&path).ok()?.trim().parse().ok(),
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
    let env = &crate::pg::process_env;
    let mut session: Option<Session> = None;
    let mut backoff = Duration::from_secs(1);
    let mut interval = MIN_POLL;
    let mut last_batch: Option<Instant> = None;
    let mut summary = Summary::default();
    tracing::info!(sync, target, "worker started");
    // Counters exist from the start, at 0: a rate over them needs a first
    // sample.
    let labels = [("sync", sync.clone()), ("target", target.clone())];
    metrics::counter!("pgleap_applied_rows_total", &labels).increment(0);
    metrics::counter!("pgleap_copy_bytes_total", &labels).increment(0);
    loop {
        if token.is_cancelled() {
            break;
        }
        let autokick = match catalog.sync(&sync) {
            Ok(s) if s.retired => break,
            // Paused by a schema change: nothing is applied until resumed.
            Ok(s) => s.autokick && s.paused.is_none(),
            Err(CatalogError::NotFound { .. }) => break,
            Err(e) => {
                tracing::warn!(sync, "catalog: {e}");
                true
            }
        };
        if !autokick {
            // Deltas accumulate until `pgleap kick` (or `sync resume`).
            session = None;
            if sleep_or_cancel(&token, Duration::from_millis(500)).await {
                break;
            }
            continue;
        }
        let started = Instant::now();
        // A batch (not the initial copy, which takes as long as it takes)
        // that runs past the limit is recorded bad while it goes on: a
        // lock or a server that stopped answering must not leave the sync
        // looking healthy.
        let step = async {
            if session.is_none() {
                let route = SyncRoute::load(&catalog, &sync)?;
                let db = route.target(&target)?;
                let mut opened = Session::open(&route, db, session::default_jobs(), env).await?;
                opened.stream().await?;
                session = Some(opened);
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
            let batch = async {
                if due || s.large_objects_due() || s.has_changes().await? {
                    return Ok(Some(s.batch(env).await?));
                }
                Ok(None)
            };
            watch_stuck(batch, &catalog_path, &sync, &target).await
        };
        let step: Result<Option<BatchStats>> = step.await;
        match step {
            Ok(Some(stats)) => {
                summary.add(&sync, &target, &stats);
                let labels = [("sync", sync.clone()), ("target", target.clone())];
                metrics::counter!("pgleap_applied_rows_total", &labels)
                    .increment(stats.inserts + stats.deletes);
                metrics::histogram!("pgleap_batch_duration_seconds", &labels)
                    .record(stats.millis as f64 / 1000.0);
                metrics::gauge!("pgleap_sync_up", &labels).set(1.0);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                metrics::gauge!("pgleap_last_success_timestamp_seconds", &labels).set(now);
                session::record(&mut catalog, &sync, &target, Ok(&stats), 0);
                last_batch = Some(Instant::now());
                backoff = Duration::from_secs(1);
                interval = MIN_POLL;
            }
            Ok(None) => interval = (interval * 2).min(MAX_POLL),
            Err(e) => {
                tracing::warn!(sync, target, "batch failed, retrying in {backoff:?}: {e}");
                let code = e.sqlstate().map_or("none".to_string(), |c| c.code().to_string());
                let labels = [("sync", sync.clone()), ("target", target.clone())];
                metrics::gauge!("pgleap_sync_up", &labels).set(0.0);
                metrics::counter!("pgleap_errors_total", "sync" => sync.clone(),
                    "target" => target.clone(), "sqlstate" => code)
                .increment(1);
                let millis = started.elapsed().as_millis() as i64;
                session::record(&mut catalog, &sync, &target, Err(&e), millis);
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

/// How long a batch may run before the worker records it bad (it goes on):
/// `PGLEAP_STUCK_AFTER_SECONDS`, else 300 s, above any batch that makes
/// progress at this machine's rates but for the largest catch-ups.
fn stuck_after() -> Duration {
    let seconds = std::env::var("PGLEAP_STUCK_AFTER_SECONDS").ok().and_then(|s| s.parse().ok());
    Duration::from_secs(seconds.unwrap_or(300))
}

/// Runs `step`; if it runs past [`stuck_after`], records the round bad
/// (through a catalog handle of its own) and keeps waiting.
async fn watch_stuck<T>(
    step: impl std::future::Future<Output = Result<T>>,
    catalog_path: &Path,
    sync: &str,
    target: &str,
) -> Result<T> {
    let limit = stuck_after();
    tokio::pin!(step);
    let mut flagged = false;
    loop {
        tokio::select! {
            result = &mut step => return result,
            _ = tokio::time::sleep(limit), if !flagged => {
                flagged = true;
                let e = Error::invalid(
                    format!(
                        "a batch has run {} s without finishing: it waits on a lock or a server \
                         that does not answer",
                        limit.as_secs()
                    ),
                    format!("pgleap status {sync} shows what it waits for"),
                );
                tracing::warn!(sync, target, "{e}");
                if let Ok(mut catalog) = Catalog::open(catalog_path) {
                    let millis = limit.as_millis() as i64;
                    session::record(&mut catalog, sync, target, Err(&e), millis);
                }
            }
        }
    }
}

/// How often a worker logs what it applied (each batch is logged at debug
/// level only: at 100 TPS a line per batch is millions a day).
const SUMMARY: Duration = Duration::from_secs(60);

/// What a worker applied since its last summary line.
#[derive(Default)]
struct Summary {
    since: Option<Instant>,
    batches: u64,
    inserts: u64,
    deletes: u64,
    truncates: u64,
}

impl Summary {
    fn add(&mut self, sync: &str, target: &str, s: &BatchStats) {
        tracing::debug!(
            sync,
            target,
            inserts = s.inserts,
            deletes = s.deletes,
            truncates = s.truncates,
            ms = s.millis,
            "batch applied"
        );
        let since = *self.since.get_or_insert_with(Instant::now);
        self.batches += 1;
        self.inserts += s.inserts;
        self.deletes += s.deletes;
        self.truncates += s.truncates;
        if since.elapsed() < SUMMARY {
            return;
        }
        if self.inserts + self.deletes + self.truncates > 0 {
            tracing::info!(
                sync,
                target,
                batches = self.batches,
                inserts = self.inserts,
                deletes = self.deletes,
                truncates = self.truncates,
                seconds = since.elapsed().as_secs(),
                "applied"
            );
        }
        *self = Summary { since: Some(Instant::now()), ..Default::default() };
    }
}

/// Sleeps; returns true when cancelled instead.
async fn sleep_or_cancel(token: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = token.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// The daemon's pid file, locked while it runs and removed when it ends
/// (the lock goes with the process however it ends).
struct PidFile {
    path: PathBuf,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl PidFile {
    fn acquire(catalog: &Path) -> Result<PidFile> {
        use nix::fcntl::{Flock, FlockArg};
        use std::io::Write;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let path = pid_file(catalog);
        let failed = |e: std::io::Error| {
            Error::invalid(
                format!("cannot write the pid file {}: {e}", path.display()),
                "check the permissions of the catalog's directory",
            )
        };
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(failed)?;
            let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err(_) => {
                    let pid = std::fs::read_to_string(&path).unwrap_or_default();
                    return Err(Error::invalid(
                        format!(
                            "the daemon for catalog {} already runs (pid {})",
                            catalog.display(),
                            pid.trim()
                        ),
                        "stop it first with pgleap stop",
                    ));
                }
            };
            // A `status` may have removed the file as stale between our open
            // and our lock: then the lock is on a file nobody sees.
            let same = std::fs::metadata(&path)
                .is_ok_and(|m| lock.metadata().is_ok_and(|l| l.ino() == m.ino()));
            if !same {
                continue;
            }
            lock.set_len(0).map_err(failed)?;
            writeln!(lock, "{}", std::process::id()).map_err(failed)?;
            return Ok(PidFile { path, _lock: lock });
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs the daemon in this process until SIGTERM or SIGINT. Under systemd
/// (`Type=notify`) it says READY=1 once its workers run, keeps a STATUS=
/// line, and pings the watchdog when `WatchdogSec` is set.
pub async fn run_foreground(
    catalog_path: &Path,
    listen: Option<std::net::SocketAddr>,
) -> Result<()> {
    // Bound before the pid file says the daemon runs: `start` reports
    // success once it does.
    let listener = match listen {
        Some(addr) => match crate::web::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                if let Some(pid) = running_pid(catalog_path) {
                    return Err(Error::invalid(
                        format!(
                            "the daemon for catalog {} already runs (pid {pid})",
                            catalog_path.display()
                        ),
                        "stop it first with pgleap stop",
                    ));
                }
                return Err(Error::invalid(
                    format!("cannot serve the status page on {addr}: {e}"),
                    "another process listens there (another pgleap daemon's status page?): \
                     pass --listen HOST:PORT (or PGLEAP_LISTEN) with a free port, or --listen off",
                ));
            }
        },
        None => None,
    };
    let _pid = PidFile::acquire(catalog_path)?;
    let token = CancellationToken::new();
    let board = match (listener, crate::web::Board::new(catalog_path)) {
        (Some(listener), Some(board)) => {
            tokio::spawn(crate::web::serve(listener, board.clone(), token.clone()));
            Some(board)
        }
        _ => None,
    };
    let hangup = std::sync::Arc::new(tokio::sync::Notify::new());
    spawn_signal_handler(token.clone(), hangup.clone());
    if let Some(period) = sd_notify::watchdog_enabled() {
        let stop = token.clone();
        tokio::spawn(async move {
            while !sleep_or_cancel(&stop, period / 2).await {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
    tracing::info!(pid = std::process::id(), catalog = %catalog_path.display(), "daemon started");

    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let mut workers: Vec<Worker> = Vec::new();
            let mut ready = false;
            if let Some(board) = board {
                tokio::task::spawn_local(sample(catalog_path.to_path_buf(), board, token.clone()));
            }
            loop {
                reconcile(catalog_path, &token, &mut workers);
                if !ready {
                    ready = true;
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                }
                let status = format!("{} worker(s) applying", workers.len());
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(RELOAD) => {}
                    _ = hangup.notified() => tracing::info!("SIGHUP: catalog re-read"),
                }
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            for (.., handle) in workers {
                let _ = handle.await;
            }
        })
        .await;
    tracing::info!("daemon stopped");
    Ok(())
}

/// Where the daemon serves its status page and metrics unless told
/// (`--listen`, `PGLEAP_LISTEN`; `off` for nowhere).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";

/// The listen setting a daemon started by another command inherits.
pub fn listen_setting() -> String {
    std::env::var("PGLEAP_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.to_string())
}

/// Parses a listen setting: an address, or `off`.
pub fn parse_listen(value: &str) -> Result<Option<std::net::SocketAddr>> {
    if value == "off" {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| {
        Error::invalid(
            format!("invalid --listen address \"{value}\""),
            format!("give HOST:PORT with an IP address (default {DEFAULT_LISTEN}), or off"),
        )
    })
}

/// How often the status page's snapshot and the gauges are refreshed.
const SAMPLE: Duration = Duration::from_secs(5);

/// Refreshes the status page's snapshot and the lag and pending gauges.
async fn sample(
    catalog_path: PathBuf,
    board: std::sync::Arc<crate::web::Board>,
    stop: CancellationToken,
) {
    loop {
        match Catalog::open(&catalog_path) {
            Ok(catalog) => {
                match crate::status::gather(&catalog, None, true, &crate::pg::process_env).await {
                    Ok(syncs) => board.sample(&syncs),
                    Err(e) => tracing::debug!("status sample: {e}"),
                }
            }
            Err(e) => tracing::debug!("status sample: {e}"),
        }
        if sleep_or_cancel(&stop, SAMPLE).await {
            return;
        }
    }
}

/// A running worker: its sync and target, its stop token, its task.
type Worker = (String, String, CancellationToken, tokio::task::JoinHandle<()>);

/// Starts a worker for every (sync, target) the catalog has and no worker
/// runs for, and stops those whose sync is gone or retired.
fn reconcile(catalog_path: &Path, token: &CancellationToken, workers: &mut Vec<Worker>) {
    let wanted = match Catalog::open(catalog_path).map_err(Error::from).and_then(|c| pairs(&c)) {
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
}

/// SIGTERM and SIGINT stop the daemon (batches in flight finish); SIGHUP
/// (a closed terminal, `systemctl reload`) only makes it re-read the
/// catalog at once.
fn spawn_signal_handler(token: CancellationToken, hangup: std::sync::Arc<tokio::sync::Notify>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
        let mut hup = signal(SignalKind::hangup()).expect("install SIGHUP handler");
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => hangup.notify_one(),
            }
        }
        token.cancel();
        tracing::info!("stopping: letting batches in flight finish");
    });
}

/// Every (sync, target) pair of the catalog.
fn pairs(catalog: &Catalog) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for sync in catalog.syncs()?.into_iter().filter(|s| !s.retired) {
        let route = SyncRoute::resolve(catalog, sync)?;
        for target in &route.targets {
            out.push((route.sync.name.clone(), target.name.clone()));
        }
    }
    Ok(out)
}

/// Starts the daemon in the background and waits until it has written its
/// pid file. Returns its pid.
/// Whether the daemon this process starts logs JSON lines
/// (`--log-format json`).
static LOG_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn log_json() {
    LOG_JSON.store(true, std::sync::atomic::Ordering::SeqCst);
}

pub fn start_detached(catalog_path: &Path, listen: &str) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    if let Some(pid) = running_pid(catalog_path) {
        return Err(Error::invalid(
            format!("the daemon already runs (pid {pid})"),
            "pgleap status shows what it does; pgleap stop stops it",
        ));
    }
    let log_path = log_file(catalog_path);
    let open_log = || {
        use std::os::unix::fs::OpenOptionsExt;
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true).mode(0o600);
        options.open(&log_path).map_err(|e| {
            Error::invalid(format!("cannot open the log file {}: {e}", log_path.display()), "")
        })
    };
    let exe = std::env::current_exe()
        .map_err(|e| Error::invalid(format!("cannot find the pgleap binary: {e}"), ""))?;
    let mut child = std::process::Command::new(exe)
        .arg("--catalog")
        .arg(catalog_path)
        .args(["start", "--foreground", "--listen", listen])
        .args(if LOG_JSON.load(std::sync::atomic::Ordering::SeqCst) {
            &["--log-format", "json"][..]
        } else {
            &[][..]
        })
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
            // Its own words are in the log: say them, not only its status.
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let said = log.lines().rev().find_map(|l| l.strip_prefix("error: "));
            return Err(match said {
                Some(error) => Error::invalid(
                    format!("the daemon did not start: {error}"),
                    log.lines().rev().find_map(|l| l.strip_prefix("hint: ")).map_or_else(
                        || format!("see its log: {}", log_path.display()),
                        str::to_string,
                    ),
                ),
                None => Error::invalid(
                    format!("the daemon exited at start ({status})"),
                    format!("see its log: {}", log_path.display()),
                ),
            });
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
    // The lock goes when the process does (even as an unreaped zombie).
    while running_pid(catalog_path) == Some(pid) {
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
