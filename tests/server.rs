//! A whole server moved: `pgleap upgrade --all-databases` finds the
//! databases, creates them and the roles they need on the target, moves
//! them all under writes and cuts them over in one fence.

use crate::support::compare::{objects, rows};
use crate::support::{
    Cluster, OWNER, Outcome, Pgleap, Sql, TestDb, killed_at, private_cluster, writes_until_fenced,
};

fn server_uri(c: &Cluster) -> String {
    format!("postgresql://{OWNER}@127.0.0.1:{}/postgres", c.port)
}

/// `pgleap upgrade` of server `src` to server `dst`, then `more`.
fn move_server(p: &Pgleap, src: &Cluster, dst: &Cluster, more: &[&str]) -> Outcome {
    let (from, to) = (server_uri(src), server_uri(dst));
    p.run(&[&["upgrade", "--source", &from, "--target", &to][..], more].concat())
}

/// Roles as a DBA compares them between servers: attributes a table owner
/// can give, settings, memberships (not LOGIN: created NOLOGIN on purpose).
fn roles(sql: &Sql, names: &[&str]) -> Vec<Vec<Option<String>>> {
    let list = names.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ");
    sql.rows(&format!(
        "select r.rolname::text, r.rolinherit::text, r.rolconnlimit::text,
                coalesce(r.rolconfig::text, ''),
                coalesce((select string_agg(g.rolname, ',' order by g.rolname)
                          from pg_auth_members m join pg_roles g on g.oid = m.roleid
                          where m.member = r.oid and g.rolname in ({list})), '')
         from pg_roles r where r.rolname in ({list}) order by 1"
    ))
}

/// Three application databases sharing roles: a partitioned table in one,
/// a table without a key in another, large objects in the third.
fn three_databases(src: &'static Cluster) -> [TestDb; 3] {
    let admin = src.superuser("postgres");
    admin.exec(
        "create role app_read nologin;
         create role app_write nologin connection limit 7 in role app_read;
         create role alice login password 'not-copied' in role app_write;
         alter role app_write set statement_timeout = '5s'",
    );
    let shop = TestDb::new(src, "shop");
    let logs = TestDb::new(src, "logs");
    let files = TestDb::new(src, "files");
    shop.sql().exec(
        "create table orders (id bigint, at date, total numeric(10,2), primary key (id, at))
           partition by range (at);
         create table orders_2025 partition of orders
           for values from ('2025-01-01') to ('2026-01-01');
         create table orders_2026 partition of orders
           for values from ('2026-01-01') to ('2027-01-01');
         create table customers (id serial primary key, name text not null);
         insert into customers (name) select 'c' || g from generate_series(1, 500) g;
         insert into orders select g, date '2025-06-01' + (g % 300), g * 1.5
           from generate_series(1, 3000) g;
         grant select on all tables in schema public to app_read;
         grant insert, update on orders to app_write",
    );
    logs.sql().exec(
        "create table events (at timestamptz default now(), level text, message text);
         insert into events (level, message) select 'info', 'boot ' || g
           from generate_series(1, 2000) g;
         grant insert on events to app_write;
         grant select on events to app_read",
    );
    files.sql().exec(
        "create table documents (id int primary key, body oid);
         insert into documents
           select g, lo_from_bytea(0, convert_to(repeat('page ' || g, 200), 'UTF8'))
           from generate_series(1, 20) g;
         grant select on documents to app_read",
    );
    [shop, logs, files]
}

