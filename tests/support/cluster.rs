//! Throwaway PostgreSQL clusters for the tests.
//!
//! One cluster per major (and one TLS-only cluster) is started lazily the
//! first time a test asks for it, and shared by every test of the process;
//! each test then works in databases of its own. Servers are started in a
//! temp directory, on a free port, listening on TCP and on a unix socket in
//! that directory. When the tests run as root the servers run as an
//! unprivileged user (initdb refuses root).
//!
//! Stopping: the postmaster gets SIGQUIT (immediate shutdown) as its parent
//! death signal, so it goes away when the test process does, whether the
//! tests passed, panicked or the process was killed. An exit hook also stops
//! the servers and removes their directories on a normal exit, and leftovers
//! of a killed run are removed by the next one.

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::sql::Sql;

/// The role tests migrate as: shaped like RDS's master user, not superuser.
pub const OWNER: &str = "pgleap_owner";

pub struct Cluster {
    pub major: u32,
    bin: PathBuf,
    dir: PathBuf,
    owner_uid: Option<(u32, u32)>,
    pid: Mutex<i32>,
    pub port: u16,
    pub socket_dir: PathBuf,
    pub owner_password: String,
    /// CA certificate (PEM) of a TLS-only cluster.
    pub ca_file: Option<PathBuf>,
}

struct RunningServer {
    pid: i32,
    dir: PathBuf,
}

static RUNNING: Mutex<Vec<RunningServer>> = Mutex::new(Vec::new());
static CLUSTERS: OnceLock<Mutex<HashMap<(u32, bool), &'static Cluster>>> = OnceLock::new();

/// The shared cluster of a major.
pub fn cluster(major: u32) -> &'static Cluster {
    get(major, false)
}

/// A cluster that accepts only TLS connections, with a certificate for
/// "localhost" signed by a test CA.
pub fn tls_cluster() -> &'static Cluster {
    get(17, true)
}

/// A cluster of the caller's own, for a test that restarts it. Stopped when
/// the process ends, like the shared ones.
pub fn private_cluster(major: u32) -> &'static Cluster {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    init();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Box::leak(Box::new(Cluster::start(major, false, &format!("-private{n}"))))
}

/// Whether every cluster allows logical decoding (`PGLEAP_TEST_DECODING=1`,
/// `scripts/test --decoding`): then `--capture auto`, the default, captures
/// by decoding wherever it can, and the whole suite runs on that path.
pub fn decoding_everywhere() -> bool {
    std::env::var("PGLEAP_TEST_DECODING").is_ok_and(|v| v == "1")
}

/// A cluster of the caller's own where the migrating role may use logical
/// decoding, set up as an administrator would: wal_level = logical (a
/// restart) and the role granted REPLICATION by the superuser.
pub fn logical_cluster(major: u32) -> &'static Cluster {
    let c = private_cluster(major);
    let su = c.superuser("postgres");
    su.exec("alter system set wal_level = logical");
    su.exec(&format!("alter role {OWNER} replication"));
    c.restart();
    c
}

fn init() -> &'static Mutex<HashMap<(u32, bool), &'static Cluster>> {
    CLUSTERS.get_or_init(|| {
        remove_leftovers();
        unsafe { libc::atexit(stop_all) };
        Mutex::new(HashMap::new())
    })
}

fn get(major: u32, tls: bool) -> &'static Cluster {
    // Held while starting, so two tests never start the same cluster twice.
    let mut map = init().lock().unwrap_or_else(|e| e.into_inner());
    map.entry((major, tls)).or_insert_with(|| {
        Box::leak(Box::new(Cluster::start(major, tls, if tls { "-tls" } else { "" })))
    })
}

pub(crate) fn base_dir() -> PathBuf {
    std::env::temp_dir().join("pgleap-tests")
}

/// Removes the directories of earlier test processes that no longer run.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir(base_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid: Option<i32> = name.split('-').next().and_then(|p| p.parse().ok());
        if let Some(pid) = pid
            && pid != std::process::id() as i32
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

