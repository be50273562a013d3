//! Test fixtures: real clusters, a database per test, and the real `pgleap`
//! binary run in an isolated environment.

pub mod cluster;
pub mod compare;
pub mod pooler;
pub mod sql;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

pub use cluster::{
    Cluster, OWNER, cluster, free_port, logical_cluster, private_cluster, tls_cluster,
};
pub use sql::Sql;

/// Defines one test per major (12, 15 and 17), named after it
/// (`name::pg12`, `name::pg17`, ...), so a failure names the version.
#[macro_export]
macro_rules! per_major {
    ($( $(#[$meta:meta])* fn $name:ident($major:ident: u32) $body:block )*) => {$(
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn run($major: u32) $body
            #[test] fn pg12() { run(12) }
            #[test] fn pg15() { run(15) }
            #[test] fn pg17() { run(17) }
        }
    )*};
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A database of its own for one test, owned by [`OWNER`]; dropped after.
pub struct TestDb {
    pub cluster: &'static Cluster,
    pub name: String,
}

impl TestDb {
    pub fn new(cluster: &'static Cluster, label: &str) -> TestDb {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{label}_{n}");
        cluster.superuser("postgres").exec(&format!("create database \"{name}\" owner {OWNER}"));
        TestDb { cluster, name }
    }

    /// A database of another encoding (the clusters run without a locale,
    /// so any encoding goes with the C collation).
    pub fn with_encoding(cluster: &'static Cluster, label: &str, encoding: &str) -> TestDb {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{label}_{n}");
        cluster.superuser("postgres").exec(&format!(
            "create database \"{name}\" owner {OWNER} encoding '{encoding}' template template0"
        ));
        TestDb { cluster, name }
    }

    /// A key/value connection string without a password.
    pub fn dsn(&self) -> String {
        format!("host=127.0.0.1 port={} dbname={} user={OWNER}", self.cluster.port, self.name)
    }

    /// The same as a URI.
    pub fn uri(&self) -> String {
        format!("postgresql://{OWNER}@127.0.0.1:{}/{}", self.cluster.port, self.name)
    }

    /// A session as the owner role.
    pub fn sql(&self) -> Sql {
        self.cluster.owner(&self.name)
    }
}

impl Drop for TestDb {
    /// Drops the database even while sessions linger on it: a terminated
    /// backend takes a moment to go, and a database left behind is disk a
    /// benchmark at scale 300 (gigabytes a run) cannot spare.
    fn drop(&mut self) {
        let admin = self.cluster.superuser("postgres");
        for _ in 0..50 {
            let dropped = admin.try_exec(&format!(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = '{}';
                 drop database if exists \"{}\"",
                self.name, self.name
            ));
            if dropped.is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// The result of one `pgleap` run.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "pgleap failed:\n{self}");
        &self.stdout
    }

    /// Asserts the error exit code and that stderr says all of `needles`.
    #[track_caller]
    pub fn fails_with(&self, needles: &[&str]) -> &str {
        assert_eq!(self.code, 2, "expected exit code 2:\n{self}");
        for needle in needles {
            assert!(self.stderr.contains(needle), "stderr lacks {needle:?}:\n{self}");
        }
        &self.stderr
    }

    /// The JSON on stdout whatever the exit code (`status` exits 1 when a
    /// sync needs attention, and still prints it).
    pub fn json_any(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{self}"))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}):\n{self}"))
    }
}

