//! `pgleap upgrade`: the whole job in one command, resumable, refusing
//! early what cannot work.

use crate::support::{Pgleap, Sql, TestDb, cluster, finish, pgbench, writes_until_fenced};

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
        "initial copy and catch-up",
        "write downtime: ",
        "next: point the application at the new server",
        "preflight: PostgreSQL 12.",
        "-> 17.",
        "replicated by whole rows: public.pgbench_history",
        "verify: every table equal",
        "writes were fenced for",
        // Where the time went, the fence's steps among them.
        "inside the fence: fence (taking the tables' locks) ",
        "fence: drain",
        "fence: deferred schema",
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
    // Off a terminal the progress goes to the log; --quiet leaves only the
    // results and the warnings.
    assert!(first.stderr.contains("verify: public.pgbench_accounts done"), "{first}");
    src.sql().exec("update pgbench_accounts set abalance = 7 where aid <= 10");
    let args = ["upgrade", "--source", &src.uri(), "--target", &dst.uri(), "--cutover", "auto"];
    let second = p.run(&[&args[..], &["--quiet"]].concat());
    let text = second.ok();
    assert!(!text.contains("added database"), "the rerun started over:\n{second}");
    assert!(text.contains("writes were fenced for"), "{second}");
    assert!(!second.stderr.contains("verify: "), "{second}");
    assert!(!second.stderr.contains("INFO"), "{second}");
    for table in PGBENCH {
        assert_eq!(multiset(&src.sql(), table), multiset(&dst.sql(), table), "{table}");
    }
    p.run(&["teardown", "upgrade"]).ok();
}

/// A 17 source needs pg_dump 17 or newer: a --pg-bin too old is refused
/// in preflight, before anything is written (the one scripts/install-pg
/// installs, 18, is found by itself: `upgrade_shapes_from_pg17_to_pg18`).
#[test]
fn a_pg_dump_too_old_for_the_source_is_refused_in_preflight_pg17_to_pg18() {
    let src = TestDb::new(cluster(17), "up18src");
    let dst = TestDb::new(cluster(18), "up18dst");
    src.sql().exec("create table t (id int primary key)");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let too_old = p.run(&[
        "upgrade",
        "--source",
        &src.dsn(),
        "--target",
        &dst.dsn(),
        "--pg-bin",
        "/usr/lib/postgresql/15/bin",
    ]);
    too_old.fails_with(&["needs pg_dump 17 or newer", "found: 15 in /usr/lib/postgresql/15/bin"]);
    assert_eq!(p.run(&["db", "list", "--json"]).json(), serde_json::json!([]));
    assert_eq!(dst.sql().value("select count(*) from pg_tables where schemaname = 'public'"), "0");
}

/// An extension only a superuser can create: named in preflight with the
/// command an administrator runs; once it exists on the target, the
/// upgrade keeps it as it is.
#[test]
fn an_extension_the_role_cannot_create_is_named_then_accepted_once_created_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "extsrc");
    let dst = TestDb::new(cluster(17), "extdst");
    src.cluster.superuser(&src.name).exec("create extension pg_stat_statements");
    src.sql().exec("create table t (id int primary key); insert into t values (1), (2);");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let args = ["upgrade", "--source", &src.dsn(), "--target", &dst.dsn(), "--cutover", "auto"];
    p.run(&args).fails_with(&[
        "only a superuser can create",
        "pg_stat_statements",
        "CREATE EXTENSION \"pg_stat_statements\";",
    ]);
    assert_eq!(p.run(&["db", "list", "--json"]).json(), serde_json::json!([]));
    dst.cluster.superuser(&dst.name).exec("create extension pg_stat_statements");
    let out = p.run(&args);
    assert!(out.ok().contains("writes were fenced for"), "{out}");
    assert_eq!(
        dst.sql().rows("select id from t order by 1"),
        src.sql().rows("select id from t order by 1")
    );
}

