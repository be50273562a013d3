//! The switch through a real PgBouncer: clients writing through the pooler
//! see a pause, not an error, at cutover and at rollback; a failing switch
//! leaves the old server taking the writes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::support::pooler::{APP_USER, Bouncer, Probe, ProbeLog, app_role};
use crate::support::{Pgleap, TestDb, cluster, killed_at};

const SCHEMA: &str = "
    create table probe (id bigserial primary key, client int not null,
                        at timestamptz not null default clock_timestamp());
    create table account (id int primary key, balance int not null);
    insert into account select g, 0 from generate_series(1, 100) g;";

fn grants(db: &TestDb) {
    db.sql().exec(&format!(
        "grant select, insert on probe to {APP_USER};
         grant usage on sequence probe_id_seq to {APP_USER};"
    ));
}

/// Source 12 and target 17 with the probe table, the app role on both
/// (its grants too: privileges are the operator's, see ARCHITECTURE), a
/// sync running, and a pooler pointing at the source.
fn setup(label: &str) -> (TestDb, TestDb, Pgleap, Bouncer) {
    let src = TestDb::new(cluster(12), &format!("{label}src"));
    let dst = TestDb::new(cluster(17), &format!("{label}dst"));
    app_role(&src);
    app_role(&dst);
    src.sql().exec(SCHEMA);
    grants(&src);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    grants(&dst);
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["start"]).ok();
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let bouncer = Bouncer::start(&src);
    (src, dst, p, bouncer)
}

fn ids(db: &TestDb) -> BTreeSet<i64> {
    db.sql()
        .rows("select id from probe")
        .into_iter()
        .map(|r| r[0].as_deref().unwrap().parse().unwrap())
        .collect()
}

fn acknowledged(logs: &[&ProbeLog]) -> BTreeSet<i64> {
    logs.iter().flat_map(|l| l.ok.iter().map(|(_, id)| *id)).collect()
}

