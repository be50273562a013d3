//! `pgleap verify`: differences are found and named by key; equal data is
//! equal.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{Pgleap, TestDb, cluster};

#[test]
fn a_planted_difference_is_named_by_its_key_pg12_to_pg17() {
    let src = TestDb::new(cluster(12), "versrc");
    let dst = TestDb::new(cluster(17), "verdst");
    let schema = "create table t (id int primary key, v text);
                  create table pairs (a int, b text, primary key (a, b));
                  create table log (v text);
                  create table big (id bigint primary key, pad text);";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    src.sql().exec(
        "insert into t select g, 'v' || g from generate_series(1, 1000) g;
         insert into pairs select g, 'b' || g from generate_series(1, 100) g;
         insert into log select 'line' from generate_series(1, 10);
         insert into big select g, repeat('x', 120) from generate_series(1, 300000) g;
         analyze big;",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    let equal = p.run(&["verify", "s"]);
    assert!(equal.ok().contains("equal"), "{equal}");
    assert!(!equal.stdout.contains("DIFFERENT"), "{equal}");
    // Off a terminal, a line per table as it is compared, and the total.
    for line in ["verify: public.t done (1000 rows); ", " rows, ", "verify: data: "] {
        assert!(equal.stderr.contains(line), "missing {line:?}: {equal}");
    }
    // A big table is compared in ranges of its key, each shown.
    assert!(equal.stderr.contains(r#"verify: public.big ("id" < "#), "{equal}");
    assert!(equal.stdout.contains("300000"), "{equal}");

    // Differences at both open ends of the big table's ranges and inside.
    dst.sql().exec(
        "update big set pad = 'planted' where id in (1, 300000);
         delete from big where id = 150000;
         insert into big values (-5, 'below'), (900000, 'above');",
    );
    let big = p.run(&["verify", "s", "--json", "--table", "public.big"]);
    assert_eq!(big.code, 1, "{big}");
    let report: serde_json::Value = serde_json::from_str(&big.stdout).unwrap();
    let table = &report[0]["tables"][0];
    assert_eq!(
        table["differing_keys"],
        serde_json::json!(["-5", "1", "150000", "300000", "900000"]),
        "{big}"
    );
    assert_eq!(
        (table["source_rows"].clone(), table["target_rows"].clone()),
        (300000.into(), 300001.into())
    );
    dst.sql().exec(
        "update big set pad = repeat('x', 120) where id in (1, 300000);
         insert into big values (150000, repeat('x', 120));
         delete from big where id in (-5, 900000);",
    );

    dst.sql().exec(
        "update t set v = 'planted' where id = 5;
         delete from t where id = 777;
         insert into pairs values (1000, 'extra');
         delete from log where ctid = (select ctid from log limit 1);",
    );
    let out = p.run(&["verify", "s", "--json"]);
    assert_eq!(out.code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let tables = report[0]["tables"].as_array().unwrap();
    let find = |name: &str| tables.iter().find(|t| t["table"] == name).unwrap().clone();
    let t = find("public.t");
    assert_eq!(t["equal"], false);
    assert_eq!(t["differing_keys"], serde_json::json!(["5", "777"]));
    assert_eq!((t["source_rows"].clone(), t["target_rows"].clone()), (1000.into(), 999.into()));
    assert_eq!(find("public.pairs")["differing_keys"], serde_json::json!(["1000,extra"]));
    assert_eq!(find("public.log")["equal"], false);
    assert_eq!(find("public.big")["equal"], true);
    let text = p.run(&["verify", "s", "--table", "public.t"]);
    assert_eq!(text.code, 1);
    assert!(text.stderr.contains("verify found differences in 1 table(s)"), "{text}");
    assert!(text.stdout.contains("DIFFERENT"), "{text}");
    p.run(&["teardown", "s"]).ok();
}

/// A live verify holds the sync's applier lock only until both servers'
/// snapshots exist: the daemon applies a write made while the verify is
/// still reading (it used to wait for the whole comparison).
#[test]
fn the_daemon_goes_on_applying_while_a_verify_reads_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "verlivesrc");
    let dst = TestDb::new(cluster(17), "verlivedst");
    let schema = "create table big (id int primary key, v text);
                  create table small (id int primary key)";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    src.sql().exec("insert into big select g, md5(g::text) from generate_series(1, 1500000) g");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["start"]).ok();
    p.run(&["kick", "s", "--wait", "120"]).ok();

    let mut verify = p
        .command()
        .args(["verify", "s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The comparison has started reading big on the source.
    let reading = "select count(*) from pg_stat_activity
                   where datname = current_database() and pid <> pg_backend_pid()
                     and query like '%hashtextextended%from only%big%'";
    let watcher = src.cluster.superuser(&src.name);
    let started = Instant::now();
    while watcher.value(reading) == "0" {
        assert!(started.elapsed() < Duration::from_secs(60), "the verify never read big");
        assert!(verify.try_wait().unwrap().is_none(), "the verify ended before reading big");
        std::thread::sleep(Duration::from_millis(20));
    }
    src.sql().exec("insert into small values (1)");
    while dst.sql().value("select count(*) from small") == "0" {
        assert!(started.elapsed() < Duration::from_secs(60), "the write never arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still reading: the write did not wait for the comparison's end.
    assert_ne!(
        watcher.value(&format!("{reading} and state = 'active'")),
        "0",
        "the write arrived only after the verify had read big"
    );
    let out = verify.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    p.run(&["stop"]).ok();
    p.run(&["teardown", "s"]).ok();
}

/// A verify killed half-way resumes where it stopped: the parts it found
/// equal are taken from it (within a day), the rest compared; a verify
/// that ends leaves nothing for the next one, which compares everything.
#[test]
fn a_verify_killed_half_way_resumes_where_it_stopped_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "verresumesrc");
    let dst = TestDb::new(cluster(17), "verresumedst");
    let schema = "create table a (id int primary key, v text);
                  create table b (id int primary key, v text);
                  create table c (id int primary key, v text);";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    src.sql().exec(
        "insert into a select g, 'a' from generate_series(1, 300) g;
         insert into b select g, 'b' from generate_series(1, 200) g;
         insert into c select g, 'c' from generate_series(1, 100) g;",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    crate::support::killed_at(&p, "verify-part-done", &["verify", "s"]);
    let resumed = p.run(&["verify", "s", "--json"]);
    let report = resumed.json();
    let tables = report[0]["tables"].as_array().unwrap();
    let taken: Vec<&serde_json::Value> =
        tables.iter().filter(|t| t["resumed_parts"].as_u64() == Some(1)).collect();
    assert_eq!(taken.len(), 1, "one part was done before the kill: {report}");
    for t in tables {
        assert_eq!(t["equal"], true, "{report}");
        assert_eq!(t["source_rows"], t["target_rows"], "{report}");
    }
    let rows: i64 = tables.iter().map(|t| t["source_rows"].as_i64().unwrap()).sum();
    assert_eq!(rows, 600, "the resumed part's rows are counted: {report}");
    let text = p.run(&["verify", "s"]);
    assert!(!text.ok().contains("resumed:"), "a finished verify left parts behind: {text}");
    p.run(&["teardown", "s"]).ok();
}

/// `verify --incremental` compares only what changed since the last
/// verify that ended: the parts of a table that a batch touched (for a
/// table with one integer key, the key ranges its keys fell in; for any
/// other, the table), and the tables a verify found different. The rest
/// is taken as that verify found it: a difference planted on the target
/// behind pgleap's back, in a part no batch touched, is seen by a full
/// verify only, which is what shows the incremental one did not look.
#[test]
fn an_incremental_verify_compares_only_the_parts_touched_since_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "verincsrc");
    let dst = TestDb::new(cluster(17), "verincdst");
    let schema = "create table big (id bigint primary key, pad text);
                  create table a (id int primary key, v text);
                  create table b (id int primary key, v text);
                  create table coded (code text primary key, v text);";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    src.sql().exec(
        "insert into big select g, repeat('x', 120) from generate_series(1, 300000) g;
         insert into a select g, 'a' from generate_series(1, 100) g;
         insert into b select g, 'b' from generate_series(1, 100) g;
         insert into coded select 'c' || g, 'c' from generate_series(1, 100) g;
         analyze big;",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    p.run(&["kick", "s", "--wait", "120"]).ok();
    // No verify ended yet: an incremental one compares everything.
    let first = p.run(&["verify", "s", "--incremental", "--json"]).json();
    let unchanged = |report: &serde_json::Value, table: &str| {
        let tables = report[0]["tables"].as_array().unwrap();
        let t = tables.iter().find(|t| t["table"] == table).unwrap_or_else(|| panic!("{report}"));
        (t["parts"].as_u64().unwrap(), t["unchanged_parts"].as_u64().unwrap_or(0))
    };
    let big_parts = unchanged(&first, "public.big").0;
    assert!(big_parts >= 2, "the big table is compared in ranges: {first}");
    for t in ["public.big", "public.a", "public.b", "public.coded"] {
        assert_eq!(unchanged(&first, t).1, 0, "{t}: {first}");
    }

    // One row of the big table's upper half, one of a, one of coded: the
    // batch marks the big table's range holding 290000, a, and coded.
    src.sql().exec(
        "update big set pad = 'changed' where id = 290000;
         insert into a values (1000, 'new');
         update coded set v = 'changed' where code = 'c7';",
    );
    p.run(&["kick", "s", "--wait", "60"]).ok();
    // Planted behind pgleap's back: next to the applied key (same range),
    // and in the big table's first range, which no batch touched.
    dst.sql().exec(
        "update big set pad = 'planted' where id in (290001, 2);
         update b set v = 'planted' where id = 3;",
    );
    let out = p.run(&["verify", "s", "--incremental", "--json"]);
    assert_eq!(out.code, 1, "{out}");
    let report = out.json_any();
    assert_eq!(unchanged(&report, "public.big"), (big_parts, big_parts - 1), "{report}");
    assert_eq!(unchanged(&report, "public.a"), (1, 0), "{report}");
    assert_eq!(unchanged(&report, "public.coded"), (1, 0), "{report}");
    assert_eq!(unchanged(&report, "public.b"), (1, 1), "{report}");
    let tables = report[0]["tables"].as_array().unwrap();
    let big = tables.iter().find(|t| t["table"] == "public.big").unwrap();
    assert_eq!(big["differing_keys"], serde_json::json!(["290001"]), "{report}");
    // The rows of the parts taken are counted as that verify found them.
    assert_eq!(big["source_rows"], 300000, "{report}");
    let text = p.run(&["verify", "s", "--incremental"]);
    assert!(text.stdout.contains("incremental: "), "{text}");

    // A table found different is compared whole by the next incremental
    // verify; a full verify sees everything.
    let again = p.run(&["verify", "s", "--incremental", "--json"]).json_any();
    assert_eq!(unchanged(&again, "public.big"), (big_parts, 0), "{again}");
    let full = p.run(&["verify", "s", "--json"]);
    assert_eq!(full.code, 1, "{full}");
    let full = full.json_any();
    let tables = full[0]["tables"].as_array().unwrap();
    let keys =
        |name: &str| tables.iter().find(|t| t["table"] == name).unwrap()["differing_keys"].clone();
    assert_eq!(keys("public.big"), serde_json::json!(["2", "290001"]), "{full}");
    assert_eq!(keys("public.b"), serde_json::json!(["3"]), "{full}");
    p.run(&["teardown", "s"]).ok();
}