#[test]
fn a_server_of_three_databases_moves_in_one_cutover_pg12_to_pg17() {
    let (src, dst) = (private_cluster(12), private_cluster(17));
    let [shop, logs, files] = three_databases(src);
    let p = Pgleap::for_clusters(&[src, dst]);
    let writers = [
        writes_until_fenced(shop.sql(), |i| {
            format!(
                "insert into orders values ({}, '2026-02-01', 1); \
                 update customers set name = 'w{i}' where id = {};",
                100_000 + i,
                i % 500 + 1
            )
        }),
        writes_until_fenced(logs.sql(), |i| {
            format!("insert into events (level, message) values ('warn', 'live {i}');")
        }),
        writes_until_fenced(files.sql(), |i| {
            format!("insert into documents values ({}, lo_from_bytea(0, 'new {i}'));", 1000 + i)
        }),
    ];
    let out = move_server(&p, src, dst, &["--all-databases", "--cutover", "auto", "--jobs", "2"]);
    println!("{out}");
    let text = out.ok();
    for expected in [
        "left out: postgres: the maintenance database",
        &format!("created database {} on the target", shop.name),
        &format!("created database {} on the target", files.name),
        "created role app_write on the target (NOLOGIN, no password), with its settings \
         statement_timeout=5s",
        "granted role app_write to alice on the target",
        "roles to give a password and LOGIN on the target: alice",
        "write downtime of the server: ",
        "(3 databases in one fence)",
        "fence: fence (taking every database's tables' locks)",
    ] {
        assert!(text.contains(expected), "missing {expected:?}:\n{out}");
    }
    for w in writers {
        assert!(w.join().unwrap() > 0, "no write went through during the move");
    }
    for db in [&shop, &logs, &files] {
        let (s, d) = (db.sql(), dst.owner(&db.name));
        assert_eq!(rows(&s), rows(&d), "{}: rows differ", db.name);
        assert_eq!(objects(&s), objects(&d), "{}: objects differ", db.name);
    }
    let lo = "select oid::text, md5(lo_get(oid)) from pg_largeobject_metadata order by 1";
    assert_eq!(files.sql().rows(lo), dst.owner(&files.name).rows(lo));
    assert!(shop.sql().try_exec("insert into customers (name) values ('late')").is_err());
    assert!(logs.sql().try_exec("insert into events (level) values ('late')").is_err());
    let names = ["alice", "app_read", "app_write"];
    assert_eq!(
        roles(&src.superuser("postgres"), &names),
        roles(&dst.superuser("postgres"), &names)
    );
    // Status names the roles still to be given a password, per database.
    let status = p.run(&["status"]);
    let wanted = format!(
        "upgrade.{} -> upgrade.{}_target: roles to give a password and LOGIN: alice",
        shop.name, shop.name
    );
    assert!(status.stdout.contains(&wanted), "{status}");
    let alice_login =
        dst.superuser("postgres").value("select rolcanlogin from pg_roles where rolname = 'alice'");
    assert_eq!(alice_login, "f", "a role was made to log in without a password");
    // Every sync cut over: a rerun says so.
    move_server(&p, src, dst, &["--all-databases", "--cutover", "auto"])
        .fails_with(&["was already cut over (3 of 3 databases)"]);
}

#[test]
fn a_server_move_refuses_up_front_and_writes_nothing_pg12_to_pg17() {
    let (src, dst) = (private_cluster(12), private_cluster(17));
    let [shop, logs, files] = three_databases(src);
    // The target already has one of the databases, holding rows.
    dst.superuser("postgres").exec(&format!("create database {} owner {OWNER}", logs.name));
    dst.owner(&logs.name).exec(
        "create table events (at timestamptz default now(), level text, message text);
         insert into events (level) values ('precious')",
    );
    // And one table of the source is not the role's.
    src.superuser(&files.name).exec("create table audit (id int primary key)");
    // And the role may not create the roles the databases need there.
    dst.superuser("postgres").exec(&format!("alter role {OWNER} nocreaterole"));
    let p = Pgleap::for_clusters(&[src, dst]);
    let out = move_server(&p, src, dst, &["--all-databases", "--cutover", "auto"]);
    out.fails_with(&[
        "preflight of the server",
        &format!("database \"{}\": the target's tables hold rows", logs.name),
        &format!("database \"{}\": the role does not own \"public\".\"audit\"", files.name),
        "the target lacks role(s) alice, app_read, app_write the databases need, and the role \
         may not create roles (CREATEROLE)",
        "nothing was created on either server",
    ]);
    let missing = move_server(&p, src, dst, &["--databases", &format!("{},nope", shop.name)]);
    missing.fails_with(&["the source server has no database \"nope\""]);
    // Nothing written: no database, no role, no capture, no catalog entry.
    let target_dbs = dst.superuser("postgres").value(&format!(
        "select count(*) from pg_database where datname in ('{}', '{}')",
        shop.name, files.name
    ));
    assert_eq!(target_dbs, "0");
    let target_roles =
        dst.superuser("postgres").value("select count(*) from pg_roles where rolname like 'app_%'");
    assert_eq!(target_roles, "0");
    for db in [&shop, &logs, &files] {
        let pgleap = db.sql().value("select count(*) from pg_namespace where nspname = 'pgleap'");
        assert_eq!(pgleap, "0", "{}", db.name);
    }
    assert_eq!(p.run(&["sync", "list", "--json"]).json(), serde_json::json!([]));
}

