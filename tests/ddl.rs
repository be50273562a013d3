//! Schema changes on the source while a sync runs: what pgleap follows by
//! itself (columns added with a constant default, new partitions), and what
//! pauses the sync until the target matches (`sync resume`).

use std::time::{Duration, Instant};

use crate::support::{Pgleap, TestDb, cluster};

fn equal(src: &TestDb, dst: &TestDb, table: &str) {
    let q = format!("select t::text from {table} t order by 1");
    assert_eq!(dst.sql().rows(&q), src.sql().rows(&q), "{table}");
}

/// A keyed table and a partitioned one, synced 15 -> 17 (no daemon: each
/// test kicks).
fn synced(label: &str) -> (Pgleap, TestDb, TestDb) {
    let src = TestDb::new(cluster(15), &format!("{label}src"));
    let dst = TestDb::new(cluster(17), &format!("{label}dst"));
    let schema = "create table t (id int primary key, v text);
                  create table m (id int, at date, v text, primary key (id, at))
                      partition by range (at);
                  create table m_2000 partition of m for values from ('2000-01-01') to ('2001-01-01');";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    src.sql().exec(
        "insert into t select g, 'v' || g from generate_series(1, 100) g;
         insert into m select g, date '2000-01-01' + g, 'm' from generate_series(1, 100) g;",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    (p, src, dst)
}

#[test]
fn writes_straight_into_a_partition_are_applied_pg15_to_pg17() {
    let (p, src, dst) = synced("ddlpart");
    src.sql().exec("insert into m_2000 values (1000, '2000-06-01', 'direct');
                    update m_2000 set v = 'changed' where id = 5;
                    delete from m_2000 where id = 6;");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    equal(&src, &dst, "m");
}

#[allow(dead_code)]
fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
