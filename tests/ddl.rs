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
    src.sql().exec(
        "insert into m_2000 values (1000, '2000-06-01', 'direct');
                    update m_2000 set v = 'changed' where id = 5;
                    delete from m_2000 where id = 6;",
    );
    p.run(&["kick", "s", "--wait", "60"]).ok();
    equal(&src, &dst, "m");
}

#[test]
fn a_column_added_with_a_literal_default_is_added_on_the_target_and_the_sync_goes_on_pg15_to_pg17()
{
    let (p, src, dst) = synced("ddladd");
    src.sql().exec(
        "alter table t add column extra int not null default 7;
         alter table t add column note text;
         update t set extra = id, note = 'n' where id <= 10;
         insert into t values (1000, 'new', 1, 'x')",
    );
    p.run(&["kick", "s", "--wait", "60"]).ok();
    equal(&src, &dst, "t");
    let status = p.run(&["status", "s", "--json"]).json_any();
    assert!(status["syncs"][0]["paused"].is_null(), "{status}");
}

/// A batch checks the columns of the tables it writes, and every table's
/// at least every 10 s: a column added to a table nobody writes is still
/// added on the target by the daemon while another table keeps every batch
/// busy.
#[test]
fn a_column_added_to_a_table_nobody_writes_is_followed_by_the_daemon_pg15_to_pg17() {
    let (p, src, dst) = synced("ddlidle");
    p.run(&["start"]).ok();
    // The daemon's session has read its plan before the column comes.
    src.sql().exec("insert into m values (999, '2000-06-01', 'first')");
    let deadline = Instant::now() + Duration::from_secs(30);
    while dst.sql().value("select count(*) from m where id = 999") != "1" {
        assert!(Instant::now() < deadline, "the daemon never applied a batch");
        std::thread::sleep(Duration::from_millis(50));
    }
    src.sql().exec("alter table t add column extra int not null default 7");
    let added = "select count(*) from information_schema.columns
                 where table_name = 't' and column_name = 'extra'";
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut id = 1000;
    while dst.sql().value(added) != "1" {
        assert!(Instant::now() < deadline, "the column was never added on the target");
        id += 1;
        src.sql().exec(&format!("insert into m values ({id}, '2000-06-01', 'busy')"));
        std::thread::sleep(Duration::from_millis(100));
    }
    src.sql().exec("update t set extra = id where id <= 3");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    p.run(&["stop"]).ok();
    equal(&src, &dst, "t");
    equal(&src, &dst, "m");
}

/// The sync pauses, `status` and `kick` say why and what to do, nothing is
/// applied meanwhile; `sync resume` refuses while the target still differs,
/// then the sync goes on and ends equal.
fn pauses_until_the_target_matches(
    label: &str,
    on_source: &str,
    on_target: Option<&str>,
    named: &str,
) {
    let (p, src, dst) = synced(label);
    src.sql().exec(on_source);
    src.sql().exec("insert into t (id) values (5000)");
    let out = p.run(&["kick", "s", "--wait", "30"]);
    out.fails_with(&["columns changed on the source", named, "pgleap sync resume s"]);
    let status = p.run(&["status", "s", "--json"]);
    assert_eq!(status.code, 1, "{status}");
    let json = status.json_any();
    assert_eq!(json["syncs"][0]["targets"][0]["phase"], "paused: schema changed", "{json}");
    assert!(json["syncs"][0]["paused"].as_str().unwrap().contains(named), "{json}");
    p.run(&["kick", "s"]).fails_with(&["sync \"s\" is paused", named]);
    assert_eq!(dst.sql().value("select count(*) from t where id = 5000"), "0");
    if on_source.contains("drop column") {
        p.run(&["sync", "resume", "s"]).fails_with(&["stays paused", "public.t.\"v\""]);
    } else {
        p.run(&["sync", "resume", "s"]).fails_with(&["columns changed on the source"]);
    }
    // A column whose values the target cannot compute: the table needs a
    // new copy, not a resume.
    let Some(on_target) = on_target else { return };
    dst.sql().exec(on_target);
    assert!(p.run(&["sync", "resume", "s"]).ok().contains("resumed sync \"s\""));
    p.run(&["kick", "s", "--wait", "60"]).ok();
    equal(&src, &dst, "t");
}

#[test]
fn a_dropped_column_pauses_the_sync_pg15_to_pg17() {
    let drop = "alter table t drop column v";
    pauses_until_the_target_matches(
        "ddldrop",
        drop,
        Some(drop),
        "column \"v\" was dropped or renamed",
    );
}

#[test]
fn a_renamed_column_pauses_the_sync_pg15_to_pg17() {
    let rename = "alter table t rename column v to w";
    pauses_until_the_target_matches(
        "ddlren",
        rename,
        Some(rename),
        "column \"v\" was dropped or renamed",
    );
}