/// The schema every source major has (generated columns are added for 12
/// and later).
const SHAPES: &str = "
    create schema kinds;
    create type kinds.state as enum ('open', 'closed');
    create table ticket (id serial primary key, s kinds.state not null, note text);
    create index ticket_open on ticket (id) where s = 'open';
    create table animal (id serial primary key, name text not null);
    create table dog (breed text) inherits (animal);
    alter table dog add primary key (id);
    create table nothing ();
    create table events (id int, at date not null, primary key (id, at)) partition by range (at);
    create table events_a partition of events for values from ('2000-01-01') to ('2050-01-01');
    create table events_b partition of events for values from ('2050-01-01') to ('2100-01-01');
    insert into ticket (s) select case when g % 2 = 0 then 'open' else 'closed' end::kinds.state
    from generate_series(1, 200) g;
    insert into animal (name) select 'a' || g from generate_series(1, 50) g;
    insert into dog (name, breed) select 'd' || g, 'x' from generate_series(1, 50) g;
    insert into nothing default values;
    insert into events select g, date '2000-01-01' + g * 100 from generate_series(1, 300) g;";

/// `upgrade --cutover auto` under writes of a schema with an inheritance
/// tree, a zero-column table, a generated-only table (12 and later), a
/// partitioned table and an index on a type of another schema; rows and
/// sequences equal at the end, the index fully qualified.
fn upgrade_shapes(major: u32, target: u32) {
    let src = TestDb::new(cluster(major), &format!("up{major}to{target}src"));
    let dst = TestDb::new(cluster(target), &format!("up{major}to{target}dst"));
    src.cluster
        .superuser("postgres")
        .exec(&format!("alter database \"{}\" set search_path = public, kinds", src.name));
    let mut schema = SHAPES.to_string();
    if major == 10 {
        // PostgreSQL 10 has no keys on partitioned tables: its partitions do.
        schema = schema.replace(", primary key (id, at)) partition by", ") partition by")
            + "alter table events_a add primary key (id, at);
               alter table events_b add primary key (id, at);";
    }
    if major >= 12 {
        schema += "create table computed (g int generated always as (7) stored);
                   insert into computed default values;";
    }
    src.sql().exec(&schema);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let writer = writes_until_fenced(src.sql(), |i| {
        format!(
            "insert into ticket (s, note) values ('open', 'w{i}');
             update animal set name = name || '.' where id = {};
             insert into events values ({i} + 1000, date '2001-01-01');
             insert into nothing default values;",
            i % 100 + 1
        )
    });
    let out =
        p.run(&["upgrade", "--source", &src.dsn(), "--target", &dst.dsn(), "--cutover", "auto"]);
    let text = out.ok();
    assert!(text.contains(&format!("preflight: PostgreSQL {major}.")), "{out}");
    if major == 17 {
        // No pg_dump of the machine's own (15) can dump 17.
        assert!(text.contains("copied with pg_dump 18"), "{out}");
    }
    assert!(writer.join().unwrap() > 0, "no write went through during the upgrade");
    let (s, d) = (src.sql(), dst.sql());
    let mut tables = vec!["ticket", "animal", "dog", "nothing", "events"];
    if major >= 12 {
        tables.push("computed");
    }
    for table in tables {
        let only = if table == "events" { "" } else { "only" };
        let q = format!("select t::text from {only} {table} t order by 1");
        assert_eq!(d.rows(&q), s.rows(&q), "{table}");
    }
    let seq = "select last_value from ticket_id_seq";
    assert_eq!(d.value(seq), s.value(seq));
    // Read without a search_path: the target's database has the source's
    // (public, kinds), under which the definition prints unqualified.
    let index = "set search_path = ''; select pg_get_indexdef('public.ticket_open'::regclass)";
    assert!(d.value(index).contains("kinds.state"), "{}", d.value(index));
    let settings = "select array_to_string(setconfig, ',') from pg_db_role_setting
                    where setdatabase = (select oid from pg_database where datname = current_database())";
    assert_eq!(d.value(settings), s.value(settings));
    // Every object of the source, compared by definition across the two
    // majors, is on the target.
    let verify = p.run(&["verify", "upgrade"]);
    assert!(verify.ok().contains("schema: every object equal"), "{verify}");
}

