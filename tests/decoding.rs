//! Capture by logical decoding (#27): where the source allows it, keyed
//! tables are captured from a replication slot, without triggers, and the
//! sync ends exactly as with triggers; where it does not, `auto` falls
//! back to triggers and `decoding` refuses, saying what is missing.

use crate::support::compare;
use crate::support::{Pgleap, Sql, TestDb, cluster, finish, logical_cluster, pgbench};

const SCHEMA: &str = "
    create table kv (id int primary key, v text);
    create table pair (a int, b text, v int, primary key (a, b));
    create table big (id bigint primary key, payload text);
    create table keyless (v text);
    create table ident (id int generated always as identity primary key, v text);
    create table typed (j jsonb, c char(6), a int[], n numeric, v int, primary key (j, c, a, n));
    create table deferred (id int primary key deferrable, v int);
    insert into kv select g, 'row ' || g from generate_series(1, 20) g;
    insert into pair select g, 'x', 0 from generate_series(1, 10) g;
    insert into big select g, md5(g::text) from generate_series(1, 5000) g;
    insert into keyless values ('a'), ('b');
    insert into ident (v) select 'i' || g from generate_series(1, 5) g;
    insert into typed select '{\"k\": 1.0}', 'ab', '{1,2}', 2.50, g from generate_series(1, 3) g
        on conflict do nothing;
    insert into typed values ('[1, 2.50]', 'cd', '{}', 1, 0);
    insert into deferred select g, 0 from generate_series(1, 5) g;";

/// pgleap's capture triggers on `table`.
fn triggers_on(sql: &Sql, table: &str) -> String {
    sql.value(&format!(
        "select count(*) from pg_trigger where tgname like 'pgleap%' and tgrelid = '{table}'::regclass"
    ))
}

fn slots(sql: &Sql) -> String {
    sql.value("select count(*) from pg_replication_slots where slot_name like 'pgleap%'")
}

