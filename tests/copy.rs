//! The initial copy (onetimecopy): fidelity of every built-in type across
//! majors, hostile identifiers, parallel ranges under load, resume, and the
//! exact handoff to change apply.

use std::time::{Duration, Instant};

use crate::support::{OWNER, Pgleap, Sql, TestDb, cluster, finish, pgbench, tool};

/// Every type family of the design brief, with the edge values that break
/// naive copies, plus NULLs in every column.
const FIDELITY_SCHEMA: &str = r#"
    create type mood as enum ('sad', 'ok', 'happy');
    create type pair as (x int, label text);
    create domain positive as int check (value > 0);
    create table numbers (
        id int primary key, n numeric, n2 numeric(20, 6), f4 real, f8 double precision,
        i2 smallint, i8 bigint, m money);
    insert into numbers values
        (1, 'NaN', 1.5, 'Infinity', '-Infinity', -32768, 9223372036854775807, '-92233720368547758.08'),
        (2, 123456789012345678901234567890.123456789, -0.000001, 'NaN', '-0', 32767, -9223372036854775808, '12.34'),
        (3, 0.1, 0, 1.17549435e-38, 2.2250738585072014e-308, 0, 0, 0),
        (4, null, null, null, null, null, null, null);
    create table times (
        id int primary key, tz timestamptz, ts timestamp, d date, t time, ttz timetz, iv interval);
    insert into times values
        (1, '2024-02-29 23:59:59.999999+05:30', '1999-12-31 23:59:59', '4713-01-01 BC', '24:00', '00:00:01+14', '-1 year 2 mons -3 days 04:05:06.789'),
        (2, 'infinity', '-infinity', 'infinity', '00:00', '12:00-12', '178000000 years'),
        (3, null, null, null, null, null, null);
    create table texts (
        id int primary key, t text, c char(5), vc varchar(10), b bytea, u uuid, x xml,
        j json, jb jsonb);
    insert into texts values
        (1, E'tab\there\nnewline \\ backslash ''quote'' "dq" ünïcödé 🎉', 'ab', 'x',
         '\x00ff5c0a0d', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '<a b="1">text &amp; more</a>',
         '{"b": 1, "a": [1, 2.50, null], "a": "dup"}', '{"b": 1, "a": [1, 2.50, null], "big": 1e400}'),
        (2, '', '', '', '\x', '00000000-0000-0000-0000-000000000000', '<x/>', 'null', '{}'),
        (3, null, null, null, null, null, null, null, null);
    create table toasted (id int primary key, t text, b bytea);
    insert into toasted select g, repeat(md5(g::text), 40000), decode(repeat(md5(g::text), 20000), 'hex')
        from generate_series(1, 3) g;
    create table structured (
        id int primary key, ia int[], ta text[], nested int[][], p pair, pa pair[],
        r int4range, tr tstzrange, nr numrange, e mood, dp positive);
    insert into structured values
        (1, '{1,NULL,3}', '{"a b","NULL",NULL,"c,d","e\"f"}', '{{1,2},{3,4}}', '(1,"x y")',
         array['(2,z)'::pair, null], '[1,10)', '[2024-01-01,infinity)', '(,1.5]', 'happy', 7),
        (2, '{}', '{}', '[0:1][0:0]={{5},{6}}', '(,)', '{}', 'empty', null, '[-1,1]', 'sad', 1),
        (3, null, null, null, null, null, null, null, null, null, null);
    create table network (
        id int primary key, i inet, c cidr, m macaddr, m8 macaddr8, bits bit(8), vb varbit);
    insert into network values
        (1, '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05', B'10101010', B''),
        (2, '::ffff:1.2.3.4', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', '00:00:00:00:00:00:00:00', B'00000000', B'1'),
        (3, null, null, null, null, null, null);
    create table shapes (
        id int primary key, p point, l line, s lseg, b box, pa path, po polygon, c circle);
    insert into shapes values
        (1, '(1.5,-2)', '{1,-1,0}', '[(0,0),(1,1)]', '(1,1),(0,0)', '[(0,0),(1,1),(2,0)]',
         '((0,0),(1,1),(1,0))', '<(0,0),2.5>'),
        (2, '(1e300,-1e-300)', '{0,1,-3}', '[(1,2),(3,4)]', '(0,0),(0,0)', '((0,0),(1,1))',
         '((0,0))', '<(1,1),0>'),
        (3, null, null, null, null, null, null, null);
    create table with_generated (id int primary key, a int, doubled int generated always as (a * 2) stored);
    insert into with_generated (id, a) values (1, 21), (2, null);
    create table dropped (id int primary key, gone text, kept text);
    insert into dropped values (1, 'x', 'kept');
    alter table dropped drop column gone;
    create table ident (id int generated always as identity primary key, v text);
    insert into ident (v) values ('a'), ('b');
    create table "select" ("from" int primary key, "where" text);
    create table "Mixed Case" ("Id" int primary key, "Value" text);
    create table "with""quote" (id int primary key, "a""b" text);
    create table "with space" ("an id" int primary key);
    create table "ünïcode" ("ключ" int primary key, "値" text);
    create table "a_63_byte_name_that_is_exactly_as_long_as_postgres_allows_xxxxx" (id int primary key);
    insert into "select" values (1, 'w');
    insert into "Mixed Case" values (1, 'v');
    insert into "with""quote" values (1, 'q');
    insert into "with space" values (1);
    insert into "ünïcode" values (1, 'ü');
    insert into "a_63_byte_name_that_is_exactly_as_long_as_postgres_allows_xxxxx" values (1);
    create table events (id int, at date, v text, primary key (id, at)) partition by range (at);
    create table events_a partition of events for values from ('2000-01-01') to ('2025-01-01');
    create table events_b partition of events for values from ('2025-01-01') to ('2050-01-01');
    insert into events select g, date '2000-01-01' + g * 5, 'e' || g from generate_series(1, 2000) g;
"#;

const FIDELITY_TABLES: &[(&str, &str)] = &[
    ("numbers", "id"),
    ("times", "id"),
    ("texts", "id"),
    ("toasted", "id"),
    ("structured", "id"),
    ("network", "id"),
    ("shapes", "id"),
    ("with_generated", "id"),
    ("dropped", "id"),
    ("ident", "id"),
    ("\"select\"", "1"),
    ("\"Mixed Case\"", "1"),
    ("\"with\"\"quote\"", "1"),
    ("\"with space\"", "1"),
    ("\"ünïcode\"", "1"),
    ("\"a_63_byte_name_that_is_exactly_as_long_as_postgres_allows_xxxxx\"", "1"),
    ("events", "id, at"),
];

/// Every row of every table, as text, must be identical. The text form is
/// compared under pinned session settings (see `Sql`), so it is the bytes
/// a client sees.
fn assert_same(src: &Sql, dst: &Sql, tables: &[(&str, &str)]) {
    for (table, order) in tables {
        let q = format!("select * from {table} order by {order}");
        let (a, b) = (src.rows(&q), dst.rows(&q));
        assert!(!a.is_empty(), "{table} is empty on the source: the test proves nothing");
        assert_eq!(a, b, "{table} differs");
    }
}

/// The target's schema from the source's, as the Bucardo recipe does.
fn copy_schema(src: &TestDb, dst: &TestDb) {
    let mut dump = tool("pg_dump")
        .args(["--schema-only", "--no-owner", "--no-privileges", "-h", "127.0.0.1", "-U", OWNER])
        .args(["-p", &src.cluster.port.to_string(), &src.name])
        .env("PGPASSWORD", &src.cluster.owner_password)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let restore = tool("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", OWNER])
        .args(["-p", &dst.cluster.port.to_string(), "-d", &dst.name])
        .env("PGPASSWORD", &dst.cluster.owner_password)
        .stdin(dump.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(dump.wait().unwrap().success());
    assert!(restore.status.success(), "{}", String::from_utf8_lossy(&restore.stderr));
}

fn declare(p: &Pgleap, src: &TestDb, dst: &TestDb, onetimecopy: &str, extra: &[&str]) {
    let mut rg = vec!["--all-tables", "--all-sequences"];
    rg.extend(extra);
    p.declare(src, dst, &rg);
    p.add_sync(&["--onetimecopy", onetimecopy, "--autokick", "off"]);
}

fn fidelity(source_major: u32) {
    let src = TestDb::new(cluster(source_major), "fidsrc");
    let dst = TestDb::new(cluster(17), "fiddst");
    src.sql().exec(FIDELITY_SCHEMA);
    copy_schema(&src, &dst);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    declare(&p, &src, &dst, "always", &[]);
    // Changes after capture started and before the copy: in both, harmlessly.
    src.sql().exec("update numbers set n = 42 where id = 3; delete from texts where id = 2");
    p.run(&["kick", "s", "--wait", "60", "--jobs", "2"]).ok();
    // Changes after the copy arrive by change apply, same fidelity.
    src.sql().exec(
        "insert into numbers select id + 10, n, n2, f4, f8, i2, i8, m from numbers;
         insert into structured select id + 10, ia, ta, nested, p, pa, r, tr, nr, e, dp from structured;
         update texts set t = t || '!' where id = 1;",
    );
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let (s, d) = (src.sql(), dst.sql());
    assert_same(&s, &d, FIDELITY_TABLES);
    assert_eq!(d.value("select doubled from with_generated where id = 1"), "42");
    // verify agrees: equal data on different majors reports no difference.
    let report = p.run(&["verify", "s", "--json"]).json();
    let tables = report[0]["tables"].as_array().unwrap();
    assert_eq!(tables.len(), FIDELITY_TABLES.len());
    assert!(tables.iter().all(|t| t["equal"] == true), "{report}");
    assert_eq!(
        s.value("select last_value from ident_id_seq"),
        d.value("select last_value from ident_id_seq")
    );
    p.run(&["teardown", "s"]).ok();
}

#[test]
fn every_type_round_trips_pg12_to_pg17() {
    fidelity(12);
}

#[test]
fn every_type_round_trips_pg15_to_pg17() {
    fidelity(15);
}

const PGBENCH_TABLES: &[(&str, &str)] =
    &[("pgbench_accounts", "aid"), ("pgbench_branches", "bid"), ("pgbench_tellers", "tid")];

/// A copy taken while pgbench writes, split into key ranges, then change
/// sync: the target ends equal.
#[test]
fn copy_under_load_then_sync_pg12_to_pg17() {
    let src = TestDb::new(cluster(12), "loadcopysrc");
    let dst = TestDb::new(cluster(17), "loadcopydst");
    finish(pgbench(&src, &["-i", "-q", "-s", "3"]).spawn().unwrap());
    src.sql().exec("analyze");
    copy_schema(&src, &dst);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    declare(&p, &src, &dst, "always", &["--exclude-table", "public.pgbench_history"]);
    let load = pgbench(&src, &["-n", "-c", "2", "-T", "5"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    p.run(&["kick", "s", "--jobs", "2"]).ok();
    finish(load);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let (s, d) = (src.sql(), dst.sql());
    assert_same(&s, &d, PGBENCH_TABLES);
    let ranges =
        d.value("select count(*) from pgleap.copy_units where table_name like '%accounts%'");
    assert!(ranges.parse::<i32>().unwrap() > 1, "pgbench_accounts was not split: {ranges}");
    p.run(&["teardown", "s"]).ok();
}

/// A copy killed half-way resumes with the units not done, and ends equal.
#[test]
fn an_interrupted_copy_resumes_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "resumesrc");
    let dst = TestDb::new(cluster(17), "resumedst");
    finish(pgbench(&src, &["-i", "-q", "-s", "5"]).spawn().unwrap());
    src.sql().exec("analyze");
    copy_schema(&src, &dst);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    declare(&p, &src, &dst, "always", &["--exclude-table", "public.pgbench_history"]);
    let d = dst.sql();
    let mut first = p.command().args(["kick", "s", "--jobs", "2"]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = "select count(*) filter (where done) from pgleap.copy_units";
    loop {
        let units = d.rows(
            "select 1 from pg_tables where schemaname = 'pgleap' and tablename = 'copy_units'",
        );
        if !units.is_empty() && d.value(done) != "0" {
            break;
        }
        assert!(Instant::now() < deadline, "the copy never finished a unit");
        std::thread::sleep(Duration::from_millis(10));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let total = d.value("select count(*) from pgleap.copy_units");
    let done_before = d.value(done);
    assert_ne!(done_before, total, "the copy finished before it could be interrupted");
    src.sql().exec("update pgbench_accounts set abalance = abalance - 1 where aid % 1000 = 0");
    p.run(&["kick", "s", "--wait", "120", "--jobs", "2"]).ok();
    assert_same(&src.sql(), &d, PGBENCH_TABLES);
    let snapshots = d.value("select count(distinct snapshot) from pgleap.copy_units");
    assert_eq!(snapshots, "2", "units done before the interruption were copied again");
    p.run(&["teardown", "s"]).ok();
}

/// if-empty copies only the tables empty on the target; a table the user
/// loaded is left alone, and every change since capture started reaches it.
#[test]
fn if_empty_copies_only_empty_tables_pg12_to_pg17() {
    let src = TestDb::new(cluster(12), "ifemptysrc");
    let dst = TestDb::new(cluster(17), "ifemptydst");
    let schema = "create table loaded (id int primary key, v text);
                  create table empty (id int primary key, v text);";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    src.sql().exec(
        "insert into loaded select g, 'l' || g from generate_series(1, 100) g;
         insert into empty select g, 'e' || g from generate_series(1, 100) g;",
    );
    dst.sql().exec("insert into loaded select g, 'l' || g from generate_series(1, 100) g");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    declare(&p, &src, &dst, "if-empty", &[]);
    src.sql()
        .exec("update loaded set v = 'changed' where id <= 10; delete from loaded where id = 50");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let (s, d) = (src.sql(), dst.sql());
    assert_same(&s, &d, &[("loaded", "id"), ("empty", "id")]);
    assert_eq!(d.value("select count(*) from pgleap.copy_units where snapshot is null"), "1");
    p.run(&["teardown", "s"]).ok();
}

/// Large tables of any shape are split (a uuid key and no key at all: by
/// ranges of blocks), and a copy killed half-way ends equal when resumed:
/// a keyless table copied in part is copied again whole, under one
/// snapshot, so its rows are neither lost nor doubled.
#[test]
fn uuid_keyed_and_keyless_tables_are_split_and_resume_exactly_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "splitsrc");
    let dst = TestDb::new(cluster(17), "splitdst");
    let schema = "create table doc (id uuid primary key, body text);
                  create table log (at int, line text);";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    src.sql().exec(
        "insert into doc select md5(g::text)::uuid, repeat('b', 100) from generate_series(1, 250000) g;
         insert into log select g % 1000, repeat('l', 100) from generate_series(1, 1200000) g;
         insert into log select 1, 'twin' from generate_series(1, 3);
         analyze;",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    declare(&p, &src, &dst, "always", &[]);
    let d = dst.sql();
    let mut first = p.command().args(["kick", "s", "--jobs", "2"]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done_log = "select count(*) filter (where done) from pgleap.copy_units
                    where table_name like '%log%'";
    loop {
        let units = d.rows(
            "select 1 from pg_tables where schemaname = 'pgleap' and tablename = 'copy_units'",
        );
        if !units.is_empty() && d.value(done_log) != "0" {
            break;
        }
        assert!(Instant::now() < deadline, "the copy never finished a part of log");
        std::thread::sleep(Duration::from_millis(5));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let parts = |table: &str| {
        d.value(&format!(
            "select count(*) from pgleap.copy_units where table_name like '%{table}%'"
        ))
        .parse::<i32>()
        .unwrap()
    };
    assert!(parts("doc") >= 2 && parts("log") >= 2, "not split: {} {}", parts("doc"), parts("log"));
    // Interrupted with log copied in part (its parts take about a second
    // each): the case where parts under two snapshots would disagree.
    let done = d.value(done_log).parse::<i32>().unwrap();
    assert!(done > 0 && done < parts("log"), "log not in part: {done} of {}", parts("log"));
    src.sql().exec("insert into log values (2, 'after'); delete from doc where body is null");
    let out = p.run(&["kick", "s", "--wait", "120", "--jobs", "2"]);
    out.ok();
    // Off a terminal, the progress is logged with the rate and the phases.
    for expected in [
        "keyless table copied in part before an interruption",
        "initial copy: data: ",
        " MB/s",
        "initial copy: indexes and key constraints",
        "initial copy: analyze",
    ] {
        assert!(out.stderr.contains(expected), "missing {expected:?}:\n{out}");
    }
    let (s, d) = (src.sql(), dst.sql());
    for q in [
        "select count(*), md5(string_agg(id::text || body, ',' order by id)) from doc",
        "select count(*), md5(string_agg(at || line, ',' order by at, line)) from log",
    ] {
        assert_eq!(d.rows(q), s.rows(q), "{q}");
    }
    let snapshots = "select count(distinct snapshot) from pgleap.copy_units
                     where table_name like '%log%'";
    assert_eq!(d.value(snapshots), "1", "log's parts were copied under different snapshots");
}

/// A table copied whole is emptied and loaded with COPY FREEZE in one
/// transaction: on a 14+ target its pages are all-visible right after the
/// copy (index-only scans work, vacuum has nothing to freeze). A superuser
/// target keeps its foreign keys during the sync (replica mode keeps them
/// from firing), and a table one of them references cannot be truncated:
/// it is loaded the plain way, and still arrives whole. The superuser case,
/// named: the target is written as `postgres`.
#[test]
fn whole_tables_are_loaded_frozen_superuser_target_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "freezesrc");
    let dst = TestDb::new(cluster(17), "freezedst");
    src.sql().exec(
        "create table plain (id int primary key, v text);
         create table referenced (id int primary key, v text);
         create table referencing (id int primary key, rid int references referenced);
         insert into plain select g, repeat('x', 100) from generate_series(1, 5000) g;
         insert into referenced select g, repeat('y', 100) from generate_series(1, 5000) g;
         insert into referencing select g, g from generate_series(1, 5000) g;",
    );
    copy_schema(&src, &dst);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let superuser_dsn = format!(
        "host={} port={} dbname={} user=postgres",
        dst.cluster.socket_dir.display(),
        dst.cluster.port,
        dst.name
    );
    p.run(&["db", "add", "src", "--dsn", &src.dsn()]).ok();
    p.run(&["db", "add", "dst", "--dsn", &superuser_dsn]).ok();
    p.run(&["relgroup", "add", "rg", "--db", "src", "--all-tables"]).ok();
    p.run(&["dbgroup", "add", "g", "src:source", "dst:target"]).ok();
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let (s, d) = (src.sql(), dst.sql());
    assert_same(&s, &d, &[("plain", "id"), ("referenced", "id"), ("referencing", "id")]);
    let fks = "select count(*) from pg_constraint where contype = 'f'";
    assert_eq!(d.value(fks), "1", "the superuser target's foreign key was set aside");
    // ANALYZE after the copy reads relallvisible from the visibility map
    // (the load may leave empty pages at the end, which are not counted).
    let visible =
        |t: &str| d.value(&format!("select relallvisible > 0 from pg_class where relname = '{t}'"));
    assert_eq!(visible("plain"), "t", "plain was not loaded frozen");
    assert_eq!(visible("referencing"), "t", "referencing was not loaded frozen");
    assert_eq!(visible("referenced"), "f", "a referenced table cannot have been truncated");
    p.run(&["teardown", "s"]).ok();
}