#[test]
fn upgrade_shapes_from_pg10_to_pg17() {
    upgrade_shapes(10, 17);
}

#[test]
fn upgrade_shapes_from_pg11_to_pg17() {
    upgrade_shapes(11, 17);
}

#[test]
fn upgrade_shapes_from_pg12_to_pg17() {
    upgrade_shapes(12, 17);
}

#[test]
fn upgrade_shapes_from_pg15_to_pg17() {
    upgrade_shapes(15, 17);
}

#[test]
fn upgrade_shapes_from_pg10_to_pg18() {
    upgrade_shapes(10, 18);
}

#[test]
fn upgrade_shapes_from_pg11_to_pg18() {
    upgrade_shapes(11, 18);
}

#[test]
fn upgrade_shapes_from_pg12_to_pg18() {
    upgrade_shapes(12, 18);
}

#[test]
fn upgrade_shapes_from_pg15_to_pg18() {
    upgrade_shapes(15, 18);
}

#[test]
fn upgrade_shapes_from_pg17_to_pg18() {
    upgrade_shapes(17, 18);
}

#[test]
fn upgrade_shapes_from_pg17_to_pg17() {
    upgrade_shapes(17, 17);
}

/// A source on a patched minor release that stores an option of its own
/// in every column (15.20's `pg_attver`, which no 17 or 18 accepts): the
/// option is left out and named, the column options the target takes stay,
/// and verify finds every object equal. On a 15 before 15.20 the source
/// has no such option and the test checks the rest.
#[test]
fn options_only_the_source_release_knows_are_left_out_pg15_to_pg18() {
    let src = TestDb::new(cluster(15), "attversrc");
    let dst = TestDb::new(cluster(18), "attverdst");
    src.sql().exec(
        "create table t (id int primary key, v text);
         alter table t alter column v set (n_distinct = 5);
         insert into t select g, 'v' || g from generate_series(1, 100) g;",
    );
    let minor: u32 =
        src.sql().value("select current_setting('server_version_num')").parse().unwrap();
    let attver = src
        .sql()
        .value("select count(*) from pg_attribute where attoptions::text like '%pg_attver=%'");
    if minor >= 150020 {
        assert_ne!(attver, "0", "15.20 is expected to store pg_attver in attoptions");
    }
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let out =
        p.run(&["upgrade", "--source", &src.dsn(), "--target", &dst.dsn(), "--cutover", "never"]);
    let text = out.ok();
    assert!(text.contains("copied with pg_dump 18 in"), "{out}");
    assert_eq!(text.contains("column option pg_attver"), attver != "0", "{out}");
    let options = "select attname::text, attoptions::text from pg_attribute
                   where attrelid = 'public.t'::regclass and attnum > 0 order by 1";
    assert_eq!(
        dst.sql().rows(options),
        vec![vec![Some("id".into()), None], vec![Some("v".into()), Some("{n_distinct=5}".into())]]
    );
    let verify = p.run(&["verify", "upgrade"]);
    assert!(verify.ok().contains("schema: every object equal"), "{verify}");
    p.run(&["teardown", "upgrade"]).ok();
}

#[test]
fn upgrade_shapes_from_pg12_to_pg12() {
    upgrade_shapes(12, 12);
}