#[test]
fn clients_see_a_pause_not_an_error_at_cutover_and_rollback_through_pgbouncer() {
    let (src, dst, p, bouncer) = setup("bounce");
    // A second pooler in front of the same database: both move together.
    let second = Bouncer::start(&src);
    let rated = Probe::start(bouncer.port, "app", 1, Some(Duration::from_millis(5)));
    let flat = Probe::start(second.port, "app", 2, None);
    std::thread::sleep(Duration::from_secs(2));

    let (admin, admin2) = (bouncer.admin(), second.admin());
    let switch =
        ["--pgbouncer", admin.as_str(), "--pgbouncer", admin2.as_str(), "--pgbouncer-db", "app"];
    let cut_at = Instant::now();
    let mut args = vec!["cutover", "s", "--json", "--rollback-sync", "back"];
    args.extend(switch);
    let cut = p.run(&args).json();
    assert!(cut["paused_ms"].as_i64().unwrap() >= cut["fence_ms"].as_i64().unwrap(), "{cut}");
    for ini in [&bouncer.ini, &second.ini] {
        let ini = std::fs::read_to_string(ini).unwrap();
        assert!(
            ini.contains(&format!("port={} dbname={} user={APP_USER}", dst.cluster.port, dst.name)),
            "{ini}"
        );
        assert!(ini.starts_with(";; written by the tests\n[databases]\n"), "{ini}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let moved = dst.sql().value("select count(*) from probe where at > now() - interval '1 s'");
    assert_ne!(moved, "0", "the clients write to the new server");

    let back_at = Instant::now();
    let mut args = vec!["rollback", "s", "--json"];
    args.extend(switch);
    let back = p.run(&args).json();
    assert!(back["fence_ms"].as_i64().is_some(), "{back}");
    std::thread::sleep(Duration::from_secs(1));
    let done_at = Instant::now();
    let (rated, flat) = (rated.finish(), flat.finish());
    p.run(&["stop"]).ok();

    for (name, log) in [("rated", &rated), ("flat out", &flat)] {
        assert!(log.errors.is_empty(), "{name} client saw errors: {:?}", log.errors);
        for (what, from, to) in [("cutover", cut_at, back_at), ("rollback", back_at, done_at)] {
            let gap = log.longest_gap(from, to);
            assert!(gap <= Duration::from_secs(1), "{name} client: {what} gap {gap:?}");
        }
    }
    // The old server took the last writes, and holds every acknowledged one
    // and nothing else; the new one holds every write made before the
    // rollback.
    let on_old = ids(&src);
    assert_eq!(on_old, acknowledged(&[&rated, &flat]));
    let before_rollback: BTreeSet<i64> = [&rated, &flat]
        .iter()
        .flat_map(|l| l.ok.iter().filter(|(t, _)| *t < back_at).map(|(_, id)| *id))
        .collect();
    assert!(ids(&dst).is_superset(&before_rollback));
    let next = |db: &TestDb| db.sql().value("select last_value from probe_id_seq");
    assert!(next(&src).parse::<i64>().unwrap() >= *on_old.last().unwrap());
    assert!(src.sql().try_exec("insert into account values (1000, 0)").is_ok(), "old is writable");
    // Status tells the truth after the rollback: writes go to the old
    // server, the retired sync has no lag, and how to move again.
    let status = p.run(&["status", "s", "--json"]);
    let target = &status.json_any()["syncs"][0]["targets"][0];
    let phase = target["phase"].as_str().unwrap();
    assert!(phase.starts_with("rolled back: writes go to src again"), "{status}");
    assert!(phase.contains("pgleap teardown s, then pgleap teardown back --unfence"), "{status}");
    assert_eq!(target["writes_go_to"], "src", "{status}");
    assert!(target["lag_seconds"].is_null() && target["pending"].is_null(), "{status}");
    assert_eq!(status.code, 0, "{status}");
}

#[test]
fn a_failing_switch_or_an_unreachable_pooler_leaves_the_old_server_taking_writes() {
    let (src, dst, p, bouncer) = setup("noswitch");
    let before = std::fs::read_to_string(&bouncer.ini).unwrap();
    let rated = Probe::start(bouncer.port, "app", 1, Some(Duration::from_millis(5)));
    std::thread::sleep(Duration::from_secs(1));
    let admin = bouncer.admin();
    // A rehearsal checks the pooler without pausing it.
    let rehearsal = ["cutover", "s", "--dry-run", "--pgbouncer", &admin, "--pgbouncer-db"];
    p.run(&[&rehearsal[..], &["app"]].concat()).ok();
    p.run(&[&rehearsal[..], &["nope"]].concat()).fails_with(&["has no database \"nope\""]);

    let failed = p.run(&[
        "cutover",
        "s",
        "--pgbouncer",
        &admin,
        "--pgbouncer-db",
        "app",
        "--switch-command",
        "echo \"moving to $PGHOST:$PGPORT/$PGDATABASE as $PGUSER${PGPASSWORD:+ with a password}\" >&2; exit 3",
    ]);
    let stderr = failed.fails_with(&["the switch command failed", "exit status: 3"]);
    assert!(stderr.contains(&format!("127.0.0.1:{}/{}", dst.cluster.port, dst.name)), "{stderr}");
    assert!(!stderr.contains("with a password"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&bouncer.ini).unwrap(), before, "the ini is put back");

    let unreachable =
        format!("host=127.0.0.1 port={} dbname=pgbouncer user=x", dst.cluster.port + 1);
    p.run(&["cutover", "s", "--pgbouncer", &unreachable, "--pgbouncer-db", "app"])
        .fails_with(&["pgbouncer"]);
    p.run(&["cutover", "s", "--pgbouncer", &admin, "--pgbouncer-db", "nope"])
        .fails_with(&["has no database \"nope\""]);

    std::thread::sleep(Duration::from_secs(1));
    let log = rated.finish();
    assert!(log.errors.is_empty(), "the client saw errors: {:?}", log.errors);
    src.sql().exec("insert into account values (1000, 1)");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    assert_eq!(ids(&src), acknowledged(&[&log]), "nothing lost on the old server");
    assert_eq!(ids(&dst), ids(&src), "and the sync goes on");
    let status = p.run(&["status", "s", "--json"]).json();
    assert_eq!(status["syncs"][0]["targets"][0]["state"], "good", "{status}");
    p.run(&["stop"]).ok();
}

/// A cutover killed inside its fence with its pooler paused: a rerun,
/// even one refused before it pauses anything (a --rollback-sync name
/// already used), undoes the fence and resumes the pooler, so clients write
/// to the old server again; the next rerun cuts over.
#[test]
fn a_cutover_killed_with_its_pooler_paused_is_undone_by_a_rerun() {
    let (src, dst, p, bouncer) = setup("killpause");
    let admin = bouncer.admin();
    let args = ["cutover", "s", "--pgbouncer", admin.as_str(), "--pgbouncer-db", "app"];
    killed_at(&p, "cutover-fenced", &args);
    p.run(&[&args[..], &["--rollback-sync", "s"]].concat()).fails_with(&["already used"]);
    let probe = Probe::start(bouncer.port, "app", 7, Some(Duration::from_millis(20)));
    std::thread::sleep(Duration::from_millis(1500));
    let log = probe.finish();
    assert!(log.errors.is_empty(), "the client saw errors: {:?}", log.errors);
    assert!(!log.ok.is_empty(), "the pooler still holds its clients");
    assert_eq!(src.sql().value("select count(*) > 0 from probe where client = 7"), "t");
    let out = p.run(&args);
    assert!(out.ok().contains("the source now refuses writes"), "{out}");
    p.run(&["kick", "s", "--wait", "60"]).fails_with(&["was cut over"]);
    assert_eq!(dst.sql().value("select count(*) > 0 from probe where client = 7"), "t");
    p.run(&["stop"]).ok();
}