/// Killed in its first database's copy, then after that database was
/// prepared, then inside its fence (every source fenced): each rerun
/// resumes, the last one ends with every database equal.
#[test]
fn a_server_move_killed_in_its_copy_and_fence_resumes_every_database_pg12_to_pg17() {
    let (src, dst) = (private_cluster(12), private_cluster(17));
    let [shop, logs, files] = three_databases(src);
    let p = Pgleap::for_clusters(&[src, dst]);
    let args = [
        "upgrade",
        "--source",
        &server_uri(src),
        "--target",
        &server_uri(dst),
        "--all-databases",
        "--cutover",
        "auto",
        "--login-roles",
    ];
    killed_at(&p, "copy-unit-done", &args);
    files.sql().exec("update documents set body = null where id = 3");
    killed_at(&p, "server-database-prepared", &args);
    shop.sql().exec("update customers set name = 'after the kill' where id <= 50");
    logs.sql().exec("delete from events where message like 'boot 1%'");
    // Resumed without a cutover: the daemon follows every database, and
    // `ready` answers for the server.
    let resumed = move_server(&p, src, dst, &["--all-databases", "--cutover", "never"]);
    assert!(resumed.ok().contains("every database's sync is in place"), "{resumed}");
    // Created with LOGIN, as asked: status has no role left to enable.
    let status = p.run(&["status"]);
    assert!(!status.stdout.contains("roles to give a password"), "{status}");
    let login =
        dst.superuser("postgres").value("select rolcanlogin from pg_roles where rolname = 'alice'");
    assert_eq!(login, "t");
    let ready = p.run(&["ready", "upgrade", "--max-lag", "30"]);
    let syncs = format!("upgrade.{}, upgrade.{}, upgrade.{}", files.name, logs.name, shop.name);
    assert!(
        ready
            .ok()
            .contains(&format!("every database of \"upgrade\" is ready to cut over ({syncs})")),
        "{ready}"
    );
    killed_at(&p, "cutover-fenced", &args);
    // Left fenced by the kill: the rerun undoes the fence, then cuts over.
    assert!(shop.sql().try_exec("insert into customers (name) values ('x')").is_err());
    let out = p.run(&args);
    let text = out.ok();
    assert!(text.contains("(3 databases in one fence)"), "{out}");
    assert!(!text.contains("created database"), "the rerun started over:\n{out}");
    p.run(&["stop"]).ok();
    for db in [&shop, &logs, &files] {
        let (s, d) = (db.sql(), dst.owner(&db.name));
        assert_eq!(rows(&s), rows(&d), "{}: rows differ", db.name);
        assert_eq!(objects(&s), objects(&d), "{}: objects differ", db.name);
    }
    // The server move's name tears down every database's sync.
    let teardown = p.run(&["teardown", "upgrade"]);
    assert_eq!(teardown.ok().matches("removed sync \"upgrade.").count(), 3, "{teardown}");
    assert_eq!(p.run(&["sync", "list", "--json"]).json(), serde_json::json!([]));
}