/// Every kind of change, captured by decoding: inserts, updates with and
/// without a key change, deletes, a bulk update, a TRUNCATE followed by
/// inserts in one transaction, a rolled-back transaction, an identity
/// column, keys of types whose text differs from their value's (jsonb,
/// char(n), arrays, numeric: cast by their delta column's type with its
/// modifier); the keyless table (no REPLICA IDENTITY FULL) and a table
/// whose primary key is deferrable (no replica identity at all) by their
/// triggers.
/// The target ends equal, rows of every table; teardown leaves no slot,
/// publication or trigger behind.
#[test]
fn capture_by_decoding_moves_every_change_pg15_to_pg17() {
    let src = TestDb::new(logical_cluster(15), "decsrc");
    let dst = TestDb::new(cluster(17), "decdst");
    src.sql().exec(SCHEMA);
    dst.sql().exec(SCHEMA.split("insert").next().unwrap());
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off", "--capture", "decoding"]);
    let s = src.sql();
    for table in ["kv", "pair", "big", "ident", "typed"] {
        assert_eq!(triggers_on(&s, table), "0", "{table} is decoded, without triggers");
    }
    assert_ne!(triggers_on(&s, "keyless"), "0", "a keyless table keeps its triggers");
    // A deferrable primary key is no replica identity: published, the
    // table would refuse the application's UPDATEs.
    assert_ne!(triggers_on(&s, "deferred"), "0", "a deferrable key keeps its triggers");
    assert_eq!(slots(&s), "1");
    let status = p.run(&["status", "s", "--json"]).json_any();
    let decoding = &status["syncs"][0]["decoding"];
    assert_eq!(decoding["tables"], 5, "{status}");
    assert!(decoding["retained_bytes"].as_i64().is_some_and(|b| b > 0), "{status}");
    assert!(p.run(&["status", "s"]).ok().contains("logical decoding of 5 tables, slot pgleap_"));
    // Written after the slot, before the copy: in the copy and decoded.
    s.exec("insert into kv values (100, 'before the copy')");
    p.run(&["kick", "s", "--wait", "120"]).ok();

    // No daemon, no kick: the changes stay in the slot, and status counts
    // them as pending (it used to read the deltas only, and said 0).
    s.exec("insert into kv values (102, 'waits'); update kv set v = 'waits' where id = 6");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let status = p.run(&["status", "s", "--json"]).json_any();
    let target = &status["syncs"][0]["targets"][0];
    assert_eq!(target["pending"], 2, "{status}");
    assert!(target["lag_seconds"].as_f64().is_some_and(|l| l >= 1.0), "{status}");

    s.exec(
        "insert into kv values (101, 'new');
         update kv set v = 'changed' where id <= 3;
         update kv set id = id + 1000 where id = 4;
         delete from kv where id = 5;
         update pair set b = 'y', v = 1 where a % 2 = 0;
         update big set payload = 'bulk' where id % 3 = 0;
         delete from big where id > 4900;
         begin; truncate pair; insert into pair values (1, 'after truncate', 7); commit;
         begin; insert into kv values (999, 'rolled back'); rollback;
         insert into keyless values ('c');
         insert into ident (v) values ('new identity');
         update ident set v = 'changed' where id = 2;
         update deferred set v = 1 where id <= 2;
         update typed set v = 10 where c = 'ab';
         update typed set j = '{\"k\": 1.00}', n = 2.5 where c = 'ab';
         update typed set c = 'ef', a = '{3}' where c = 'cd';
         insert into typed values ('\"s\"', 'gh', '{4,5}', 0.10, 1);
         insert into typed values ('{\"t\": \"x\\\\ty\\n\"}', 'ij', '{6}', 0, 1);
         insert into pair values
             (11, 'tab' || chr(9) || 'nl' || chr(10) || 'cr' || chr(13) || chr(92) || 'N', 1),
             (12, '\"q\" {x,y} \\N' || chr(92), 1), (13, 'NULL', 1);
         update pair set v = 2 where a >= 11;",
    );
    p.run(&["kick", "s", "--wait", "120"]).ok();
    let d = dst.sql();
    assert_eq!(compare::rows(&d), compare::rows(&s));
    assert_eq!(d.value("select v from kv where id = 1004"), "row 4");
    assert_eq!(d.value("select count(*) from pair"), "4");

    // Changes while no batch runs pile up in the slot, and arrive.
    for i in 0..20 {
        s.exec(&format!("update kv set v = 'round {i}' where id = 1"));
    }
    p.run(&["kick", "s", "--wait", "120"]).ok();
    assert_eq!(d.value("select v from kv where id = 1"), "round 19");
    assert_eq!(compare::rows(&d), compare::rows(&s));

    p.run(&["teardown", "s"]).ok();
    assert_eq!(slots(&s), "0");
    assert_eq!(s.value("select count(*) from pg_publication"), "0");
    assert_eq!(s.value("select count(*) from pg_trigger where tgname like 'pgleap%'"), "0");
    assert_eq!(s.value("select count(*) from pg_namespace where nspname = 'pgleap'"), "0");
}