#[test]
fn a_retyped_column_pauses_the_sync_pg15_to_pg17() {
    let retype = "alter table t alter column v type varchar(20)";
    pauses_until_the_target_matches(
        "ddltype",
        retype,
        Some(retype),
        "column \"v\" is text on the target, character varying(20) on the source",
    );
}

#[test]
fn a_column_with_a_volatile_default_pauses_the_sync_pg15_to_pg17() {
    // Each row got its own value on the source: the target cannot compute
    // the same ones.
    pauses_until_the_target_matches(
        "ddlvol",
        "alter table t add column r float8 default random()",
        None,
        "its default is not a literal",
    );
}

#[test]
fn new_partitions_are_created_and_copied_and_new_tables_reported_pg15_to_pg17() {
    let (p, src, dst) = synced("ddlnew");
    src.sql().exec(
        "create table m_2001 partition of m for values from ('2001-01-01') to ('2002-01-01');
         insert into m values (2000, '2001-03-01', 'routed');
         create table m_2002 (id int not null, at date not null, v text);
         insert into m_2002 values (3000, '2002-05-05', 'was there before the attach');
         alter table m attach partition m_2002 for values from ('2002-01-01') to ('2003-01-01');
         insert into m_2002 values (3001, '2002-06-06', 'after');
         create table newcomer (id int primary key);",
    );
    p.run(&["kick", "s", "--wait", "60"]).ok();
    equal(&src, &dst, "m");
    let status = p.run(&["status", "s", "--json"]).json_any();
    let not_captured = status["syncs"][0]["not_captured"].to_string();
    assert!(not_captured.contains("table public.newcomer is not captured"), "{status}");
    src.sql().exec("alter table m detach partition m_2000");
    let status = p.run(&["status", "s", "--json"]).json_any();
    let not_captured = status["syncs"][0]["not_captured"].to_string();
    assert!(
        not_captured.contains("partition public.m_2000 of public.m is no longer one on the source"),
        "{status}"
    );
}

#[test]
fn a_dropped_or_renamed_table_pauses_the_sync_pg15_to_pg17() {
    let (p, src, dst) = synced("ddltab");
    src.sql().exec("alter table t rename to t_old");
    p.run(&["kick", "s", "--wait", "30"])
        .fails_with(&["public.t: the table was dropped or renamed", "sync resume s"]);
    let status = p.run(&["status", "s", "--json"]).json_any();
    assert_eq!(status["syncs"][0]["targets"][0]["phase"], "paused: schema changed", "{status}");
    // Renamed back: the sync goes on.
    src.sql().exec("alter table t_old rename to t; insert into t values (7000, 'back')");
    p.run(&["sync", "resume", "s"]).ok();
    p.run(&["kick", "s", "--wait", "60"]).ok();
    equal(&src, &dst, "t");
}

/// A longer varchar is a retype too (the type names share a prefix).
#[test]
fn a_widened_varchar_pauses_the_sync_pg15_to_pg17() {
    let (p, src, dst) = synced("ddlwide");
    src.sql()
        .exec("alter table t add column code varchar(20); update t set code = 'c' where id = 1");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    equal(&src, &dst, "t");
    let widen = "alter table t alter column code type varchar(200)";
    src.sql().exec(widen);
    src.sql().exec("update t set code = repeat('x', 150) where id = 2");
    p.run(&["kick", "s", "--wait", "30"]).fails_with(&[
        "column \"code\" is character varying(20) on the target, character varying(200) on the source",
    ]);
    dst.sql().exec(widen);
    p.run(&["sync", "resume", "s"]).ok();
    p.run(&["kick", "s", "--wait", "60"]).ok();
    equal(&src, &dst, "t");
}

/// TRUNCATE naming one partition (an existing one, and one created during
/// the sync) empties that partition on the target, and rows written to it
/// after, in the same batch, come back.
#[test]
fn a_truncated_partition_is_emptied_on_the_target_pg15_to_pg17() {
    let (p, src, dst) = synced("ddltrunc");
    src.sql().exec(
        "truncate m_2000;
         insert into m values (7, '2000-02-02', 'after the truncate');
         create table m_2001 partition of m for values from ('2001-01-01') to ('2002-01-01');
         insert into m select g, date '2001-01-01' + g, 'n' from generate_series(1, 50) g;",
    );
    p.run(&["kick", "s", "--wait", "60"]).ok();
    equal(&src, &dst, "m");
    src.sql().exec("truncate m_2001; insert into m values (8, '2001-03-03', 'x')");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    equal(&src, &dst, "m");
    p.run(&["teardown", "s"]).ok();
    let left = "select count(*) from pg_trigger where tgname like 'pgleap%'";
    assert_eq!(src.sql().value(left), "0");
}