/// One PgBouncer in front of three databases, entries named like them:
/// paused once, each entry pointed at its new database inside the one
/// fence, resumed; then `rollback` of the move sends them all back the
/// same way. Clients writing through it see pauses, never an error, and
/// every write they were acknowledged is where the application is.
#[test]
fn a_pooler_in_front_of_three_databases_is_switched_once_and_back_pg12_to_pg17() {
    use crate::support::pooler::{APP_PASSWORD, APP_USER, Bouncer, Probe};
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};
    let (src, dst) = (private_cluster(12), private_cluster(17));
    for c in [src, dst] {
        c.superuser("postgres")
            .exec(&format!("create role {APP_USER} login password '{APP_PASSWORD}'"));
    }
    let dbs: Vec<TestDb> = ["north", "south", "west"].iter().map(|l| TestDb::new(src, l)).collect();
    for db in &dbs {
        db.sql().exec(&format!(
            "create table probe (id bigserial primary key, client int not null);
             grant select, insert on probe to {APP_USER};
             grant usage on sequence probe_id_seq to {APP_USER}"
        ));
    }
    let bouncer = Bouncer::start_for(&dbs.iter().collect::<Vec<_>>());
    let probes: Vec<Probe> = dbs
        .iter()
        .enumerate()
        .map(|(i, db)| {
            Probe::start(bouncer.port, &db.name, i as i32, Some(Duration::from_millis(5)))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let p = Pgleap::for_clusters(&[src, dst]);
    let admin = bouncer.admin();
    let started = Instant::now();
    let out = move_server(
        &p,
        src,
        dst,
        &["--all-databases", "--cutover", "auto", "--rollback", "--pgbouncer", &admin],
    );
    println!("{out}");
    assert!(out.ok().contains("the poolers held the clients' queries for"), "{out}");
    std::thread::sleep(Duration::from_secs(1));
    let entry = |db: &TestDb, port: u16| {
        format!("{} = host=127.0.0.1 port={port} dbname={}", db.name, db.name)
    };
    let ini = std::fs::read_to_string(&bouncer.ini).unwrap();
    for db in &dbs {
        assert!(ini.contains(&entry(db, dst.port)), "{}: {ini}", db.name);
        let moved = dst.owner(&db.name).value("select count(*) from probe");
        assert_ne!(moved, "0", "{}: no write reached the new server", db.name);
    }
    let back_at = Instant::now();
    let back = p.run(&["rollback", "upgrade", "--pgbouncer", &admin]);
    println!("{back}");
    assert!(back.ok().contains("(3 databases in one fence)"), "{back}");
    std::thread::sleep(Duration::from_secs(1));
    let logs: Vec<_> = probes.into_iter().map(Probe::finish).collect();
    p.run(&["stop"]).ok();
    let ini = std::fs::read_to_string(&bouncer.ini).unwrap();
    for (db, log) in dbs.iter().zip(&logs) {
        assert!(log.errors.is_empty(), "{}: the client saw errors: {:?}", db.name, log.errors);
        for (what, from, to) in
            [("cutover", started, back_at), ("rollback", back_at, Instant::now())]
        {
            let gap = log.longest_gap(from, to);
            assert!(
                gap <= Duration::from_secs(2),
                "{}: {what}: the client waited {gap:?}",
                db.name
            );
        }
        assert!(ini.contains(&entry(db, src.port)), "{}: {ini}", db.name);
        // The old server holds every write the client was acknowledged,
        // those made on the new server in between too, and nothing else.
        let on_old: BTreeSet<i64> = db
            .sql()
            .rows("select id from probe")
            .into_iter()
            .map(|r| r[0].as_deref().unwrap().parse().unwrap())
            .collect();
        let acknowledged: BTreeSet<i64> = log.ok.iter().map(|(_, id)| *id).collect();
        assert_eq!(on_old, acknowledged, "{}", db.name);
        assert!(db.sql().try_exec("insert into probe (client) values (99)").is_ok(), "{}", db.name);
    }
}