/// A table without a key whose REPLICA IDENTITY is FULL is decoded too
/// (whole old rows come with its updates and deletes): duplicate rows, an
/// update of one of two equal rows, an update leaving a TOASTed value
/// alone (not sent: taken from the old row), arrays, jsonb, numeric,
/// deletes, a TRUNCATE and inserts in one transaction, a rolled-back
/// transaction; and a kill between a pump's commit and the slot's advance,
/// after which the same events are decoded again and both copies wait:
/// each must be replayed once. The target ends with the same rows, duplicates counted; one
/// without FULL keeps its triggers.
#[test]
fn keyless_tables_with_replica_identity_full_are_decoded_pg15_to_pg17() {
    let src = TestDb::new(logical_cluster(15), "decfullsrc");
    let dst = TestDb::new(cluster(17), "decfulldst");
    let schema = "create table events (v text, n int, tags text[], doc jsonb,
                                       amount numeric(10,2), big text);
                  create table plain (v text);
                  create table kv (id int primary key, v text);";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    let s = src.sql();
    s.exec(
        "alter table events replica identity full;
         insert into events (v, n, tags, doc, amount)
             select 'e' || g % 5, g, array['a', 'b''s', null], '{\"k\": [1, 2]}', g / 3.0
             from generate_series(1, 50) g;
         insert into events (v, n) values ('twin', 1), ('twin', 1);
         insert into events (v, n, big)
             values ('toasted', 0, (select string_agg(md5(g::text), '')
                                    from generate_series(1, 500) g));
         insert into plain values ('p');",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off", "--capture", "decoding"]);
    assert_eq!(triggers_on(&s, "events"), "0", "decoded");
    assert_ne!(triggers_on(&s, "plain"), "0", "no key, no FULL: triggers");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    s.exec(
        "update events set n = 2 where ctid = (select min(ctid) from events where v = 'twin');
         update events set n = n + 100 where v = 'toasted';
         update events set tags = tags || 'x''y'::text, doc = doc || '{\"z\": null}' where v = 'e1';
         delete from events where v = 'e2';
         insert into events (v, n) values ('new', null), ('new', null);
         insert into events (v, tags) values
             ('esc' || chr(92) || 'N' || chr(9) || chr(10), array['a' || chr(92), '\"']);
         insert into plain values ('q');
         insert into kv select g, 'bulk' from generate_series(1, 200000) g;",
    );
    // Its own string: in one with other statements, ROLLBACK takes those
    // before its BEGIN too.
    s.exec("begin; insert into events (v) values ('rolled back'); rollback;");
    let d = dst.sql();
    // So many keys make the batch a catch-up, which pumps in a transaction
    // of its own first: the kill leaves that pump's events committed, not
    // applied, and the slot where it was; the rerun writes them again, and
    // both copies wait together.
    crate::support::killed_at(&p, "decoding-committed", &["kick", "s", "--wait", "60"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    assert_eq!(compare::rows(&d), compare::rows(&s));
    assert_eq!(d.value("select n from events where v = 'toasted'"), "100");
    assert_eq!(d.value("select length(big) from events where v = 'toasted'"), "16000");
    assert_eq!(d.value("select count(*) from events where v = 'new'"), "2");
    s.exec(
        "begin; truncate events; insert into events (v, n) values ('after truncate', 1); commit;
         update events set v = 'changed' where n = 1;",
    );
    p.run(&["kick", "s", "--wait", "60"]).ok();
    assert_eq!(compare::rows(&d), compare::rows(&s));
    p.run(&["verify", "s"]).ok();
    p.run(&["teardown", "s"]).ok();
    assert_eq!(slots(&s), "0");
}

/// Where the source does not allow decoding (wal_level replica, the
/// shared test servers), `--capture decoding` refuses, names what is
/// missing and leaves nothing; `auto` captures by triggers.
#[test]
fn decoding_is_refused_where_the_source_does_not_allow_it_pg15_to_pg17() {
    // Where every test server allows decoding (PGLEAP_TEST_DECODING=1), one
    // of the test's own that does not.
    let server = match crate::support::cluster::decoding_everywhere() {
        true => {
            let c = crate::support::cluster::private_cluster(15);
            c.superuser("postgres").exec("alter system set wal_level = replica");
            c.restart();
            c
        }
        false => cluster(15),
    };
    let src = TestDb::new(server, "nodecsrc");
    let dst = TestDb::new(cluster(17), "nodecdst");
    src.sql().exec("create table kv (id int primary key, v text)");
    dst.sql().exec("create table kv (id int primary key, v text)");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.run(&["sync", "add", "s", "--relgroup", "rg", "--dbgroup", "g", "--capture", "decoding"])
        .fails_with(&["logical decoding", "wal_level is replica", "--capture triggers"]);
    let s = src.sql();
    assert_eq!(s.value("select count(*) from pg_namespace where nspname = 'pgleap'"), "0");
    assert_eq!(p.run(&["sync", "list", "--json"]).json(), serde_json::json!([]));
    p.add_sync(&["--capture", "auto"]);
    assert_ne!(triggers_on(&s, "kv"), "0", "auto falls back to triggers");
    assert_eq!(slots(&s), "0");
    p.run(&["teardown", "s"]).ok();
}

/// A slot that is gone (dropped, or lost with a failover before
/// PostgreSQL 17) cannot give the changes made since its last batch: the
/// sync must neither go on as if healthy nor stop for good. Its next batch
/// falls back: triggers capture its tables from then on and the target is
/// copied again (the changes made while no slot existed reach the target
/// only that way). A verify's catch-up falls back the same way; a kill
/// after either step of the fall-back converges on a rerun.
#[test]
fn a_lost_slot_falls_back_to_triggers_and_a_copy_pg15_to_pg17() {
    let src = TestDb::new(logical_cluster(15), "lostsrc");
    let dst = TestDb::new(cluster(17), "lostdst");
    let schema = "create table kv (id int primary key, v text);
                  create table pair (a int, b text, v int, primary key (a, b));
                  create table keyless (v text);";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    src.sql().exec(
        "insert into kv select g, 'v' || g from generate_series(1, 100) g;
         insert into pair select g, 'x', g from generate_series(1, 10) g;
         insert into keyless values ('a');
         alter table keyless replica identity full;",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off", "--capture", "decoding"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let (s, d) = (src.sql(), dst.sql());
    let su = src.cluster.superuser(&src.name);
    for (round, kill_at) in
        [None, Some("fall-back-triggers"), Some("fall-back-marked")].into_iter().enumerate()
    {
        if round > 0 {
            // A new sync from the slot's side: captured by decoding again.
            p.run(&["teardown", "s"]).ok();
            p.add_sync(&["--onetimecopy", "always", "--autokick", "off", "--capture", "decoding"]);
            p.run(&["kick", "s", "--wait", "60"]).ok();
        }
        assert_eq!(triggers_on(&s, "kv"), "0", "kv is decoded");
        assert_eq!(triggers_on(&s, "keyless"), "0", "so is keyless, replica identity full");
        su.exec("select pg_drop_replication_slot(slot_name) from pg_replication_slots");
        // Made while no slot exists: no capture sees them.
        s.exec(&format!(
            "update kv set v = 'lost {round}' where id <= 10;
             delete from kv where id between 20 and 25;
             insert into kv values (1000 + {round}, 'new');
             update pair set v = v + 100 where a = 3;
             insert into keyless values ('{round}');"
        ));
        if round == 0 {
            // Verify's catch-up is a batch: it falls back, then compares.
            let verify = p.run(&["verify", "s"]);
            assert!(verify.ok().contains("every object equal"), "{verify}");
        }
        if let Some(at) = kill_at {
            crate::support::killed_at(&p, at, &["kick", "s", "--wait", "60"]);
        }
        p.run(&["kick", "s", "--wait", "60"]).ok();
        assert_eq!(compare::rows(&d), compare::rows(&s), "round {round}");
        assert_ne!(triggers_on(&s, "kv"), "0", "kv is captured by triggers now");
        assert_ne!(triggers_on(&s, "keyless"), "0", "keyless too");
        assert_eq!(slots(&s), "0");
        assert_eq!(s.value("select count(*) from pg_publication"), "0");
        let status = p.run(&["status", "s", "--json"]).json_any();
        assert!(status["syncs"][0]["decoding"].is_null(), "{status}");
        assert_ne!(status["syncs"][0]["targets"][0]["state"], "bad", "{status}");
        // And the triggers capture what comes next.
        s.exec(&format!(
            "update kv set v = 'after {round}' where id = 50; delete from pair where a = 4;
             update keyless set v = v || ' after' where v = '{round}';"
        ));
        p.run(&["kick", "s", "--wait", "60"]).ok();
        assert_eq!(compare::rows(&d), compare::rows(&s), "round {round}, after");
        p.run(&["verify", "s"]).ok();
    }
    p.run(&["teardown", "s"]).ok();
    assert_eq!(s.value("select count(*) from pg_trigger where tgname like 'pgleap%'"), "0");
}

/// The whole job on a source that allows decoding, under a pgbench load:
/// `upgrade --capture decoding` copies, syncs from the slot, verifies and
/// cuts over through the fence; the target ends equal to the source, and
/// the old server keeps no slot (it would hold its WAL back).
#[test]
fn upgrade_under_load_captured_by_decoding_pg15_to_pg17() {
    let src = TestDb::new(logical_cluster(15), "decupsrc");
    let dst = TestDb::new(cluster(17), "decupdst");
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
        "--capture",
        "decoding",
    ]);
    let text = out.ok();
    for expected in [
        "preflight: capture by logical decoding",
        "verify: every table equal",
        "writes were fenced for",
    ] {
        assert!(text.contains(expected), "missing {expected:?}:\n{out}");
    }
    let _ = load.kill();
    let _ = load.wait();
    let (s, d) = (src.sql(), dst.sql());
    assert_eq!(triggers_on(&s, "pgbench_accounts"), "1", "only the fence's trigger");
    assert_eq!(compare::rows(&d), compare::rows(&s));
    assert_eq!(slots(&s), "0", "the slot went with the cutover");
    p.run(&["teardown", "upgrade"]).ok();
}

