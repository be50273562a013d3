//! `pgleap cutover`: under load, the target ends equal with its sequences,
//! foreign keys and triggers, and the old source refuses writes.

use std::time::Duration;

use crate::support::{
    Pgleap, Sql, TestDb, cluster, copy_database, finish, killed_at, pgbench, writes_until_fenced,
};

const APP_SCHEMA: &str = "
    create table parent (id serial primary key, v text);
    create table child (id serial primary key, parent_id int references parent on delete cascade);
    create table audit (n serial primary key, what text);
    create function audit_it() returns trigger language plpgsql as
        $$ begin insert into audit (what) values (tg_op); return null; end $$;
    create trigger audit_parent after insert on parent for each row execute function audit_it();
    insert into parent (v) select 'p' || g from generate_series(1, 50) g;
    insert into child (parent_id) select g from generate_series(1, 50) g;
";

fn multiset(sql: &Sql, table: &str) -> Vec<Vec<Option<String>>> {
    sql.rows(&format!("select t::text from {table} t order by 1"))
}

#[test]
fn cutover_under_pgbench_load_pg12_to_pg17() {
    let src = TestDb::new(cluster(12), "cutsrc");
    let dst = TestDb::new(cluster(17), "cutdst");
    finish(pgbench(&src, &["-i", "-q", "-s", "1"]).spawn().unwrap());
    src.sql().exec(APP_SCHEMA);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["start"]).ok();
    p.run(&["kick", "s", "--wait", "60"]).ok();

    let mut load = pgbench(&src, &["-n", "-c", "2", "-T", "60"]).spawn().unwrap();
    let writer = {
        let sql = src.sql();
        std::thread::spawn(move || {
            for i in 0.. {
                let insert = format!(
                    "insert into parent (v) values ('w{i}');
                     insert into child (parent_id) values (currval('parent_id_seq'))"
                );
                match sql.try_exec(&insert) {
                    // Taking the fence's locks can deadlock with this
                    // transaction; the server fails one side, and an
                    // application retries, as this one does.
                    Err(e) if e.contains("deadlock detected") => {}
                    Err(e) => return e,
                    Ok(()) => {}
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            unreachable!()
        })
    };
    std::thread::sleep(Duration::from_secs(3));

    let rehearsal = p.run(&["cutover", "s", "--dry-run"]);
    assert!(rehearsal.ok().contains("predicted write downtime"), "{rehearsal}");
    let predicted = "predicted inside the fence: fence (taking the tables' locks) ";
    assert!(rehearsal.stdout.contains(predicted), "{rehearsal}");
    assert!(rehearsal.stdout.contains(", drain "), "{rehearsal}");
    src.sql().exec("insert into audit (what) values ('still writable after the dry run')");

    // A write transaction left open on a synced table: the fence would wait
    // for it, and the rehearsal waits for it too (without blocking the
    // other writers meanwhile), so its prediction counts that wait.
    let committed = std::sync::Arc::new(std::sync::Mutex::new(None));
    let open = {
        let (sql, committed) = (src.sql(), committed.clone());
        std::thread::spawn(move || {
            sql.exec("begin; insert into audit (what) values ('open'); select pg_sleep(4); commit");
            *committed.lock().unwrap() = Some(std::time::Instant::now());
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let before = src.sql().value("select count(*) from parent");
    let rehearsal = p.run(&["cutover", "s", "--dry-run", "--json"]).json();
    let ended = std::time::Instant::now();
    open.join().unwrap();
    let committed = committed.lock().unwrap().expect("the open transaction committed");
    assert!(ended >= committed, "the rehearsal did not wait for the open transaction");
    let lock_step = rehearsal["inside_fence"][0]["ms"].as_i64().unwrap();
    assert!(lock_step > 0, "{rehearsal}");
    let after: i64 = src.sql().value("select count(*) from parent").parse().unwrap();
    assert!(after > before.parse::<i64>().unwrap() + 20, "writes stalled during the rehearsal");

    let out = p.run(&["cutover", "s", "--json", "--rollback-sync", "back"]);
    let report = out.json();
    assert_eq!(report["dry_run"], false);
    assert!(report["fence_ms"].as_i64().unwrap() > 0, "{report}");
    let steps = |side: &str| -> Vec<String> {
        report[side].as_array().unwrap().iter().map(|s| s["step"].to_string()).collect()
    };
    let inside = steps("inside_fence");
    for step in ["drain", "sequences", "deferred schema", "sync back", "switch"] {
        assert!(inside.contains(&format!("\"{step}\"")), "{step}: {report}");
    }
    assert!(steps("before_fence").contains(&"\"row counts at one point\"".into()), "{report}");
    let refused = writer.join().unwrap();
    assert!(refused.contains("moved to pgleap database \"dst\""), "{refused}");
    let _ = load.kill();
    let _ = load.wait();
    p.run(&["stop"]).ok();

    let (s, d) = (src.sql(), dst.sql());
    for table in [
        "pgbench_accounts",
        "pgbench_branches",
        "pgbench_tellers",
        "pgbench_history",
        "parent",
        "child",
        "audit",
    ] {
        assert_eq!(multiset(&s, table), multiset(&d, table), "{table}");
    }
    for seq in ["parent_id_seq", "child_id_seq", "audit_n_seq"] {
        let q = format!("select last_value from {seq}");
        assert_eq!(s.value(&q), d.value(&q), "{seq}");
    }
    assert_eq!(
        d.value("select convalidated from pg_constraint where conname = 'child_parent_id_fkey'"),
        "t"
    );
    assert_eq!(d.value("select count(*) from pg_trigger where tgname = 'audit_parent'"), "1");
    // The new server takes writes, with its trigger; the old one refuses.
    d.exec("insert into parent (v) values ('on the new server')");
    assert_eq!(d.value("select what from audit order by n desc limit 1"), "INSERT");
    let err = s.try_exec("update pgbench_accounts set abalance = 0 where aid = 1").unwrap_err();
    assert!(err.contains("no longer takes writes: it moved to pgleap database \"dst\""), "{err}");
    p.run(&["kick", "s"]).fails_with(&["was cut over"]);

    // The rollback sync carries writes on the new server back to the old
    // one (through its fence), so going back loses nothing.
    assert_eq!(report["rollback_sync"], "back");
    d.exec(
        "update parent set v = 'changed on the new server' where id = 1;
            insert into parent (v) values ('born on the new server')",
    );
    p.run(&["kick", "back", "--wait", "60"]).ok();
    for table in ["parent", "child", "audit"] {
        assert_eq!(multiset(&s, table), multiset(&d, table), "{table} after rollback sync");
    }
    assert!(s.try_exec("insert into audit (what) values ('app')").is_err(), "old source unfenced");
    p.run(&["stop"]).ok();
    p.run(&["teardown", "back"]).ok();
    p.run(&["teardown", "s"]).ok();
}

/// --terminate ends the source's other sessions and makes it read-only.
#[test]
fn cutover_terminate_ends_sessions_and_makes_the_source_read_only_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "termsrc");
    let dst = TestDb::new(cluster(17), "termdst");
    let schema = "create table t (id serial primary key, v text)";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    src.sql().exec("insert into t (v) select 'r' || g from generate_series(1, 10) g");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    let idle = src.sql();
    assert_eq!(idle.value("select 1"), "1");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    p.run(&["cutover", "s", "--terminate", "--sequence-margin", "1000"]).ok();
    assert!(idle.try_exec("select 1").is_err(), "the idle session survived --terminate");
    assert_eq!(src.sql().value("show default_transaction_read_only"), "on");
    assert_eq!(dst.sql().value("select last_value from t_id_seq"), "1010");
    p.run(&["teardown", "s"]).ok();
}

/// After a cutover, status says so and where the writes go; teardown keeps
/// the old server's fence (and --terminate's read-only default) unless told
/// --unfence, so the old server never takes writes again by surprise.
#[test]
fn after_cutover_status_says_so_and_teardown_keeps_the_fence_unless_unfenced_pg15_to_pg17() {
    for unfence in [false, true] {
        let src = TestDb::new(cluster(15), "keepsrc");
        let dst = TestDb::new(cluster(17), "keepdst");
        let schema = "create table t (id serial primary key, v text)";
        src.sql().exec(schema);
        dst.sql().exec(schema);
        src.sql().exec("insert into t (v) values ('a'), ('b')");
        let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
        p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
        p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
        p.run(&["kick", "s", "--wait", "60"]).ok();
        p.run(&["cutover", "s", "--terminate"]).ok();

        let status = p.run(&["status", "s", "--json"]);
        assert_eq!(status.stdout.matches("\"target\"").count(), 1, "{status}");
        let target = &status.json()["syncs"][0]["targets"][0];
        assert_eq!(target["state"], "cut over", "{status}");
        assert_eq!(target["writes_go_to"], "dst", "{status}");

        let mut args = vec!["teardown", "s"];
        if unfence {
            args.push("--unfence");
        }
        let out = p.run(&args);
        let insert = "insert into t (v) values ('after teardown')";
        if unfence {
            assert!(!out.ok().contains("keeps refusing writes"), "{out}");
            assert_eq!(src.sql().value("show default_transaction_read_only"), "off");
            src.sql().exec(insert);
        } else {
            assert!(out.ok().contains("keeps refusing writes"), "{out}");
            assert_eq!(src.sql().value("show default_transaction_read_only"), "on");
            let refused = src.sql().try_exec(&format!("set transaction read write; {insert}"));
            assert!(refused.unwrap_err().contains("moved to"), "the fence is gone");
        }
    }
}

/// A dry run writes nothing to the target: a grant the cutover would
/// create (and a comment) is named, not created; the cutover then creates
/// them.
#[test]
fn a_dry_run_names_what_it_would_create_and_creates_nothing_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "drysrc");
    let dst = TestDb::new(cluster(17), "drydst");
    let schema = "create table t (id serial primary key, v text)";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    for db in [&src, &dst] {
        db.cluster.superuser("postgres").try_exec("create role dry_reader").ok();
    }
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    p.run(&["kick", "s", "--wait", "30"]).ok();
    // Made on the source during the sync, after the initial copy.
    src.sql().exec("grant select on t to dry_reader; comment on table t is 'the table'");
    let granted = "select has_table_privilege('dry_reader', 't', 'select')";
    let comment = "select coalesce(obj_description('t'::regclass, 'pg_class'), '')";
    let rehearsal = p.run(&["cutover", "s", "--dry-run"]);
    let text = rehearsal.ok();
    assert!(text.contains("the cutover would create on the target: "), "{rehearsal}");
    assert!(text.contains("dry_reader"), "{rehearsal}");
    assert_eq!(dst.sql().value(granted), "f", "the dry run granted");
    assert_eq!(dst.sql().value(comment), "", "the dry run commented");
    p.run(&["cutover", "s"]).ok();
    assert_eq!(dst.sql().value(granted), "t");
    assert_eq!(dst.sql().value(comment), "the table");
    p.run(&["teardown", "s"]).ok();
}