/// Databases that are not UTF8 move byte for byte to a target of their
/// encoding, through the initial copy and the sync: a SQL_ASCII database
/// holding a byte no UTF8 accepts (café written as 0xe9), LATIN1, WIN1252
/// and EUC_JP, values larger than a slice too. A target of another
/// encoding is refused before anything is written.
#[test]
fn every_encoding_moves_byte_for_byte_to_a_target_of_its_encoding_pg15_to_pg17() {
    for (encoding, bytes) in [
        ("SQL_ASCII", "636166e9"),
        ("LATIN1", "636166e9"),
        ("WIN1252", "636166e9"),
        ("EUC_JP", "a4a2a4a4"),
    ] {
        let label = encoding.to_lowercase().replace('_', "");
        let src = TestDb::with_encoding(cluster(15), &format!("{label}src"), encoding);
        let dst = TestDb::with_encoding(cluster(17), &format!("{label}dst"), encoding);
        let text = format!("convert_from('\\x{bytes}'::bytea, '{encoding}')");
        src.sql().exec(&format!(
            "create table t (id int primary key, v text);
             insert into t select g, {text} || g from generate_series(1, 50) g;
             insert into t values (52, repeat({text}, 5000));"
        ));
        // 20 kB values move in slices of 16 kB, in the database's bytes.
        let p =
            Pgleap::for_clusters(&[src.cluster, dst.cluster]).env("PGLEAP_SLICE_BYTES", "16384");
        let args =
            ["upgrade", "--source", &src.dsn(), "--target", &dst.dsn(), "--cutover", "never"];
        p.run(&args).ok();
        src.sql().exec(&format!(
            "update t set v = v || {text} where id % 2 = 0; insert into t values (51, {text});
             insert into t values (53, repeat({text}, 6000));"
        ));
        p.run(&["kick", "upgrade", "--wait", "60"]).ok();
        let q = "select string_agg(encode(convert_to(v, current_setting('server_encoding')),
                                          'hex'), ',' order by id) from t";
        assert_eq!(dst.sql().value(q), src.sql().value(q), "{encoding}");
        assert!(src.sql().value(q).contains(bytes), "{encoding}");
        p.run(&["stop"]).ok();
        p.run(&["teardown", "upgrade"]).ok();
    }
    let src = TestDb::with_encoding(cluster(15), "latin1src", "LATIN1");
    let dst = TestDb::new(cluster(17), "utf8dst");
    src.sql().exec("create table t (id int primary key)");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.run(&["upgrade", "--source", &src.dsn(), "--target", &dst.dsn()]).fails_with(&[
        "is encoded LATIN1",
        "UTF8",
        "ENCODING 'LATIN1'",
    ]);
    assert_eq!(p.run(&["db", "list", "--json"]).json(), serde_json::json!([]));
}