extern "C" fn stop_all() {
    let servers = RUNNING.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
    for s in &servers {
        unsafe { libc::kill(s.pid, libc::SIGQUIT) };
    }
    for s in &servers {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{}", s.pid)).exists() && Instant::now() < deadline {
            let mut status = 0;
            unsafe { libc::waitpid(s.pid, &mut status, libc::WNOHANG) };
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&s.dir);
    }
}

/// Where the binaries of a major are: Debian's packages for the machine's
/// own major, else what scripts/install-pg put in its cache.
pub fn bin_dir(major: u32) -> PathBuf {
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if debian.join("postgres").exists() {
        return debian;
    }
    let cache = match std::env::var_os("PGLEAP_PG_CACHE") {
        Some(c) => PathBuf::from(c),
        None if unsafe { libc::geteuid() } == 0 => PathBuf::from("/var/cache/pgleap/pg"),
        None => dirs_cache().join("pgleap/pg"),
    };
    let dir = cache.join(major.to_string()).join("bin");
    assert!(
        dir.join("postgres").exists(),
        "PostgreSQL {major} binaries not found in {} or {}: run scripts/install-pg",
        debian.display(),
        dir.display()
    );
    dir
}

fn dirs_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache"))
}

/// The unprivileged user servers run as when we are root.
pub(crate) fn server_user() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for wanted in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3 && f[0] == wanted {
                return Some((f[2].parse().unwrap(), f[3].parse().unwrap()));
            }
        }
    }
    panic!("running as root, and neither a postgres nor a nobody user exists to run servers");
}