/// A target whose tables hold rows (a mistyped --target pointing at a live
/// database) is refused before anything is written, naming the tables and
/// their rows; --overwrite-target replaces them; a rerun of its own run is
/// not refused (the rows are its copy's).
#[test]
fn a_target_holding_rows_is_refused_unless_overwrite_target_pg12_to_pg17() {
    let src = TestDb::new(cluster(12), "ovwsrc");
    let dst = TestDb::new(cluster(17), "ovwdst");
    finish(pgbench(&src, &["-i", "-q", "-s", "1"]).spawn().unwrap());
    finish(pgbench(&dst, &["-i", "-q", "-s", "1"]).spawn().unwrap());
    dst.sql().exec("update pgbench_branches set bbalance = 42");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let args = ["upgrade", "--source", &src.dsn(), "--target", &dst.dsn(), "--cutover", "never"];
    p.run(&args).fails_with(&[
        "the target's tables hold rows",
        "public.pgbench_accounts (100000 rows)",
        "public.pgbench_branches (1 row)",
        "--overwrite-target",
    ]);
    assert_eq!(p.run(&["db", "list", "--json"]).json(), serde_json::json!([]));
    assert_eq!(src.sql().value("select count(*) from pg_namespace where nspname = 'pgleap'"), "0");
    assert_eq!(dst.sql().value("select sum(bbalance) from pgbench_branches"), "42");

    let out = p.run(&[&args[..], &["--overwrite-target"]].concat());
    assert!(out.ok().contains("the sync is in place"), "{out}");
    assert_eq!(dst.sql().value("select sum(bbalance) from pgbench_branches"), "0");
    // The rerun resumes, and says so.
    let again = p.run(&args);
    assert!(again.ok().contains("resuming: upgrade \"upgrade\" was started before"), "{again}");
    p.run(&["stop"]).ok();
    p.run(&["teardown", "upgrade"]).ok();
}