/// A sync of parent/child (a foreign key) and audit (a trigger), its
/// schema copied by pgleap, copied and caught up.
fn cutover_pair(label: &str) -> (TestDb, TestDb, Pgleap) {
    let src = TestDb::new(cluster(15), &format!("{label}src"));
    let dst = TestDb::new(cluster(17), &format!("{label}dst"));
    src.sql().exec(APP_SCHEMA);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    (src, dst, p)
}

/// Waits until a cutover of `src` is taking its fence (the fence's DDL is
/// on the server; other tests cut over beside it on the same server).
fn wait_until_fencing(src: &TestDb) {
    let watcher = src.cluster.superuser(&src.name);
    let fencing = "select count(*) from pg_stat_activity where pid <> pg_backend_pid()
                   and datname = current_database() and query like '%no longer takes writes%'";
    let started = std::time::Instant::now();
    while watcher.value(fencing) == "0" {
        assert!(started.elapsed() < Duration::from_secs(60), "the cutover never fenced");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every row of APP_SCHEMA's tables on the target as on the source.
#[track_caller]
fn assert_app_tables_equal(src: &TestDb, dst: &TestDb) {
    for table in ["parent", "child", "audit"] {
        assert_eq!(multiset(&dst.sql(), table), multiset(&src.sql(), table), "{table}");
    }
}

const NOT_VALID: &str =
    "select count(*) from pg_constraint where contype = 'f' and not convalidated";

/// A cutover killed inside its fence leaves the source refusing writes:
/// status says so (exit 1) and ready says no; a rerun undoes that fence
/// and cuts over, ending equal.
#[test]
fn a_cutover_killed_inside_its_fence_is_shown_and_undone_by_a_rerun_pg15_to_pg17() {
    let (src, dst, p) = cutover_pair("killfence");
    killed_at(&p, "cutover-fenced", &["cutover", "s", "--terminate"]);
    assert!(src.sql().try_exec("insert into audit (what) values ('x')").is_err(), "not fenced");
    let status = p.run(&["status", "s"]);
    assert_eq!(status.code, 1, "{status}");
    assert!(status.stdout.contains("cutover unfinished: the source may refuse writes"), "{status}");
    let ready = p.run(&["ready", "s"]);
    assert_eq!(ready.code, 1, "{ready}");
    assert!(ready.stdout.contains("cutover unfinished"), "{ready}");

    let out = p.run(&["cutover", "s"]);
    assert!(out.ok().contains("the source now refuses writes"), "{out}");
    assert!(out.stderr.contains("was killed inside its fence; undoing it first"), "{out}");
    assert_eq!(src.sql().value("show default_transaction_read_only"), "off", "--terminate undone");
    assert_app_tables_equal(&src, &dst);
    assert_eq!(dst.sql().value(NOT_VALID), "0");
    assert!(p.run(&["status", "s"]).ok().contains("cut over"));
    p.run(&["teardown", "s"]).ok();
}

/// A cutover killed past its switch point (the sync retired, foreign keys
/// still NOT VALID) is shown unfinished (exit 1) and finished by a rerun.
#[test]
fn a_cutover_killed_past_its_switch_point_is_finished_by_a_rerun_pg15_to_pg17() {
    let (_src, dst, p) = cutover_pair("killswitch");
    killed_at(&p, "cutover-switched", &["cutover", "s"]);
    assert_ne!(dst.sql().value(NOT_VALID), "0", "foreign keys were validated");
    let status = p.run(&["status", "s"]);
    assert_eq!(status.code, 1, "{status}");
    assert!(status.stdout.contains("cutover unfinished: past its switch point"), "{status}");
    let out = p.run(&["cutover", "s"]);
    assert!(out.ok().contains("foreign keys validated"), "{out}");
    assert_eq!(dst.sql().value(NOT_VALID), "0");
    let status = p.run(&["status", "s"]);
    assert!(status.ok().contains("cut over"), "{status}");
    p.run(&["teardown", "s"]).ok();
}

/// A rollback killed at its switch point: the old server's fence is lifted
/// only past it, so the old server still refuses writes (the new one too:
/// never both taking them); the rerun finishes the rollback, lifting it.
#[test]
fn a_rollback_killed_at_its_switch_point_is_finished_by_a_rerun_pg15_to_pg17() {
    let (src, dst, p) = cutover_pair("killback");
    p.run(&["cutover", "s", "--rollback-sync", "back"]).ok();
    dst.sql().exec("insert into parent (v) values ('written on the new server')");
    killed_at(&p, "cutover-switched", &["rollback", "s"]);
    let insert = "insert into parent (v) values ('between')";
    assert!(dst.sql().try_exec(insert).is_err(), "the new server takes writes after the switch");
    assert!(src.sql().try_exec(insert).is_err(), "the old fence came off before the switch point");
    let out = p.run(&["rollback", "s"]);
    out.ok();
    src.sql().exec("insert into parent (v) values ('after the rollback')");
    assert!(dst.sql().try_exec(insert).is_err(), "{out}");
    let written =
        src.sql().value("select count(*) from parent where v = 'written on the new server'");
    assert_eq!(written, "1", "the new server's write came back");
    p.run(&["stop"]).ok();
    p.run(&["teardown", "s"]).ok();
    p.run(&["teardown", "back", "--unfence"]).ok();
}

/// A cutover killed after arming its sync back: the rerun is not refused
/// over the name, removes the half-armed sync back from the new server and
/// the catalog, and arms it again once; teardown removes it.
#[test]
fn a_cutover_killed_while_arming_its_sync_back_is_redone_cleanly_pg15_to_pg17() {
    let (_src, dst, p) = cutover_pair("killarm");
    killed_at(&p, "cutover-armed", &["cutover", "s", "--rollback-sync", "back"]);
    let out = p.run(&["cutover", "s", "--rollback-sync", "back"]);
    assert!(out.ok().contains("the source now refuses writes"), "{out}");
    let triggers = "select count(distinct tgname) from pg_trigger where tgname like 'pgleap%'";
    let on_new = dst.sql().value(triggers);
    p.run(&["stop"]).ok();
    p.run(&["teardown", "back"]).ok();
    assert_eq!(dst.sql().value(triggers), "0", "the sync back left {on_new} trigger names");
    p.run(&["teardown", "s"]).ok();
    assert_eq!(dst.sql().value("select count(*) from pg_namespace where nspname = 'pgleap'"), "0");
}

/// Foreign keys on a partitioned table (which takes no NOT VALID key
/// before 18) are added at cutover the way the server allows, and a key
/// referencing a partitioned table too; both valid on the target.
fn partitioned_foreign_keys(target: u32, restored: bool) {
    let src = TestDb::new(cluster(15), &format!("pfk{target}{restored}src"));
    let dst = TestDb::new(cluster(target), &format!("pfk{target}{restored}dst"));
    src.sql().exec(
        "create table brand (name text primary key);
         create table model (name text, year int, brand text not null references brand,
                             primary key (name, year)) partition by range (year);
         create table model_old partition of model for values from (1900) to (2000);
         create table model_new partition of model for values from (2000) to (2100);
         create table sale (id int primary key, name text, year int,
                            foreign key (name, year) references model);
         insert into brand values ('a'), ('b');
         insert into model values ('m1', 1990, 'a'), ('m2', 2010, 'b');
         insert into sale values (1, 'm1', 1990), (2, 'm2', 2010);",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    if restored {
        // The Bucardo recipe: an administrator restored schema and rows
        // first; pgleap sets the foreign keys aside (the server's derived
        // ones go with theirs) and restores them at cutover.
        copy_database(&src, &dst);
        p.add_sync(&["--onetimecopy", "never", "--autokick", "off"]);
    } else {
        p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
        p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    }
    p.run(&["kick", "s", "--wait", "60"]).ok();
    src.sql().exec(
        "insert into model values ('m3', 2020, 'a'); insert into sale values (3, 'm3', 2020)",
    );
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let out = p.run(&["cutover", "s"]);
    assert!(out.ok().contains("the source now refuses writes"), "{out}");
    let fks = "select conrelid::regclass::text || ' ' || convalidated from pg_constraint
               where contype = 'f' and conparentid = 0
                 and connamespace = 'public'::regnamespace order by 1";
    assert_eq!(dst.sql().rows(fks), src.sql().rows(fks));
    assert!(dst.sql().try_exec("insert into sale values (9, 'nope', 1990)").is_err());
    assert_eq!(multiset(&dst.sql(), "sale"), multiset(&src.sql(), "sale"));
    p.run(&["teardown", "s"]).ok();
}

#[test]
fn foreign_keys_of_partitioned_tables_are_added_at_cutover_pg15_to_pg17() {
    partitioned_foreign_keys(17, false);
}

#[test]
fn foreign_keys_of_partitioned_tables_are_added_at_cutover_pg15_to_pg18() {
    partitioned_foreign_keys(18, false);
}

#[test]
fn foreign_keys_of_a_restored_partitioned_schema_are_set_aside_and_restored_pg15_to_pg17() {
    partitioned_foreign_keys(17, true);
}

/// Rows the target gained outside the sync are found before the fence, by
/// counting both servers at one point of the sync: the cutover is refused
/// with the source never fenced, and goes through once the stray row is
/// gone.
#[test]
fn a_row_written_to_the_target_outside_the_sync_refuses_the_cutover_before_its_fence_pg15_to_pg17()
{
    let (src, dst, p) = cutover_pair("stray");
    dst.sql().exec("insert into audit (what) values ('written on the target by hand')");
    let out = p.run(&["cutover", "s"]);
    out.fails_with(&[
        "public.audit has 50 rows on the source and 51 on the target",
        "nothing was fenced",
    ]);
    src.sql().exec("insert into audit (what) values ('the source still takes writes')");
    dst.sql().exec("delete from audit where what = 'written on the target by hand'");
    p.run(&["cutover", "s"]).ok();
    assert_app_tables_equal(&src, &dst);
    p.run(&["teardown", "s"]).ok();
}

/// Inside the fence only the drained keys are looked at: a target that
/// changes rows as pgleap writes them (here a rule; pgleap sets triggers
/// aside, not rules) is caught there, the fence is lifted and nothing
/// switched; once the rule is gone the rerun ends equal.
#[test]
fn a_target_that_changes_rows_as_they_are_applied_is_caught_inside_the_fence_pg15_to_pg17() {
    let (src, dst, p) = cutover_pair("rewrite");
    dst.sql().exec("create rule keep_v as on update to parent do instead nothing");
    // Committed only once the fence is being taken: the change is in the
    // drain, not in the catch-up before it.
    let app = src.sql();
    app.exec("begin; update parent set v = 'changed late' where id = 1");
    let mut cutover = p.command();
    cutover.args(["cutover", "s"]);
    let cutover = std::thread::spawn(move || cutover.output());
    wait_until_fencing(&src);
    app.exec("commit");
    let out = cutover.join().unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("public.parent: the row of key (1) on the target differs"), "{stderr}");
    src.sql().exec("insert into audit (what) values ('the source still takes writes')");
    assert_eq!(dst.sql().value("select v from parent where id = 1"), "p1", "the batch stayed");

    dst.sql().exec("drop rule keep_v on parent");
    p.run(&["cutover", "s"]).ok();
    assert_app_tables_equal(&src, &dst);
    p.run(&["teardown", "s"]).ok();
}

/// Ctrl-C while a cutover is inside its fence does not leave the source
/// fenced with nothing switched: the cutover says it finishes first, does,
/// and exits as a completed cutover.
#[test]
fn an_interrupt_inside_the_fence_waits_for_the_switch_pg15_to_pg17() {
    let (src, dst, p) = cutover_pair("sigint");
    // Holds the fence's locks back, so the interrupt lands inside it.
    let app = src.sql();
    app.exec("begin; update parent set v = 'held' where id = 1");
    let child = p
        .command()
        .args(["cutover", "s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_fencing(&src);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    std::thread::sleep(Duration::from_millis(500));
    app.exec("commit");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("interrupt: the cutover is inside its fence"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(src.sql().try_exec("insert into audit (what) values ('x')").is_err(), "not fenced");
    assert_app_tables_equal(&src, &dst);
    assert!(p.run(&["status", "s"]).ok().contains("cut over"));
    p.run(&["teardown", "s"]).ok();
}

/// An applier that connects while a cutover stands inside its fence, past
/// putting the target's foreign keys back (a `kick` here; the daemon's
/// worker reconnecting is the same path), leaves them: it used to set them
/// aside again, and the cutover then failed to validate a key that was
/// gone (or, had it not validated, left the new server without it).
#[test]
fn an_applier_connecting_inside_the_fence_leaves_the_restored_keys_pg15_to_pg17() {
    let (src, dst, p) = cutover_pair("guard");
    let cutover = p
        .command()
        .env("PGLEAP_PAUSEPOINT", "cutover-schema-restored")
        .args(["cutover", "s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let restored = "select count(*) from pg_constraint where conname = 'child_parent_id_fkey'";
    let started = std::time::Instant::now();
    while dst.sql().value(restored) == "0" {
        assert!(started.elapsed() < Duration::from_secs(60), "the cutover never restored the key");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Whatever the kick says (the source is fenced), it must not touch
    // the target's keys.
    let _ = p.run(&["kick", "s", "--wait", "10"]);
    assert_eq!(dst.sql().value(restored), "1", "the kick set the restored key aside again");
    let out = cutover.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let valid = "select convalidated from pg_constraint where conname = 'child_parent_id_fkey'";
    assert_eq!(dst.sql().value(valid), "t");
    assert_app_tables_equal(&src, &dst);
    p.run(&["teardown", "s"]).ok();
}

/// Rollback, fix, cut over again: the path README documents. After a
/// rollback the old server takes writes again; removing both syncs (the
/// new server unfenced) and adding a sync that copies again (it replaces
/// the new server's rows, and says so) moves again, ending equal with the
/// writes made after the rollback, and a second cutover works.
#[test]
fn rollback_fix_and_cut_over_again_pg15_to_pg17() {
    let (src, dst, p) = cutover_pair("again");
    p.run(&["cutover", "s", "--rollback-sync", "back"]).ok();
    dst.sql().exec("insert into parent (v) values ('written on the new server')");
    p.run(&["rollback", "s"]).ok();
    // The new server's fence names the old one, where the writes go now.
    let refused = dst.sql().try_exec("insert into parent (v) values ('refused')").unwrap_err();
    assert!(refused.contains("moved to pgleap database \"src\""), "{refused}");
    src.sql().exec("insert into parent (v) values ('after the rollback')");
    // What status says to do, done.
    let status = p.run(&["status", "s"]);
    let said = status.ok();
    assert!(said.contains("pgleap teardown s, then pgleap teardown back --unfence"), "{status}");
    assert!(said.contains("--onetimecopy always"), "{status}");
    p.run(&["teardown", "s"]).ok();
    p.run(&["teardown", "back", "--unfence"]).ok();
    // The fix: a column the first attempt missed, made on both.
    for db in [&src, &dst] {
        db.sql().exec("alter table parent add column note text default 'fixed'");
    }
    let again = p.run(&[
        "sync",
        "add",
        "s2",
        "--relgroup",
        "rg",
        "--dbgroup",
        "g",
        "--onetimecopy",
        "always",
        "--autokick",
        "off",
    ]);
    again.ok();
    assert!(again.stderr.contains("replaces the rows target \"dst\" holds"), "{again}");
    p.run(&["kick", "s2", "--wait", "60"]).ok();
    src.sql().exec("insert into parent (v) values ('before the second cutover')");
    let cut = p.run(&["cutover", "s2"]);
    assert!(cut.ok().contains("the source now refuses writes"), "{cut}");
    assert_app_tables_equal(&src, &dst);
    let names = "select string_agg(v, ',' order by v) from parent
                 where v in ('written on the new server', 'after the rollback',
                                'before the second cutover')";
    assert_eq!(
        dst.sql().value(names),
        "after the rollback,before the second cutover,written on the new server"
    );
    dst.sql().exec("insert into parent (v) values ('the new server takes writes')");
    p.run(&["teardown", "s2"]).ok();
}

/// APP_SCHEMA on a 15 source synced to two targets, a (17) and b (18),
/// copied and caught up.
fn two_targets(label: &str) -> (TestDb, TestDb, TestDb, Pgleap) {
    let src = TestDb::new(cluster(15), &format!("{label}src"));
    let a = TestDb::new(cluster(17), &format!("{label}a"));
    let b = TestDb::new(cluster(18), &format!("{label}b"));
    src.sql().exec(APP_SCHEMA);
    let p = Pgleap::for_clusters(&[src.cluster, a.cluster, b.cluster]);
    p.run(&["db", "add", "src", "--dsn", &src.dsn()]).ok();
    p.run(&["db", "add", "a", "--dsn", &a.dsn()]).ok();
    p.run(&["db", "add", "b", "--dsn", &b.dsn()]).ok();
    p.run(&["relgroup", "add", "rg", "--db", "src", "--all-tables", "--all-sequences"]).ok();
    p.run(&["dbgroup", "add", "g", "src:source", "a:target", "b:target"]).ok();
    for to in ["a", "b"] {
        p.run(&["schema", "copy", "--from", "src", "--to", to]).ok();
    }
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    (src, a, b, p)
}

/// A sync with two targets: `cutover --to` fences once, brings both to the
/// same final state (rows, sequences, foreign keys, triggers) under writes,
/// switches to the one named, and with --keep-others the other follows the
/// new server from then on; a sync back to the old one is armed as well.
#[test]
fn cutover_to_one_of_two_targets_keeps_the_other_following_pg15_to_pg17_and_pg18() {
    let (src, a, b, p) = two_targets("two");
    p.run(&["cutover", "s"]).fails_with(&["has 2 targets", "--to NAME"]);
    p.run(&["cutover", "s", "--to", "c"]).fails_with(&["\"c\" is not a target of sync \"s\""]);
    let ready = p.run(&["ready", "s"]);
    assert!(ready.ok().contains("is ready to cut over: pgleap cutover s --to a|b"), "{ready}");

    let writer = writes_until_fenced(src.sql(), |i| {
        format!("insert into parent (v) values ('w{i}'); insert into child (parent_id) values (1);")
    });
    std::thread::sleep(Duration::from_millis(500));
    let cut = p.run(&[
        "cutover",
        "s",
        "--to",
        "a",
        "--keep-others",
        "keep",
        "--rollback-sync",
        "back",
        "--json",
    ]);
    let report = cut.json();
    let written = writer.join().unwrap();
    assert!(written > 0, "no write before the fence");
    assert_eq!(report["target"], "a", "{report}");
    assert_eq!(report["others"], serde_json::json!(["b"]), "{report}");
    assert_eq!(report["keep_sync"], "keep", "{report}");
    // Both targets at the source's final state, foreign keys validated,
    // triggers on, sequences set.
    for target in [&a, &b] {
        assert_app_tables_equal(&src, target);
        assert_eq!(target.sql().value(NOT_VALID), "0");
        assert_eq!(
            target.sql().value("select last_value from parent_id_seq"),
            src.sql().value("select last_value from parent_id_seq")
        );
    }
    let status = p.run(&["status", "s", "--json"]).json_any();
    for t in status["syncs"][0]["targets"].as_array().unwrap() {
        assert_eq!(t["writes_go_to"], "a", "{status}");
    }

    // The application writes to a: b follows (the daemon started for the
    // armed syncs), and the old server gets them back.
    a.sql().exec("insert into parent (v) values ('on the new server')");
    let seen = "select count(*) from parent where v = 'on the new server'";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while b.sql().value(seen) != "1" || src.sql().value(seen) != "1" {
        assert!(std::time::Instant::now() < deadline, "b or the old server did not follow a");
        std::thread::sleep(Duration::from_millis(200));
    }
    p.run(&["kick", "keep", "--wait", "60"]).ok();
    for table in ["parent", "child", "audit"] {
        assert_eq!(multiset(&b.sql(), table), multiset(&a.sql(), table), "{table}");
    }
    p.run(&["stop"]).ok();
    for sync in ["keep", "back", "s"] {
        p.run(&["teardown", sync]).ok();
    }
}

/// A cutover to one of two targets killed once it armed the sync to the
/// other: the rerun removes that sync, sets both targets' foreign keys and
/// triggers aside again, and cuts over afresh; the other target then
/// follows the new server.
#[test]
fn a_cutover_to_one_of_two_targets_killed_inside_its_fence_is_undone_pg15_to_pg17_and_pg18() {
    let (src, a, b, p) = two_targets("twokill");
    let args = ["cutover", "s", "--to", "a", "--keep-others", "keep"];
    killed_at(&p, "cutover-armed", &args);
    assert!(p.run(&["status", "s"]).stdout.contains("cutover unfinished"));
    // The rerun undoes the half-armed sync (its name is free again) and
    // cuts over.
    let out = p.run(&args);
    assert!(out.ok().contains("sync \"keep\" keeps them following \"a\""), "{out}");
    for target in [&a, &b] {
        assert_app_tables_equal(&src, target);
    }
    a.sql().exec("insert into parent (v) values ('on the new server')");
    p.run(&["kick", "keep", "--wait", "60"]).ok();
    for table in ["parent", "child", "audit"] {
        assert_eq!(multiset(&b.sql(), table), multiset(&a.sql(), table), "{table}");
    }
    p.run(&["stop"]).ok();
    for sync in ["keep", "s"] {
        p.run(&["teardown", sync]).ok();
    }
}