/// Batches one after another while pgbench writes: each batch decodes
/// transactions that commit after its snapshot too, and those newer than
/// its own transaction (whose 32-bit ids must be dated right: dated into
/// the previous epoch, their keys were skipped by every later batch). A
/// verify runs meanwhile, its pump beside the batches'. The target ends
/// equal.
#[test]
fn batches_during_a_load_converge_pg15_to_pg17() {
    let src = TestDb::new(logical_cluster(15), "decloadsrc");
    let dst = TestDb::new(cluster(17), "decloaddst");
    finish(pgbench(&src, &["-i", "-q", "-s", "1"]).spawn().unwrap());
    crate::support::copy_database(&src, &dst);
    dst.sql().exec("truncate pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off", "--capture", "decoding"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let mut load = pgbench(&src, &["-n", "-c", "2", "-R", "100", "-T", "6"]).spawn().unwrap();
    let mut verify = p.command().args(["verify", "s"]).spawn().unwrap();
    for _ in 0..10 {
        p.run(&["kick", "s", "--wait", "60"]).ok();
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let _ = verify.wait();
    let _ = load.wait();
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let (s, d) = (src.sql(), dst.sql());
    let changed = "select count(*) from pgbench_accounts where abalance <> 0";
    assert_ne!(s.value(changed), "0", "the load changed nothing: the test proves nothing");
    assert_eq!(compare::rows(&d), compare::rows(&s));
    p.run(&["verify", "s"]).ok();
}

/// Before a pump that would read megabytes, pgleap has the server log
/// the running transactions (a temporary slot), so that the pump's
/// advance moves the slot's restart point past them: without it the
/// point stays until the server logs them by itself (every 15 s or at a
/// checkpoint), and every pump until then decodes the same WAL again. One
/// kick is enough (the record used to be written after the advance, for
/// the next pump to pass: the daemon's first pump after a kick decoded
/// again all the kick had read).
#[test]
fn the_slots_restart_point_follows_the_pumps_pg15_to_pg17() {
    let src = TestDb::new(logical_cluster(15), "decrestartsrc");
    let dst = TestDb::new(cluster(17), "decrestartdst");
    let schema = "create table kv (id int primary key, v text)";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off", "--capture", "decoding"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let s = src.sql();
    s.exec("insert into kv select g, repeat('x', 100) from generate_series(1, 50000) g");
    let written = s.value("select pg_current_wal_lsn()");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let restart = "select restart_lsn from pg_replication_slots where slot_name like 'pgleap%'";
    let moved = format!("select ({restart}) > '{written}'::pg_lsn");
    assert_eq!(s.value(&moved), "t", "restart point {} behind {written}", s.value(restart));
    s.exec("update kv set v = 'after' where id = 1");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    assert_eq!(compare::rows(&dst.sql()), compare::rows(&s));
    p.run(&["teardown", "s"]).ok();
}

/// A sync whose tables are idle on a server that is not: the rest of the
/// server writes (here another database; from 15 on, tables outside the
/// publication too), and the slot decodes nothing to send. The daemon's
/// pumps still move the slot past that WAL: they used to confirm only the
/// last transaction they read, so the slot kept every byte the server
/// wrote after the sync's last change, for as long as its tables stayed
/// idle.
#[test]
fn an_idle_sync_does_not_keep_a_busy_servers_wal_pg15_to_pg17() {
    let src = TestDb::new(logical_cluster(15), "decidlesrc");
    let busy = TestDb::new(logical_cluster(15), "decidlebusy");
    let dst = TestDb::new(cluster(17), "decidledst");
    let schema = "create table kv (id int primary key, v text)";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    busy.sql().exec("create table log (id int primary key, v text)");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always", "--capture", "decoding"]);
    let s = src.sql();
    s.exec("insert into kv values (1, 'before')");
    p.run(&["start"]).ok();
    wait_until(&dst.sql(), "select count(*) from kv", "1");
    for n in 0..4 {
        busy.sql().exec(&format!(
            "insert into log select g, repeat('x', 100) from generate_series({0}, {0} + 49999) g",
            n * 50000
        ));
    }
    let written = s.value("select pg_current_wal_lsn()");
    let slot = "from pg_replication_slots where slot_name like 'pgleap%'";
    wait_until(&s, &format!("select confirmed_flush_lsn >= '{written}' {slot}"), "t");
    wait_until(&s, &format!("select restart_lsn >= '{written}' {slot}"), "t");
    s.exec("update kv set v = 'after' where id = 1");
    wait_until(&dst.sql(), "select v from kv", "after");
    p.run(&["stop"]).ok();
    assert_eq!(compare::rows(&dst.sql()), compare::rows(&s));
    p.run(&["teardown", "s"]).ok();
}

/// A kill at either step of a pump: before its transaction commits (its
/// keys are lost with it, the slot was not advanced) and between the
/// commit and the slot's advance (the next pump decodes the same
/// transactions again). A rerun converges either way; a column added on
/// the source meanwhile is followed (the slot's relation message names it).
#[test]
fn a_kill_at_any_step_of_a_pump_and_a_column_added_converge_pg15_to_pg17() {
    let src = TestDb::new(logical_cluster(15), "deckillsrc");
    let dst = TestDb::new(cluster(17), "deckilldst");
    let schema = "create table kv (id int primary key, v text);
                  create table pair (a int, b text, v int, primary key (a, b));";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    src.sql().exec("insert into kv select g, 'v' || g from generate_series(1, 50) g");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off", "--capture", "decoding"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let s = src.sql();
    for (round, at) in ["decoding-pumped", "decoding-committed"].into_iter().enumerate() {
        s.exec(&format!(
            "update kv set v = 'round {round}' where id <= 10;
             update kv set id = id + 1000 where id = {};
             delete from kv where id = {};
             insert into pair values ({round}, 'x', {round});",
            20 + round,
            30 + round
        ));
        crate::support::killed_at(&p, at, &["kick", "s", "--wait", "30"]);
    }
    s.exec("alter table kv add column extra int default 7");
    s.exec("insert into kv (id, v, extra) values (500, 'after the column', 8)");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let d = dst.sql();
    assert_eq!(d.value("select extra from kv where id = 500"), "8");
    assert_eq!(compare::rows(&d), compare::rows(&s));
    p.run(&["teardown", "s"]).ok();
    assert_eq!(slots(&s), "0");
}

/// Creating the slot waits for the transactions running on the source: one
/// left open (a session idle in transaction) makes `sync add` refuse after
/// a bounded wait, naming it, and leave nothing behind.
#[test]
fn a_transaction_left_open_bounds_the_slots_creation_pg15_to_pg17() {
    let src = TestDb::new(logical_cluster(15), "decopensrc");
    let dst = TestDb::new(cluster(17), "decopendst");
    src.sql().exec("create table kv (id int primary key, v text)");
    dst.sql().exec("create table kv (id int primary key, v text)");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]).env("PGLEAP_SLOT_WAIT", "2");
    p.declare(&src, &dst, &["--all-tables"]);
    let open = src.sql();
    open.exec("begin; insert into kv values (1, 'open')");
    p.run(&["sync", "add", "s", "--relgroup", "rg", "--dbgroup", "g", "--capture", "decoding"])
        .fails_with(&["waited 2 s", "idle in transaction", "--capture triggers"]);
    open.exec("rollback");
    let s = src.sql();
    assert_eq!(slots(&s), "0");
    assert_eq!(s.value("select count(*) from pg_publication"), "0");
    assert_eq!(s.value("select count(*) from pg_namespace where nspname = 'pgleap'"), "0");
    p.add_sync(&["--capture", "decoding"]);
    assert_eq!(slots(&s), "1");
    p.run(&["teardown", "s"]).ok();
}

