//! Faults and bad input: refusals that leave nothing behind, no hangs, a
//! pid file that cannot point at a stranger, schema changes that stop the
//! sync loudly, and convergence after crashes at random points.

use std::time::{Duration, Instant};

use crate::support::{Pgleap, Sql, TestDb, cluster, finish, pgbench, private_cluster};

/// Everything a refused command must leave as it was: the catalog's
/// objects, and the relations of both databases.
fn state(p: &Pgleap, dbs: &[&TestDb]) -> String {
    let mut out = String::new();
    for noun in ["db", "dbgroup", "relgroup", "sync"] {
        out.push_str(p.run(&[noun, "list", "--json"]).ok());
    }
    for db in dbs {
        out.push_str(&db.cluster.superuser(&db.name).value(
            "select coalesce(string_agg(n.nspname || '.' || c.relname || ':' || c.relnatts, ',' \
                                        order by 1), '')
             from pg_class c join pg_namespace n on n.oid = c.relnamespace
             where n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast')",
        ));
    }
    out
}

#[test]
fn refusals_come_at_once_and_leave_nothing_behind() {
    let src = TestDb::new(cluster(12), "badsrc");
    let dst = TestDb::new(cluster(17), "baddst");
    src.sql().exec(
        "create table a (id int primary key, v text);
         create table b (id int primary key, w int);
         insert into a values (1, 'x'); insert into b values (1, 1);",
    );
    dst.sql().exec("create table b (id int primary key, other text)");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let before = state(&p, &[&src, &dst]);
    let timed = |args: &[&str], needles: &[&str]| {
        let started = Instant::now();
        let out = p.run(args);
        out.fails_with(needles);
        assert_eq!(out.code, 2, "{out}");
        assert!(out.stderr.contains("hint:"), "no hint: {out}");
        assert!(started.elapsed() < Duration::from_secs(30), "took {:?}: {out}", started.elapsed());
    };

    // The target is the source.
    timed(
        &["upgrade", "--source", &src.dsn(), "--target", &src.dsn(), "--cutover", "auto"],
        &["same database on the same server"],
    );
    // The target has a table of the same name with other columns.
    timed(
        &["upgrade", "--source", &src.dsn(), "--target", &dst.dsn(), "--cutover", "auto"],
        &[
            "other columns",
            "public.b (target: id integer, other text; source: id integer, w integer)",
        ],
    );
    assert_eq!(state(&p, &[&src, &dst]), before, "a refused upgrade wrote something");

    // Schema copy onto a conflicting table: one transaction, nothing left.
    p.run(&["db", "add", "src", "--dsn", &src.dsn()]).ok();
    p.run(&["db", "add", "dst", "--dsn", &dst.dsn()]).ok();
    let with_dbs = state(&p, &[&src, &dst]);
    timed(
        &["schema", "copy", "--from", "src", "--to", "dst"],
        &["restoring the schema (psql) failed", "relation \"b\" already exists"],
    );
    assert_eq!(state(&p, &[&src, &dst]), with_dbs, "schema copy left part of the schema");

    // A switch that cannot be set up is refused before anything else.
    timed(&["cutover", "missing", "--pgbouncer", "host=x"], &["--pgbouncer needs --pgbouncer-db"]);
}

#[test]
fn a_cut_over_sync_is_refused_at_once_by_cutover_and_kick() {
    let src = TestDb::new(cluster(15), "cutagainsrc");
    let dst = TestDb::new(cluster(17), "cutagaindst");
    let schema = "create table t (id int primary key)";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    p.run(&["cutover", "s"]).ok();
    for args in [&["cutover", "s"][..], &["kick", "s", "--wait", "60"][..]] {
        let started = Instant::now();
        p.run(args).fails_with(&["was cut over", "pgleap teardown s"]);
        assert!(started.elapsed() < Duration::from_secs(10), "{args:?} waited");
    }
    p.run(&["teardown", "s"]).ok();
}

#[test]
fn catalog_errors_say_what_to_do() {
    let p = Pgleap::new();
    std::fs::write(&p.catalog, b"this is not a catalog, just bytes that are long enough").unwrap();
    let out = p.run(&["db", "list"]);
    out.fails_with(&["not a pgleap catalog"]);
    let blocked = p.home().join("a-file");
    std::fs::write(&blocked, "").unwrap();
    let inside = blocked.join("catalog.db");
    let out = p.run(&["--catalog", inside.to_str().unwrap(), "db", "list"]);
    out.fails_with(&["cannot create the catalog", "--catalog PATH"]);
}

