//! `pgleap upgrade`: the whole job in one command, resumable, refusing
//! early what cannot work.

use crate::support::{Pgleap, Sql, TestDb, cluster, finish, pgbench};

fn multiset(sql: &Sql, table: &str) -> Vec<Vec<Option<String>>> {
    sql.rows(&format!("select t::text from {table} t order by 1"))
}

const PGBENCH: [&str; 4] =
    ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"];

#[test]
fn upgrade_with_auto_cutover_under_load_pg12_to_pg17() {
    let src = TestDb::new(cluster(12), "upsrc");
    let dst = TestDb::new(cluster(17), "updst");
    finish(pgbench(&src, &["-i", "-q", "-s", "1"]).spawn().unwrap());
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let mut load = pgbench(&src, &["-n", "-c", "2", "-R", "100", "-T", "120"]).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = p.run(&[
        "upgrade",
        "--source",
        &src.uri(),
        "--target",
        &dst.uri(),
        "--cutover",
        "auto",
        "--jobs",
        "2",
    ]);
    let text = out.ok();
    for expected in [
        "preflight: PostgreSQL 12.",
        "-> 17.",
        "replicated by whole rows: public.pgbench_history",
        "verify: every table equal",
        "writes were fenced for",
    ] {
        assert!(text.contains(expected), "missing {expected:?}:\n{out}");
    }
    let _ = load.kill();
    let _ = load.wait();
    let (s, d) = (src.sql(), dst.sql());
    for table in PGBENCH {
        assert_eq!(multiset(&s, table), multiset(&d, table), "{table}");
    }
    assert!(
        s.try_exec("insert into pgbench_history (tid, bid, aid, delta) values (1, 1, 1, 1)")
            .is_err()
    );
    p.run(&["upgrade", "--source", &src.uri(), "--target", &dst.uri(), "--cutover", "auto"])
        .fails_with(&["already cut over"]);
    p.run(&["teardown", "upgrade"]).ok();
}

#[test]
fn upgrade_refuses_a_downgrade_before_writing_anything_pg17_to_pg12() {
    let src = TestDb::new(cluster(17), "downsrc");
    let dst = TestDb::new(cluster(12), "downdst");
    src.sql().exec("create table t (id int primary key)");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.run(&["upgrade", "--source", &src.uri(), "--target", &dst.uri(), "--cutover", "auto"])
        .fails_with(&["that is a downgrade"]);
    assert_eq!(p.run(&["db", "list", "--json"]).json(), serde_json::json!([]));
    assert_eq!(src.sql().value("select count(*) from pg_namespace where nspname = 'pgleap'"), "0");
}

#[test]
fn upgrade_resumes_when_run_again_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "resupsrc");
    let dst = TestDb::new(cluster(17), "resupdst");
    finish(pgbench(&src, &["-i", "-q", "-s", "1"]).spawn().unwrap());
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let first =
        p.run(&["upgrade", "--source", &src.uri(), "--target", &dst.uri(), "--cutover", "never"]);
    assert!(first.ok().contains("the sync is in place"), "{first}");
    src.sql().exec("update pgbench_accounts set abalance = 7 where aid <= 10");
    let second =
        p.run(&["upgrade", "--source", &src.uri(), "--target", &dst.uri(), "--cutover", "auto"]);
    let text = second.ok();
    assert!(!text.contains("added database"), "the rerun started over:\n{second}");
    assert!(text.contains("writes were fenced for"), "{second}");
    for table in PGBENCH {
        assert_eq!(multiset(&src.sql(), table), multiset(&dst.sql(), table), "{table}");
    }
    p.run(&["teardown", "upgrade"]).ok();
}