pub(crate) fn chown(path: &Path, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn random_token() -> String {
    let mut bytes = [0u8; 12];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn run(cmd: &mut Command, owner: Option<(u32, u32)>, what: &str) {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    fn start(major: u32, tls: bool, suffix: &str) -> Cluster {
        let bin = bin_dir(major);
        let owner = server_user();
        let name = format!("{}-pg{major}{suffix}", std::process::id());
        let dir = base_dir().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(base_dir(), std::os::unix::fs::PermissionsExt::from_mode(0o1777))
            .unwrap();
        chown(&dir, owner);
        let data = dir.join("data");
        let socket_dir = dir.join("sock");
        std::fs::create_dir_all(&socket_dir).unwrap();
        chown(&socket_dir, owner);

        let superuser_password = random_token();
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, &superuser_password).unwrap();
        chown(&pwfile, owner);
        run(
            Command::new(bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "-E", "UTF8", "--no-locale", "--no-sync"])
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", pwfile.display())),
            owner,
            &format!("initdb (PostgreSQL {major})"),
        );
        std::fs::remove_file(&pwfile).unwrap();

        let port = free_port();
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             max_connections = 200\nshared_buffers = 32MB\n\
             password_encryption = 'scram-sha-256'\n",
            socket_dir.display()
        );
        if decoding_everywhere() {
            conf.push_str("wal_level = logical\nmax_replication_slots = 200\n");
        }
        let mut ca_file = None;
        if tls {
            let files = make_certificates(&dir, owner);
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                files.0.display(),
                files.1.display()
            ));
            ca_file = Some(files.2);
            // TCP only over TLS; plain TCP is turned away.
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256\n\
                 hostnossl all all 127.0.0.1/32 reject\n",
            )
            .unwrap();
        }
        let mut f =
            std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();

        let log = dir.join("server.log");
        let pid = spawn_postmaster(&bin, &data, &log, owner);
        RUNNING.lock().unwrap().push(RunningServer { pid, dir: dir.clone() });

        let cluster = Cluster {
            major,
            bin,
            dir,
            owner_uid: owner,
            pid: Mutex::new(pid),
            port,
            socket_dir,
            owner_password: random_token(),
            ca_file,
        };
        cluster.wait_ready(pid, &log);
        let replication = if decoding_everywhere() { " replication" } else { "" };
        cluster.superuser("postgres").exec(&format!(
            "create role {OWNER} login createdb createrole{replication} password '{}'",
            cluster.owner_password
        ));
        cluster
    }

    fn wait_ready(&self, pid: i32, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if Sql::try_connect(self, "postgres", "postgres").is_ok() {
                return;
            }
            let alive = Path::new(&format!("/proc/{pid}")).exists();
            if !alive || Instant::now() > deadline {
                panic!(
                    "PostgreSQL {} did not start:\n{}",
                    self.major,
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Restarts the server (fast shutdown, then start), as an operator or a
    /// crash-restart would: every connection is cut.
    pub fn restart(&self) {
        let mut pid = self.pid.lock().unwrap();
        unsafe { libc::kill(*pid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{}", *pid)).exists() {
            assert!(Instant::now() < deadline, "PostgreSQL {} did not stop", self.major);
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = self.dir.join("server.log");
        let new = spawn_postmaster(&self.bin, &self.dir.join("data"), &log, self.owner_uid);
        for s in RUNNING.lock().unwrap().iter_mut().filter(|s| s.dir == self.dir) {
            s.pid = new;
        }
        *pid = new;
        self.wait_ready(new, &log);
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the postmaster: a server that
    /// accepts connections at the socket and then never answers them.
    /// The server's CPU time so far, in seconds: the postmaster's and its
    /// live children's, and what its exited children (ended sessions)
    /// used. For benchmarks: the source's cost per transaction.
    #[allow(dead_code, reason = "used by benches/tax.rs, which shares this harness")]
    pub fn cpu_seconds(&self) -> f64 {
        let pid = *self.pid.lock().unwrap();
        let ticks = |stat: &str, fields: std::ops::Range<usize>| -> u64 {
            // After the command name, which may hold spaces, in parentheses.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            fields.filter_map(|i| f.get(i - 3)?.parse::<u64>().ok()).sum()
        };
        let mut total = 0;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse::<i32>().ok());
            let me = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) == Some(pid);
            if me {
                // utime, stime, cutime, cstime (fields 14-17).
                total += ticks(&stat, 14..18);
            } else if ppid == Some(pid) {
                total += ticks(&stat, 14..16);
            }
        }
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        total as f64 / hz
    }

    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        unsafe { libc::kill(*self.pid.lock().unwrap(), sig) };
    }

    /// A superuser session, for setting up what a test needs.
    pub fn superuser(&self, dbname: &str) -> Sql {
        Sql::try_connect(self, "postgres", dbname)
            .unwrap_or_else(|e| panic!("superuser connection to PostgreSQL {}: {e}", self.major))
    }

    /// A session as the owner role.
    pub fn owner(&self, dbname: &str) -> Sql {
        Sql::try_connect(self, OWNER, dbname)
            .unwrap_or_else(|e| panic!("owner connection to PostgreSQL {}: {e}", self.major))
    }
}

/// Starts the postmaster from a thread that lives as long as the process, so
/// that the parent-death signal fires when the process ends, not when the
/// test thread that happened to start it does.
fn spawn_postmaster(bin: &Path, data: &Path, log: &Path, owner: Option<(u32, u32)>) -> i32 {
    let (tx, rx) = std::sync::mpsc::channel();
    let bin = bin.to_path_buf();
    let data = data.to_path_buf();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    std::thread::spawn(move || {
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D").arg(&data).stdin(Stdio::null());
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        if let Some((uid, gid)) = owner {
            cmd.uid(uid).gid(gid);
        }
        // Runs after the uid change, which would otherwise clear it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn postgres");
        tx.send(child.id() as i32).unwrap();
        let _ = child.wait();
        // Keep the thread (the parent of record) alive until the process ends.
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap()
}

/// A CA and a server certificate for "localhost"; returns (cert, key, ca).
fn make_certificates(dir: &Path, owner: Option<(u32, u32)>) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "pgleap test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let mut server_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server_params.distinguished_name.push(DnType::CommonName, "localhost");
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    let ca = dir.join("ca.crt");
    std::fs::write(&cert, server_cert.pem()).unwrap();
    std::fs::write(&key, server_key.serialize_pem()).unwrap();
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    chown(&cert, owner);
    chown(&key, owner);
    (cert, key, ca)
}