#[test]
fn a_stale_pid_file_is_never_signalled_and_sighup_keeps_the_daemon() {
    let p = Pgleap::new();
    let pid_file = p.catalog.with_extension("pid");
    let mut stranger = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    std::fs::write(&pid_file, format!("{}\n", stranger.id())).unwrap();
    let status = p.run(&["status"]);
    assert!(status.ok().contains("daemon: not running"), "{status}");
    assert!(status.stderr.contains("stale pid file"), "{status}");
    std::fs::write(&pid_file, format!("{}\n", stranger.id())).unwrap();
    assert!(p.run(&["stop"]).ok().contains("not running"));
    assert!(stranger.try_wait().unwrap().is_none(), "pgleap signalled a process it did not start");
    let _ = stranger.kill();
    let _ = stranger.wait();

    p.run(&["start"]).ok();
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    use std::os::unix::fs::PermissionsExt;
    for file in [&pid_file, &p.catalog.with_extension("log")] {
        let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    unsafe { libc::kill(pid, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(p.run(&["status"]).ok().contains(&format!("running (pid {pid})")));
    p.run(&["start"]).fails_with(&["already runs"]);
    p.run(&["stop"]).ok();
    assert!(!pid_file.exists());
}

/// Under the daemon: a column added with a literal default is followed;
/// a dropped one pauses the sync (status says so) until `sync resume`.
#[test]
fn the_daemon_follows_an_added_column_and_pauses_on_a_dropped_one_pg12_to_pg17() {
    let src = TestDb::new(cluster(12), "ddlsrc");
    let dst = TestDb::new(cluster(17), "ddldst");
    let schema = "create table t (id int primary key, v text)";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    src.sql().exec("insert into t select g, 'v' from generate_series(1, 100) g");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["start"]).ok();
    p.run(&["kick", "s", "--wait", "60"]).ok();

    src.sql().exec("alter table t add column extra int not null default 7");
    src.sql().exec("update t set extra = id where id <= 10");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let q = "select * from t order by id";
    assert_eq!(dst.sql().rows(q), src.sql().rows(q));

    src.sql().exec("alter table t drop column v; insert into t values (500, 1)");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = p.run(&["status", "s", "--json"]);
        let status = out.json_any();
        if status["syncs"][0]["targets"][0]["phase"] == "paused: schema changed" {
            // A sync that needs attention: status exits 1.
            assert_eq!(out.code, 1, "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "the daemon did not pause: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    dst.sql().exec("alter table t drop column v");
    p.run(&["sync", "resume", "s"]).ok();
    p.run(&["kick", "s", "--wait", "60"]).ok();
    assert_eq!(dst.sql().rows(q), src.sql().rows(q));
    p.run(&["stop"]).ok();
}

fn kill_daemon(p: &Pgleap) {
    let pid_file = p.catalog.with_extension("pid");
    if let Ok(pid) = std::fs::read_to_string(&pid_file)
        && let Ok(pid) = pid.trim().parse::<i32>()
    {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// A pseudo-random sequence without a crate: the fault points differ from
/// run to run (the seed is printed on failure).
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn converges_after_faults(major: u32) {
    // Servers of its own: the faults include restarts.
    let src = TestDb::new(private_cluster(major), &format!("fault{major}src"));
    let dst = TestDb::new(private_cluster(17), &format!("fault{major}dst"));
    finish(pgbench(&src, &["-i", "-q", "-s", "3"]).spawn().unwrap());
    src.sql().exec(
        "create table big (id bigint primary key, grp int not null, note text);
         create index big_grp on big (grp);
         insert into big select g, g % 97, md5(g::text) from generate_series(1, 300000) g;
         analyze big;
         create table evt (id serial primary key, round int not null);",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    p.add_sync(&["--onetimecopy", "always"]);
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64
            | 1;
    let mut dice = Dice(seed);
    let mut load = pgbench(&src, &["-n", "-c", "2", "-R", "100", "-T", "120"]).spawn().unwrap();
    let admin = |db: &TestDb| db.cluster.superuser("postgres");
    // A transaction held open across many batches, committed half-way.
    let long = src.sql();
    long.exec("begin; insert into evt (round) values (-1)");
    let mut faults = Vec::new();
    for round in 0..14 {
        // Running already after a fault that spared it.
        let _ = p.run(&["start"]);
        std::thread::sleep(Duration::from_millis(200 + dice.below(1500)));
        if round == 7 {
            // Gone if a restart ended it: either way the sync must agree.
            let _ = long.try_exec("commit");
        }
        let fault = match dice.below(6) {
            4 => {
                src.cluster.restart();
                "source restarted"
            }
            5 => {
                dst.cluster.restart();
                "target restarted"
            }
            0 | 1 => {
                kill_daemon(&p);
                "kill -9 of the daemon"
            }
            2 => {
                let _ = admin(&dst).try_exec(&format!(
                    "select pg_terminate_backend(pid) from pg_stat_activity
                     where datname = '{}' and application_name = 'pgleap'",
                    dst.name
                ));
                "pgleap's target backends terminated"
            }
            _ => {
                let _ = admin(&src).try_exec(&format!(
                    "select pg_terminate_backend(pid) from pg_stat_activity
                     where datname = '{}' and application_name = 'pgleap'",
                    src.name
                ));
                "pgleap's source backends terminated"
            }
        };
        faults.push(format!("{round}: {fault}"));
        src.sql().exec(&format!(
            "update big set note = 'round {round}' where id % 1000 = {};
             insert into big values ({}, 1, 'new');
             insert into evt (round) select {round} from generate_series(1, 5)",
            round,
            400_000 + round
        ));
    }
    let _ = load.kill();
    let _ = load.wait();
    let _ = p.run(&["start"]);
    let context = format!("seed {seed}, faults {faults:?}");
    p.run(&["kick", "s", "--wait", "300"]).ok();
    let verify = p.run(&["verify", "s", "--json"]);
    assert_eq!(verify.code, 0, "{context}\n{verify}");
    let objects = |sql: &Sql| {
        sql.rows(
            "select c.relname, i.relname, x.indisvalid from pg_index x
             join pg_class c on c.oid = x.indrelid join pg_class i on i.oid = x.indexrelid
             join pg_namespace n on n.oid = c.relnamespace where n.nspname = 'public'
             order by 1, 2",
        )
    };
    assert_eq!(objects(&dst.sql()), objects(&src.sql()), "{context}");
    let seq = "select last_value from evt_id_seq";
    assert_eq!(dst.sql().value(seq), src.sql().value(seq), "{context}");
    p.run(&["stop"]).ok();
}

#[test]
fn converges_after_faults_at_random_points_pg12_to_pg17() {
    converges_after_faults(12);
}

#[test]
fn converges_after_faults_at_random_points_pg15_to_pg17() {
    converges_after_faults(15);
}

/// Under systemd: READY=1 on the notify socket once the workers run;
/// SIGTERM stops the daemon even when its stderr is a closed pipe.
#[test]
fn the_daemon_behaves_as_a_systemd_service() {
    use std::os::unix::net::UnixDatagram;
    let p = Pgleap::new();
    let socket_path = p.home().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut daemon = p
        .command()
        .env("NOTIFY_SOCKET", &socket_path)
        .args(["start", "--foreground"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut got = String::new();
    while !got.contains("READY=1") {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("no READY=1 on NOTIFY_SOCKET");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    // The reading end goes away, as with a dead log pipe.
    drop(daemon.stderr.take());
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(daemon.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    assert!(daemon.try_wait().unwrap().is_none(), "SIGHUP stopped the daemon");
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not stop the daemon");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Output into a pipe whose reader is gone (`pgleap db list --json | head`
/// after head exited) ends quietly with exit 0, not a panic (exit 101).
#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let db = TestDb::new(cluster(17), "pipe");
    let p = Pgleap::for_cluster(db.cluster);
    p.run(&["db", "add", "d", "--dsn", &db.dsn()]).ok();
    for args in [&["db", "list", "--json"][..], &["status"][..], &["db", "list"][..]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = p.command().args(args).stdout(writer).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `start` where the status page's address is taken (by another pgleap's
/// daemon) refuses, saying so and what to pass, instead of saying it
/// started while the page there shows another migration.
#[test]
fn a_taken_listen_address_refuses_the_start() {
    let addr = format!("127.0.0.1:{}", crate::support::cluster::free_port());
    let first = Pgleap::new().env("PGLEAP_LISTEN", &addr);
    let second = Pgleap::new().env("PGLEAP_LISTEN", &addr);
    first.run(&["start"]).ok();
    second.run(&["start"]).fails_with(&[
        &format!("the daemon did not start: cannot serve the status page on {addr}"),
        "--listen off",
    ]);
    assert!(second.run(&["status"]).ok().contains("daemon: not running"));
    // The same catalog's second start names the running daemon.
    first.run(&["start"]).fails_with(&["already runs"]);
    first.run(&["stop"]).ok();
}

/// A cutover before the initial copy is done refuses at once, saying what
/// to run, instead of running the whole copy inline while the operator
/// expects seconds; nothing is copied or fenced.
#[test]
fn a_cutover_before_the_initial_copy_refuses_and_says_start() {
    let src = TestDb::new(cluster(17), "earlysrc");
    let dst = TestDb::new(cluster(17), "earlydst");
    let schema = "create table t (id int primary key)";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    src.sql().exec("insert into t select generate_series(1, 100)");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    let started = Instant::now();
    p.run(&["cutover", "s"]).fails_with(&[
        "sync \"s\" has not finished its initial copy to \"dst\" (not started)",
        "pgleap start",
        "pgleap ready s",
    ]);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(dst.sql().value("select count(*) from t"), "0", "copied inline");
    src.sql().exec("insert into t values (1000)");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    p.run(&["cutover", "s"]).ok();
    assert_eq!(dst.sql().value("select count(*) from t"), "101");
    p.run(&["teardown", "s"]).ok();
}

/// A server that stopped answering (SIGSTOP) never hangs pgleap: status
/// answers within seconds naming the target ("no answer in 5 s", exit 1),
/// kick --wait returns at its limit (exit 1), and after SIGCONT the sync
/// converges.
#[test]
fn a_hung_target_bounds_status_and_kick_and_converges_after() {
    let source = private_cluster(17);
    let src = TestDb::new(source, "hungsrc");
    let target = private_cluster(17);
    let dst = TestDb::new(target, "hungdst");
    let schema = "create table t (id int primary key, v text)";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    src.sql().exec("insert into t values (1, 'during the hang')");

    target.freeze(true);
    let started = Instant::now();
    let status = p.run(&["status"]);
    let took = started.elapsed();
    let kicked = Instant::now();
    let kick = p.run(&["kick", "s", "--wait", "5"]);
    let kick_took = kicked.elapsed();
    target.freeze(false);

    assert_eq!(status.code, 1, "{status}");
    assert!(status.stdout.contains("target dst cannot be read: dst: no answer in 5 s"), "{status}");
    assert!(took < Duration::from_secs(15), "status took {took:?}");
    assert_eq!(kick.code, 1, "{kick}");
    assert!(kick.stderr.contains("did not catch up in time"), "{kick}");
    assert!(kick.stderr.contains("no answer within 5 s"), "{kick}");
    assert!(kick_took < Duration::from_secs(10), "kick --wait 5 took {kick_took:?}");

    p.run(&["kick", "s", "--wait", "60"]).ok();
    assert_eq!(dst.sql().value("select v from t where id = 1"), "during the hang");

    // The same of a hung source.
    source.freeze(true);
    let started = Instant::now();
    let status = p.run(&["status"]);
    let took = started.elapsed();
    source.freeze(false);
    assert_eq!(status.code, 1, "{status}");
    assert!(status.stdout.contains("src: no answer in 5 s"), "{status}");
    assert!(took < Duration::from_secs(15), "status took {took:?}");
    p.run(&["teardown", "s"]).ok();
}

/// A `sync add` refused because a table stays locked writes nothing: no
/// capture schema, trigger or catalog entry is left on either side, and
/// the same `sync add` goes through once the lock is gone.
#[test]
fn a_sync_add_refused_by_a_locked_table_leaves_nothing_pg17() {
    let src = TestDb::new(cluster(17), "lockedaddsrc");
    let dst = TestDb::new(cluster(17), "lockedadddst");
    for db in [&src, &dst] {
        db.sql().exec("create table t (id int primary key); create table u (id int primary key)");
    }
    let p = Pgleap::for_clusters(&[src.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    let holder = src.sql();
    holder.exec("begin; lock table u in access exclusive mode");
    let out = p.run(&["sync", "add", "s", "--relgroup", "rg", "--dbgroup", "g"]);
    out.fails_with(&["stayed locked"]);
    holder.exec("rollback");
    let leftovers = "select (select count(*) from pg_namespace where nspname = 'pgleap')
                          + (select count(*) from pg_trigger where tgname like 'pgleap%')";
    assert_eq!(src.sql().value(leftovers), "0", "left on the source");
    assert_eq!(dst.sql().value(leftovers), "0", "left on the target");
    let listed = p.run(&["sync", "list", "--json"]);
    assert_eq!(listed.json_any(), serde_json::json!([]), "{listed}");
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    p.run(&["teardown", "s"]).ok();
}

/// Three databases with the same table, and a catalog whose sync `s`
/// copied the first to the second: (from, to, a third, that catalog).
fn migration_beside(label: &str) -> (TestDb, TestDb, TestDb, Pgleap) {
    let dbs = ["from", "to", "third"].map(|n| TestDb::new(cluster(17), &format!("{label}{n}")));
    for db in &dbs {
        db.sql().exec("create table t (id int primary key)");
    }
    let [from, to, third] = dbs;
    let p = Pgleap::for_clusters(&[from.cluster]);
    p.declare(&from, &to, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    (from, to, third, p)
}

/// A target that another migration fenced (it was that migration's old
/// server, cut over with --terminate) is refused by upgrade and sync add
/// before anything is written, naming the fence.
#[test]
fn a_target_fenced_by_another_migration_is_refused_before_anything_is_written() {
    // Another migration moves b to c; its cutover fences b.
    let (b, _c, a, other) = migration_beside("fence");
    other.run(&["cutover", "s", "--terminate"]).ok();

    let p = Pgleap::for_clusters(&[a.cluster]);
    p.run(&["upgrade", "--source", &a.dsn(), "--target", &b.dsn(), "--cutover", "never"])
        .fails_with(&[
            "was the old server of another migration and refuses writes",
            "public.t (pgleap_1_fence)",
            "read-only transactions",
        ]);
    assert_eq!(p.run(&["db", "list", "--json"]).json(), serde_json::json!([]));
    p.declare(&a, &b, &["--all-tables"]);
    p.run(&["sync", "add", "s", "--relgroup", "rg", "--dbgroup", "g"])
        .fails_with(&["target \"dst\" was the old server of another migration"]);
    assert_eq!(a.sql().value("select count(*) from pg_namespace where nspname = 'pgleap'"), "0");
    other.run(&["teardown", "s", "--unfence"]).ok();
}

/// Ctrl-C during upgrade's initial copy says what was interrupted and how
/// to resume (exit 130); status then says nothing copies (exit 1) rather
/// than show progress nobody makes; the rerun says it resumes and ends
/// equal.
#[test]
fn an_interrupted_upgrade_says_so_and_status_shows_no_phantom_copy_pg15_to_pg17() {
    use std::io::BufRead;
    let src = TestDb::new(cluster(15), "intsrc");
    let dst = TestDb::new(cluster(17), "intdst");
    finish(pgbench(&src, &["-i", "-q", "-s", "10"]).spawn().unwrap());
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let args = ["upgrade", "--source", &src.dsn(), "--target", &dst.dsn(), "--cutover", "never"];
    let mut child = p
        .command()
        .args(args)
        .args(["--jobs", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    for line in stdout.lines() {
        if line.unwrap().starts_with("initial copy and catch-up") {
            break;
        }
    }
    // Interrupted once the copy has recorded its parts (a fixed wait raced
    // a loaded machine: the copy had not begun, and status rightly said
    // nothing was copying yet).
    let begun = "do $$ begin
                     if (select count(*) from pgleap.copy_units) = 0 then raise 'none'; end if;
                 end $$";
    let started = std::time::Instant::now();
    while dst.sql().try_exec(begun).is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "the copy never began");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted: pgleap upgrade stopped"), "{stderr}");
    assert!(stderr.contains("run pgleap upgrade again to resume"), "{stderr}");

    let status = p.run(&["status"]);
    assert_eq!(status.code, 1, "{status}");
    assert!(status.stdout.contains("copy interrupted"), "{status}");
    assert!(!status.stdout.contains("copying ("), "{status}");

    let again = p.run(&args);
    assert!(again.ok().contains("resuming: upgrade \"upgrade\" was started before"), "{again}");
    p.run(&["stop"]).ok();
    let q = "select sum(abalance), count(*) from pgbench_accounts";
    assert_eq!(dst.sql().value(q), src.sql().value(q));
    p.run(&["teardown", "upgrade"]).ok();
}

/// A sync named like another catalog's live sync on the same source is
/// refused without a hint to tear that one down.
#[test]
fn a_sync_named_like_another_catalogs_live_sync_is_refused_without_a_teardown_hint() {
    let (a, _b, c, first) = migration_beside("twin");
    let second = Pgleap::for_clusters(&[a.cluster]);
    second.declare(&a, &c, &["--all-tables"]);
    let out = second.run(&["sync", "add", "s", "--relgroup", "rg", "--dbgroup", "g"]);
    out.fails_with(&["already has an active sync named \"s\"", "give this sync another name"]);
    assert!(!out.stderr.contains("pgleap teardown"), "{out}");
    first.run(&["teardown", "s"]).ok();
}

/// An apply blocked by a lock on the target is visible: status names the
/// table and the pid holding it, and past 30 s shows the sync blocked
/// (exit 1); the daemon records the stuck batch bad past its limit (3 s
/// here) while it waits; once the lock goes, the change arrives and the
/// sync is good again.
#[test]
fn a_blocked_apply_is_named_with_its_table_and_blocker_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "blocksrc");
    let dst = TestDb::new(cluster(17), "blockdst");
    let schema = "create table t (id int primary key, v text)";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    let p =
        Pgleap::for_clusters(&[src.cluster, dst.cluster]).env("PGLEAP_STUCK_AFTER_SECONDS", "3");
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let holder = dst.sql();
    holder.exec("begin; lock table t in access exclusive mode");
    let holder_pid = holder.value("select pg_backend_pid()");
    p.run(&["start"]).ok();
    src.sql().exec("insert into t values (1, 'behind a lock')");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let out = p.run(&["status", "s"]);
        if out.stdout.contains("blocked: waiting") || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    assert_eq!(status.code, 1, "{status}");
    assert!(
        status.stdout.contains(&format!("for a lock on public.t held by pid {holder_pid}")),
        "{status}"
    );
    let json = p.run(&["status", "s", "--json"]).json_any();
    let t = &json["syncs"][0]["targets"][0];
    assert_eq!(t["state"], "bad", "{json}");
    assert!(t["last_error"].as_str().unwrap_or("").contains("without finishing"), "{json}");
    holder.exec("rollback");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    assert_eq!(dst.sql().value("select v from t where id = 1"), "behind a lock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.run(&["status", "s", "--json"]).json_any()["syncs"][0]["targets"][0]["state"] != "good"
    {
        assert!(Instant::now() < deadline, "the daemon's round did not become good again");
        std::thread::sleep(Duration::from_millis(500));
    }
    p.run(&["stop"]).ok();
    p.run(&["teardown", "s"]).ok();
}

/// `--log-format json`: the daemon started in the background writes one
/// JSON object a line, for a log shipper.
#[test]
fn the_daemon_logs_json_lines_when_asked() {
    let p = Pgleap::new();
    p.run(&["start", "--log-format", "json"]).ok();
    p.run(&["stop"]).ok();
    let log = std::fs::read_to_string(p.catalog.with_extension("log")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|v| v["level"] == "INFO" && v["fields"]["message"] == "daemon started"),
        "{log}"
    );
}

/// A batch on a server with a small lock table: a sync of 600 tables with
/// a sequence each (schema-per-tenant), every table written while no
/// daemon ran, on servers whose shared lock table holds a few hundred
/// locks (`max_locks_per_transaction = 10`, 20 connections). One
/// transaction naming every table, or every sequence, fails there with
/// "out of shared memory", again at every retry: a stuck sync. The batch
/// goes table by table instead (a catch-up) and sequences by slices, and
/// the target ends equal, rows and sequences. Teardown, which must remove
/// every table's capture at once, refuses there and names the setting.
#[test]
fn a_batch_naming_more_tables_than_the_lock_table_holds_converges_pg15() {
    more_tables_than_the_lock_table_holds(private_cluster(15), "triggers");
}

/// The same captured by logical decoding: one pump writing the changes of
/// 600 tables into their deltas would name them all in one transaction;
/// it goes by slices of tables instead.
#[test]
fn a_pump_naming_more_tables_than_the_lock_table_holds_converges_pg15() {
    more_tables_than_the_lock_table_holds(cluster::logical_cluster(15), "decoding");
}

fn more_tables_than_the_lock_table_holds(server: &'static cluster::Cluster, capture: &str) {
    let src = TestDb::new(server, "locksrc");
    let dst = TestDb::new(server, "lockdst");
    let schema = "do $$ begin
        for i in 1..600 loop
            execute format('create table t%s (id serial primary key, v text)', i);
        end loop; end $$;";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    src.sql().exec(
        "do $$ begin
            for i in 1..600 loop
                execute format('insert into t%s (v) values (''copied'')', i);
            end loop; end $$;",
    );
    let p = Pgleap::for_cluster(server);
    p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off", "--capture", capture]);
    p.run(&["kick", "s", "--wait", "300"]).ok();

    // One autocommit statement a table: the application's own
    // transactions stay small.
    let s = src.sql();
    for i in 1..=600 {
        s.exec(&format!(
            "insert into t{i} (v) values ('while stopped'); update t{i} set v = 'changed' where id = 1"
        ));
    }
    let su = server.superuser("postgres");
    su.exec("alter system set max_locks_per_transaction = 10");
    su.exec("alter system set max_connections = 20");
    server.restart();
    // The application holds a share of the lock table meanwhile (a
    // transaction that read 150 tables), as a busy server's sessions do.
    let log_path = server.socket_dir.parent().unwrap().join("server.log");
    let logged_before = std::fs::read_to_string(&log_path).unwrap().len();
    let app = dst.sql();
    app.exec(
        "begin; do $$ begin
             for i in 301..450 loop
                 execute format('lock table t%s in access share mode', i);
             end loop; end $$;",
    );
    let out = p.run(&["kick", "s", "--wait", "60", "--jobs", "2"]);
    // The kick's sessions end as it exits: each drops its temp tables
    // then, in one transaction.
    let pgleap_sessions = "select count(*) from pg_stat_activity
                           where datname = current_database() and application_name = 'pgleap'";
    for _ in 0..100 {
        if app.value(pgleap_sessions) == "0" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    app.exec("commit");
    let log = std::fs::read_to_string(&log_path).unwrap();
    if out.code != 0 {
        eprintln!("STATUS {}", p.run(&["status", "s"]).stdout);
        eprintln!("LOG {}", &log[log.len().saturating_sub(6000)..]);
    }
    // No session of pgleap's, nor of the application's, ran out of locks:
    // not a batch's, nor a worker's as its connection closed (which had
    // kept a temp table for every table it applied, 300, and took a lock
    // on each and on their types as it ended).
    let lines: Vec<&str> = log[logged_before..].lines().collect();
    let exhausted: Vec<String> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("out of shared memory"))
        .map(|(i, l)| format!("{l} {}", lines.get(i + 2).map_or("", |s| &s[..s.len().min(300)])))
        .collect();
    assert!(exhausted.is_empty(), "{exhausted:#?}");
    let reset = || {
        let su = server.superuser("postgres");
        su.exec("alter system reset max_locks_per_transaction");
        su.exec("alter system reset max_connections");
        server.restart();
    };
    assert_eq!(out.code, 0, "kick failed: {}", out.stderr);
    let status = p.run(&["status", "s", "--json"]);
    let teardown = p.run(&["teardown", "s"]);
    reset();
    assert_eq!(status.code, 0, "{}", status.stderr);
    teardown.fails_with(&["out of shared memory", "raise max_locks_per_transaction"]);
    p.run(&["teardown", "s"]).ok();
    let (s, d) = (src.sql(), dst.sql());
    assert_eq!(crate::support::compare::rows(&d), crate::support::compare::rows(&s));
    let sequences = "select string_agg(last_value::text, ',' order by sequencename)
                     from pg_sequences where schemaname = 'public'";
    assert_eq!(d.value(sequences), s.value(sequences));
    assert_eq!(d.value("select count(*) from pg_sequences where last_value = 2"), "600");
    assert_eq!(d.value("select count(*) from t600"), "2");
}