/// Words that became keywords after the source's release: a column named
/// `system_user` (reserved since 16) needs a pg_dump of the target's major
/// or newer, which quotes it (preflight refuses with only an older one and
/// takes 18 when installed); a function argument named `json` (a keyword
/// since 17) is printed unquoted by the source itself, so no pg_dump can
/// restore it: preflight names it with the fix, and nothing is written.
#[test]
fn names_that_became_keywords_are_quoted_or_named_in_preflight_pg12_to_pg17() {
    let src = TestDb::new(cluster(12), "kwsrc");
    let dst = TestDb::new(cluster(17), "kwdst");
    src.sql().exec(
        "create table t (id int primary key, system_user text);
         create function f(json text) returns int language sql as 'select 1';",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let args = ["upgrade", "--source", &src.dsn(), "--target", &dst.dsn(), "--cutover", "never"];
    p.run(&args).fails_with(&[
        "arguments named by words that are keywords on PostgreSQL 17",
        "function public.f(text): argument json",
        "rename those arguments",
    ]);
    assert_eq!(p.run(&["db", "list", "--json"]).json(), serde_json::json!([]));
    src.sql().exec(
        "drop function f(text);
         create function f(doc text) returns int language sql as 'select 1';",
    );
    p.run(&[&args[..], &["--pg-bin", "/usr/lib/postgresql/15/bin"]].concat()).fails_with(&[
        "names tables or columns by words that are keywords on PostgreSQL 17",
        "column public.t.system_user",
        "postgresql-client-17",
    ]);
    assert_eq!(p.run(&["db", "list", "--json"]).json(), serde_json::json!([]));
    let out = p.run(&args);
    let text = out.ok();
    assert!(text.contains("copied with pg_dump 18"), "{out}");
    assert!(text.contains("only a pg_dump of 17 or newer quotes"), "{out}");
    let column = "select count(*) from pg_attribute where attname = 'system_user'
                  and attrelid = 'public.t'::regclass";
    assert_eq!(dst.sql().value(column), "1");
    p.run(&["stop"]).ok();
    p.run(&["teardown", "upgrade"]).ok();
}

/// `--cutover prompt` on a terminal keeps applying while it asks (the lag
/// stays low while nobody answers), shows the lag in the question, and
/// times the cutover from the answer.
#[test]
fn the_cutover_prompt_keeps_following_the_source_pg15_to_pg17() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let src = TestDb::new(cluster(15), "promptsrc");
    let dst = TestDb::new(cluster(17), "promptdst");
    finish(pgbench(&src, &["-i", "-q", "-s", "1"]).spawn().unwrap());
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let mut load = pgbench(&src, &["-n", "-c", "2", "-R", "50", "-T", "60"]).spawn().unwrap();
    // A terminal for the question: util-linux's script runs it on a pty.
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let line = [
        env!("CARGO_BIN_EXE_pgleap"),
        "upgrade",
        "--source",
        &src.dsn(),
        "--target",
        &dst.dsn(),
        "--cutover",
        "prompt",
    ]
    .iter()
    .map(|a| quote(a))
    .collect::<Vec<_>>()
    .join(" ");
    let mut script = std::process::Command::new("script");
    // A terminal of a person's width (a new pty has none).
    let line = format!("stty cols 120 rows 40; {line}");
    script.args(["-q", "-e", "-c", &line, "/dev/null"]);
    for (k, v) in p.command().get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }
    let mut child = script
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run script (util-linux)");
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 4096];
    while !seen.contains("[y/N]") {
        assert!(Instant::now() < deadline, "no question asked:\n{seen}");
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "upgrade ended without asking:\n{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("keys pending; the sync goes on while you decide"), "{seen}");
    std::thread::sleep(Duration::from_secs(6));
    let status = p.run(&["status", "upgrade", "--json"]).json_any();
    let lag = status["syncs"][0]["targets"][0]["lag_seconds"].as_f64().unwrap_or(99.0);
    child.stdin.as_mut().unwrap().write_all(b"y\n").unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let _ = child.wait();
    let _ = load.kill();
    let _ = load.wait();
    assert!(lag < 3.0, "the lag grew to {lag:.1} s while the question waited:\n{status}");
    assert!(rest.contains("writes were fenced for"), "{seen}{rest}");
    assert!(rest.contains("waiting for the answer"), "{seen}{rest}");
    // A person reads the commands' lines and the bars, not a log.
    let all = format!("{seen}{rest}");
    assert!(!all.contains(" INFO "), "log lines on the terminal:\n{all}");
    assert!(all.contains("verify") && all.contains(" parts ["), "no progress bars:\n{all}");
    p.run(&["teardown", "upgrade"]).ok();
}

/// `--json`: stdout is the report alone (the steps' progress on stderr),
/// each step with its time and share of the run, the cutover's fence steps
/// among them: what a DBA predicts a production move from.
#[test]
fn upgrade_reports_each_steps_share_as_json_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "jsonupsrc");
    let dst = TestDb::new(cluster(17), "jsonupdst");
    src.sql().exec(
        "create table t (id int primary key, v text);
         insert into t select g, 'v' || g from generate_series(1, 1000) g",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let out = p.run(&[
        "upgrade",
        "--source",
        &src.uri(),
        "--target",
        &dst.uri(),
        "--cutover",
        "auto",
        "--json",
    ]);
    let report = out.json();
    assert!(out.stderr.contains("verify: every table equal"), "{out}");
    let steps = report["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    for step in ["preflight", "initial copy and catch-up", "verify", "cutover"] {
        assert!(names.contains(&step), "{step} missing: {report}");
    }
    let shares: f64 = steps.iter().map(|s| s["share"].as_f64().unwrap()).sum();
    assert!((shares - 1.0).abs() < 0.01, "shares add up to {shares}: {report}");
    let inside: Vec<&str> = report["cutover"]["inside_fence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert!(inside.contains(&"drain"), "{report}");
    assert!(report["cutover"]["fence_ms"].as_i64().is_some(), "{report}");
    assert_eq!(report["preflight"]["tables"], 1, "{report}");
    p.run(&["teardown", "upgrade"]).ok();
}