/// A daemon left running by a failed test would outlive it.
impl Drop for Pgleap {
    fn drop(&mut self) {
        let pid_file = self.catalog.with_extension("pid");
        if let Some(pid) =
            std::fs::read_to_string(pid_file).ok().and_then(|p| p.trim().parse().ok())
        {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs the real binary with its own HOME and catalog and no inherited PG*
/// variables. Every run is checked for leaked passwords.
pub struct Pgleap {
    home: tempfile::TempDir,
    /// The binary run: this build's, unless a benchmark compares another.
    bin: PathBuf,
    pub catalog: PathBuf,
    env: Vec<(String, String)>,
    secrets: Vec<String>,
}

impl Pgleap {
    pub fn new() -> Pgleap {
        let home = tempfile::tempdir().unwrap();
        let catalog = home.path().join("catalog.db");
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_pgleap"));
        Pgleap { home, bin, catalog, env: Vec::new(), secrets: Vec::new() }
    }

    /// A runner whose PGPASSWORD is the owner's password on `cluster`.
    pub fn for_cluster(cluster: &Cluster) -> Pgleap {
        Pgleap::new().env("PGPASSWORD", &cluster.owner_password)
    }

    /// A runner whose ~/.pgpass holds the owner's password of each cluster.
    pub fn for_clusters(clusters: &[&Cluster]) -> Pgleap {
        let mut p = Pgleap::new();
        let mut lines = String::new();
        for c in clusters {
            lines.push_str(&format!("127.0.0.1:{}:*:{OWNER}:{}\n", c.port, c.owner_password));
            p = p.secret(&c.owner_password);
        }
        let pgpass = p.home().join(".pgpass");
        std::fs::write(&pgpass, lines).unwrap();
        std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        p
    }

    /// Declares databases `src` and `dst`, relgroup `rg` on src (with
    /// `relgroup` selecting the members) and dbgroup `g` (src to dst): what
    /// most tests start from.
    pub fn declare(&self, src: &TestDb, dst: &TestDb, relgroup: &[&str]) {
        self.run(&["db", "add", "src", "--dsn", &src.dsn()]).ok();
        self.run(&["db", "add", "dst", "--dsn", &dst.dsn()]).ok();
        let mut args = vec!["relgroup", "add", "rg", "--db", "src"];
        args.extend(relgroup);
        self.run(&args).ok();
        self.run(&["dbgroup", "add", "g", "src:source", "dst:target"]).ok();
    }

    /// Adds sync `s` of relgroup `rg` along dbgroup `g`, with `options`.
    pub fn add_sync(&self, options: &[&str]) {
        let mut args = vec!["sync", "add", "s", "--relgroup", "rg", "--dbgroup", "g"];
        args.extend(options);
        self.run(&args).ok();
    }

    pub fn env(mut self, key: &str, value: &str) -> Pgleap {
        if key.contains("PASSWORD") {
            self.secrets.push(value.to_string());
        }
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Marks a string that must never appear in any output.
    pub fn secret(mut self, value: &str) -> Pgleap {
        self.secrets.push(value.to_string());
        self
    }

    /// Runs another pgleap binary (a benchmark's baseline build).
    #[allow(dead_code)] // Used by benches/cutover.rs, not by the tests.
    pub fn binary(mut self, bin: &std::path::Path) -> Pgleap {
        self.bin = bin.to_path_buf();
        self
    }

    pub fn home(&self) -> &std::path::Path {
        self.home.path()
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .env("USER", "pgleap-test")
            .env("PGLEAP_CATALOG", &self.catalog)
            // Many daemons run at once in the tests: no status page unless
            // a test asks for one.
            .env("PGLEAP_LISTEN", "off");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    #[track_caller]
    pub fn run(&self, args: &[&str]) -> Outcome {
        let out = self.command().args(args).output().expect("run pgleap");
        let outcome = Outcome {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        for secret in &self.secrets {
            assert!(
                !outcome.stdout.contains(secret.as_str())
                    && !outcome.stderr.contains(secret.as_str()),
                "a password was printed by pgleap {args:?}:\n{outcome}"
            );
        }
        outcome
    }
}

/// Client tools of the machine's PostgreSQL 15, able to talk to 12..17.
pub fn tool(name: &str) -> Command {
    Command::new(format!("/usr/lib/postgresql/15/bin/{name}"))
}

/// Makes `dst` a copy of `src` (schema and data), as the Bucardo recipe
/// does with pg_dump | psql before replication starts.
pub fn copy_database(src: &TestDb, dst: &TestDb) {
    let mut dump = tool("pg_dump")
        .args(["--no-owner", "--no-privileges", "-h", "127.0.0.1", "-U", OWNER])
        .args(["-p", &src.cluster.port.to_string(), &src.name])
        .env("PGPASSWORD", &src.cluster.owner_password)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let restore = tool("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", OWNER])
        .args(["-p", &dst.cluster.port.to_string(), "-d", &dst.name])
        .env("PGPASSWORD", &dst.cluster.owner_password)
        .stdin(dump.stdout.take().unwrap())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(dump.wait().unwrap().success(), "pg_dump failed");
    assert!(restore.status.success(), "psql failed: {}", String::from_utf8_lossy(&restore.stderr));
}

/// pgbench against a test database, as its owner; stderr is kept for the
/// failure message of [`finish`].
pub fn pgbench(db: &TestDb, args: &[&str]) -> Command {
    let mut cmd = tool("pgbench");
    cmd.args(["-h", "127.0.0.1", "-U", OWNER, "-p", &db.cluster.port.to_string()])
        .args(args)
        .arg(&db.name)
        .env("PGPASSWORD", &db.cluster.owner_password)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for a child (pgbench) and asserts it succeeded.
pub fn finish(child: std::process::Child) {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "pgbench: {}", String::from_utf8_lossy(&out.stderr));
}

/// Writes `statements(i)` in one transaction every 20 ms until the fence
/// refuses them; returns how many went through.
pub fn writes_until_fenced(
    sql: Sql,
    statements: impl Fn(u64) -> String + Send + 'static,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        for i in 0.. {
            match sql.try_exec(&format!("begin; {} commit;", statements(i))) {
                // The fence: the source moved.
                Err(e) if e.contains("moved to") => return i,
                // Taking the fence's locks can deadlock with this
                // transaction; an application retries.
                Err(e) if e.contains("deadlock") => {}
                Err(e) => panic!("{e}"),
                Ok(()) => {}
            }
            let _ = sql.try_exec("rollback");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        unreachable!()
    })
}

/// Runs `pgleap ARGS` made to die (as kill -9 would) at failpoint `at`.
pub fn killed_at(p: &Pgleap, at: &str, args: &[&str]) {
    let out = p.command().env("PGLEAP_FAILPOINT", at).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("failpoint {at}: aborting")), "did not reach {at}: {stderr}");
}