/// With `PGLEAP_DECODING_STREAM=1`, the daemon reads the slot through a
/// replication connection kept open from one pump to the next (each
/// change decoded once, where the SQL functions decode again from the
/// slot's restart point at every call):
/// while pgbench writes, the slot is held by pgleap's walsender between
/// batches, and what the daemon applied is confirmed to the server. Other
/// processes that need the slot take it (a verify's pump, a kick) and the
/// daemon's stream opens again after them; status does not take it. A
/// kill of the daemon and a restart, and a teardown that must drop the
/// slot while the daemon holds it, end with the target equal and no slot.
#[test]
fn the_daemon_streams_the_slot_and_gives_it_up_pg15_to_pg17() {
    let src = TestDb::new(logical_cluster(15), "decstreamsrc");
    let target = crate::support::private_cluster(17);
    let dst = TestDb::new(target, "decstreamdst");
    finish(pgbench(&src, &["-i", "-q", "-s", "1"]).spawn().unwrap());
    crate::support::copy_database(&src, &dst);
    dst.sql().exec("truncate pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history");
    // PGLEAP_DECODING_STREAM=0 in the test's environment: the test must
    // fail (no walsender holds the slot).
    let stream = std::env::var("PGLEAP_DECODING_STREAM").unwrap_or_else(|_| "1".into());
    let p = Pgleap::for_clusters(&[src.cluster, target]).env("PGLEAP_DECODING_STREAM", &stream);
    p.declare(&src, &dst, &["--all-tables"]);
    p.add_sync(&["--onetimecopy", "always", "--capture", "decoding"]);
    let s = src.sql();
    let streamed = "select count(*) from pg_replication_slots l
        join pg_stat_replication r on r.pid = l.active_pid
        where l.slot_name like 'pgleap%' and r.application_name = 'pgleap'";
    let confirmed = "select confirmed_flush_lsn from pg_replication_slots
        where slot_name like 'pgleap%'";
    let load = pgbench(&src, &["-n", "-c", "2", "-R", "150", "-T", "12"]).spawn().unwrap();
    p.run(&["start"]).ok();
    wait_until(&s, streamed, "1");
    let before = s.value(confirmed);
    let written = s.value("select pg_current_wal_lsn()");
    wait_until(&s, &format!("select ({confirmed}) > '{written}'::pg_lsn"), "t");
    assert_ne!(s.value(confirmed), before);

    // A status leaves the stream alone; a verify and a kick take the slot
    // for their pumps, and the daemon streams it again after them.
    let holder = "select active_pid from pg_replication_slots where slot_name like 'pgleap%'";
    let pid = s.value(holder);
    p.run(&["status", "s"]).ok();
    assert_eq!(s.value(holder), pid, "status took the slot from the stream");
    p.run(&["verify", "s"]).ok();
    p.run(&["kick", "s", "--wait", "60"]).ok();
    wait_until(&s, streamed, "1");

    // Killed and started again, then the target restarted under its
    // batches: each new stream begins where the slot was confirmed, and
    // what a pump read without committing comes again, with its marks (a
    // mark of the same text, from a counter started over, stopped a pump
    // short of its snapshot: rows lost, found by the suite with decoding
    // everywhere).
    let daemon: i32 =
        std::fs::read_to_string(p.catalog.with_extension("pid")).unwrap().trim().parse().unwrap();
    unsafe { libc::kill(daemon, libc::SIGKILL) };
    std::thread::sleep(std::time::Duration::from_millis(300));
    p.run(&["start"]).ok();
    wait_until(&s, streamed, "1");
    target.restart();
    wait_until(&s, streamed, "1");
    finish(load);
    let changed = "select count(*) from pgbench_accounts where abalance <> 0";
    assert_ne!(s.value(changed), "0", "the load changed nothing: the test proves nothing");
    s.exec("update pgbench_tellers set filler = 'last' where tid = 1");
    let d = dst.sql();
    wait_until(&d, "select trim(filler) from pgbench_tellers where tid = 1", "last");
    assert_eq!(compare::rows(&d), compare::rows(&s));
    // Idle, the daemon polls every 100 ms: a poll whose stream already
    // passed its snapshot commits no mark (about 10 a second otherwise).
    std::thread::sleep(std::time::Duration::from_millis(500));
    let xid = || s.value("select txid_current()").parse::<i64>().unwrap();
    let before = xid();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let used = xid() - before;
    assert!(used < 5, "{used} transaction ids used in 2 s of an idle source");
    p.run(&["verify", "s"]).ok();

    // Teardown while the daemon runs: the slot is dropped from under it.
    p.run(&["teardown", "s"]).ok();
    assert_eq!(slots(&s), "0");
    p.run(&["stop"]).ok();
}

/// Polls until `query` returns `expected`, for at most 60 s.
fn wait_until(sql: &Sql, query: &str, expected: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let got = sql.value(query);
        if got == expected {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{query} returned {got}, not {expected}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
