//! A real PgBouncer for the switch tests and the cutover benchmark, and a
//! probe: a client that writes through it and records every write's time
//! and outcome, as an application would see them.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::TestDb;
use super::cluster::{OWNER, base_dir, chown, free_port, server_user};

/// The application's role: the same name and password on both servers, as
/// an operator would set them up before a move.
pub const APP_USER: &str = "app_user";
pub const APP_PASSWORD: &str = "app-secret-9";

/// Creates the application role on a server (once per cluster).
pub fn app_role(db: &TestDb) {
    let _ = db
        .cluster
        .superuser("postgres")
        .try_exec(&format!("create role {APP_USER} login password '{APP_PASSWORD}'"));
}

/// A PgBouncer in transaction pooling whose database `app` points at `db`
/// (or, from `start_for`, one entry per database, named like it).
pub struct Bouncer {
    child: Child,
    pub port: u16,
    pub ini: PathBuf,
    dir: PathBuf,
}

impl Bouncer {
    pub fn start(db: &TestDb) -> Bouncer {
        Bouncer::start_with(&[("app", db)])
    }

    /// One pooler in front of several databases of a server, each entry
    /// named like its database: what a server move switches.
    #[allow(dead_code, reason = "used by the server tests, not the benchmarks")]
    pub fn start_for(dbs: &[&TestDb]) -> Bouncer {
        let entries: Vec<(&str, &TestDb)> = dbs.iter().map(|d| (d.name.as_str(), *d)).collect();
        Bouncer::start_with(&entries)
    }

    fn start_with(entries: &[(&str, &TestDb)]) -> Bouncer {
        let owner = server_user();
        let port = free_port();
        let dir = base_dir().join(format!("{}-bouncer-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        chown(&dir, owner);
        let users = dir.join("users.txt");
        std::fs::write(&users, format!("\"{OWNER}\" \"\"\n\"{APP_USER}\" \"\"\n")).unwrap();
        let ini = dir.join("pgbouncer.ini");
        let databases: String = entries
            .iter()
            .map(|(name, db)| {
                format!(
                    "{name} = host=127.0.0.1 port={} dbname={} user={APP_USER} \
                     password={APP_PASSWORD}\n",
                    db.cluster.port, db.name
                )
            })
            .collect();
        std::fs::write(
            &ini,
            format!(
                ";; written by the tests\n[databases]\n{databases}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir = {dir}\nauth_type = trust\nauth_file = {users}\n\
                 admin_users = {OWNER}\npool_mode = transaction\ndefault_pool_size = 10\n\
                 logfile = {dir}/pgbouncer.log\nignore_startup_parameters = extra_float_digits\n",
                dir = dir.display(),
                users = users.display(),
            ),
        )
        .unwrap();
        for f in [&users, &ini] {
            chown(f, owner);
        }
        let mut cmd = Command::new("/usr/sbin/pgbouncer");
        cmd.arg(&ini).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        if let Some((uid, gid)) = owner {
            cmd.uid(uid).gid(gid);
        }
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start pgbouncer (Debian's pgbouncer package)");
        let bouncer = Bouncer { child, port, ini, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "pgbouncer did not start:\n{}", bouncer.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        bouncer
    }

    /// Its admin console, as pgleap is given it.
    pub fn admin(&self) -> String {
        format!("host=127.0.0.1 port={} dbname=pgbouncer user={OWNER}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a probe saw.
#[derive(Debug, Default)]
pub struct ProbeLog {
    /// Each acknowledged write: when, and the id the server gave it.
    pub ok: Vec<(Instant, i64)>,
    /// Each failed write: when, and the error.
    pub errors: Vec<(Instant, String)>,
}

impl ProbeLog {
    /// The longest time without an acknowledged write in a window (its
    /// ends count: a client that never succeeds again has the whole rest).
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut times = vec![from];
        times.extend(self.ok.iter().map(|(t, _)| *t).filter(|t| *t >= from && *t <= to));
        times.push(to);
        times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }
}

/// A client writing `insert into probe (client) values (N)` through the
/// pooler, every `every` (or as fast as it can), until stopped.
pub struct Probe {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<ProbeLog>,
}

impl Probe {
    /// Writes to database `dbname` on `127.0.0.1:port` (a pooler, or a
    /// server directly).
    pub fn start(port: u16, dbname: &str, client: i32, every: Option<Duration>) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let dbname = dbname.to_string();
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(probe(port, &dbname, client, every, flag))
        });
        Probe { stop, handle }
    }

    pub fn finish(self) -> ProbeLog {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

async fn probe(
    port: u16,
    dbname: &str,
    client: i32,
    every: Option<Duration>,
    stop: Arc<AtomicBool>,
) -> ProbeLog {
    let mut log = ProbeLog::default();
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(port).dbname(dbname).user(APP_USER).password(APP_PASSWORD);
    let mut conn: Option<tokio_postgres::Client> = None;
    // Simple-protocol statements only: named prepared statements do not
    // survive transaction pooling.
    let insert = format!("insert into probe (client) values ({client}) returning id");
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            match config.connect(tokio_postgres::NoTls).await {
                Ok((c, connection)) => {
                    tokio::spawn(connection);
                    conn = Some(c);
                }
                Err(e) => {
                    log.errors.push((Instant::now(), format!("connect: {e}")));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let result = conn.as_ref().unwrap().simple_query(&insert).await;
        match result {
            Ok(messages) => {
                let id = messages.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
                    _ => None,
                });
                log.ok.push((Instant::now(), id.unwrap_or(-1)));
            }
            Err(e) => {
                let text = match e.as_db_error() {
                    Some(db) => db.message().to_string(),
                    None => e.to_string(),
                };
                log.errors.push((Instant::now(), text));
                if conn.as_ref().unwrap().is_closed() {
                    conn = None;
                }
            }
        }
        if let Some(d) = every {
            tokio::time::sleep(d).await;
        }
    }
    log
}