/// Values larger than the slice size (here 64 kB, set for the test) move
/// in slices, in the initial copy and in batches: bytea, multibyte text,
/// varchar, in a keyed table (a NOT NULL one among them), a partitioned
/// one and a keyless one, beside small values and NULLs; the target ends
/// with every value equal, verify says so (comparing large values by
/// their md5), and a cutover drains one more.
#[test]
fn large_values_move_in_slices_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "slicessrc");
    let dst = TestDb::new(cluster(17), "slicesdst");
    // md5 decoded: bytes that do not compress, so stored as they are.
    // The partitions' first rows share a ctid, one large and one not.
    let bytes = |kb: u32, seed: u32| {
        format!(
            "(select decode(string_agg(md5(({seed} * 100000 + g)::text), ''), 'hex')
              from generate_series(1, {kb} * 64) g)"
        )
    };
    src.sql().exec(&format!(
        "create table docs (id int primary key, body bytea not null, note text,
                            title varchar(1000000), small text);
         create table parted (id int, v bytea, primary key (id)) partition by range (id);
         create table parted_1 partition of parted for values from (0) to (10);
         create table parted_2 partition of parted for values from (10) to (20);
         create table heap (v text);
         insert into docs values
             (1, {b1}, repeat('é☃ü', 100000), repeat('t', 200000), 'one'),
             (2, '\\x0102', 'short', null, 'two'),
             (3, {b3}, null, 'short title', null);
         insert into parted values (1, {b4}), (12, '\\xff'), (11, {b5});
         insert into heap values (repeat('ß', 90000)), ('small');",
        b1 = bytes(300, 1),
        b3 = bytes(100, 3),
        b4 = bytes(200, 4),
        b5 = bytes(80, 5),
    ));
    copy_schema(&src, &dst);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]).env("PGLEAP_SLICE_BYTES", "65536");
    declare(&p, &src, &dst, "always", &[]);
    let copied = p.run(&["kick", "s", "--wait", "120"]);
    copied.ok();
    assert!(copied.stderr.contains("large values moved in slices"), "{copied}");
    let tables = [("docs", "id"), ("parted", "id"), ("heap", "v")];
    assert_same(&src.sql(), &dst.sql(), &tables);

    src.sql().exec(&format!(
        "update docs set body = body || '\\x00'::bytea, note = note || 'ß' where id = 1;
         update docs set note = repeat('ñ', 70000), title = repeat('x', 70000) where id = 2;
         insert into docs values (4, {b6}, repeat('z', 65537), null, 'four');
         delete from docs where id = 3;
         update parted set id = 13 where id = 11;
         insert into heap values (repeat('q', 100000));",
        b6 = bytes(150, 6),
    ));
    let applied = p.run(&["kick", "s", "--wait", "120"]);
    assert!(applied.stderr.contains("large values moved in slices"), "{applied}");
    assert_same(&src.sql(), &dst.sql(), &tables);
    let verified = p.run(&["verify", "s"]);
    assert!(verified.ok().contains("equal"), "{verified}");
    // Drained inside the fence, where each applied row is compared with
    // the source's (large values by their md5).
    src.sql()
        .exec("update docs set body = body || '\\x01'::bytea, note = note || 'ø' where id = 4");
    p.run(&["cutover", "s"]).ok();
    assert_same(&src.sql(), &dst.sql(), &tables);
    p.run(&["teardown", "s"]).ok();
}
