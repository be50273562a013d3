//! `pgleap sync ...`: a relgroup along a dbgroup, checked against the servers.

use serde_json::json;

use crate::per_major;
use crate::support::{OWNER, Pgleap, TestDb, cluster};

/// A source on `src_major` with one table, a target on `dst_major`, and a
/// catalog holding db src/dst, relgroup rg and dbgroup g.
fn setup(src_major: u32, dst_major: u32) -> (Pgleap, TestDb, TestDb) {
    let src = TestDb::new(cluster(src_major), "syncsrc");
    let dst = TestDb::new(cluster(dst_major), "syncdst");
    src.sql().exec("create table t (id int primary key)");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    (p, src, dst)
}

per_major! {
    /// A sync from each major to 17 is accepted with Bucardo's defaults.
    fn add_to_17_with_defaults(major: u32) {
        let (p, _src, _dst) = setup(major, 17);
        p.run(&["sync", "add", "s", "--relgroup", "rg", "--dbgroup", "g"]).ok();
        let shown = p.run(&["sync", "show", "s", "--json"]).json();
        assert_eq!(shown["onetimecopy"], "if-empty");
        assert_eq!(shown["autokick"], true);
        assert_eq!(shown["source"], "src");
        assert_eq!(shown["targets"], json!(["dst"]));
        assert_eq!(shown["relations"], json!(["public.t"]));
    }
}

#[test]
fn downgrade_is_refused_unless_allowed_pg17_to_pg12() {
    let (p, _src, _dst) = setup(17, 12);
    p.run(&["sync", "add", "s", "--relgroup", "rg", "--dbgroup", "g"]).fails_with(&[
        "runs PostgreSQL 12.",
        "downgrade",
        "--allow-downgrade",
    ]);
    assert_eq!(p.run(&["sync", "list", "--json"]).json(), json!([]));
    p.add_sync(&["--allow-downgrade"]);
}

#[test]
fn source_and_target_must_be_different_databases() {
    let db = TestDb::new(cluster(17), "syncsame");
    db.sql().exec("create table t (id int primary key)");
    let p = Pgleap::for_cluster(db.cluster);
    p.run(&["db", "add", "tcp", "--dsn", &db.dsn()]).ok();
    // The same database through the unix socket: a different entry, same place.
    let socket = db.cluster.socket_dir.to_str().unwrap();
    p.run(&[
        "db",
        "add",
        "sock",
        "--host",
        socket,
        "--port",
        &db.cluster.port.to_string(),
        "--dbname",
        &db.name,
        "--user",
        OWNER,
    ])
    .ok();
    p.run(&["relgroup", "add", "rg", "--db", "tcp", "--all-tables"]).ok();
    p.run(&["dbgroup", "add", "g", "tcp:source", "sock:target"]).ok();
    p.run(&["sync", "add", "s", "--relgroup", "rg", "--dbgroup", "g"])
        .fails_with(&["same database on the same server"]);
    // Another database of the same server is a valid target.
    let other = TestDb::new(db.cluster, "syncother");
    p.run(&["db", "add", "other", "--dsn", &other.dsn()]).ok();
    p.run(&["dbgroup", "add", "g2", "tcp:source", "other:target"]).ok();
    p.run(&["sync", "add", "s", "--relgroup", "rg", "--dbgroup", "g2"]).ok();
}

#[test]
fn relgroup_must_belong_to_the_dbgroup_source() {
    let (p, _src, _dst) = setup(17, 17);
    p.run(&["dbgroup", "add", "reversed", "dst:source", "src:target"]).ok();
    p.run(&["sync", "add", "s", "--relgroup", "rg", "--dbgroup", "reversed"]).fails_with(&[
        "relgroup \"rg\" belongs to database \"src\"",
        "source of dbgroup \"reversed\" is \"dst\"",
    ]);
    p.run(&["sync", "add", "s", "--relgroup", "nope", "--dbgroup", "g"])
        .fails_with(&["relgroup \"nope\" does not exist"]);
    p.run(&["sync", "add", "s", "--relgroup", "rg", "--dbgroup", "nope"])
        .fails_with(&["dbgroup \"nope\" does not exist"]);
    assert_eq!(p.run(&["sync", "list", "--json"]).json(), json!([]));
}

#[test]
fn options_aliases_update_list_and_remove() {
    let (p, _src, _dst) = setup(17, 17);
    p.run(&[
        "sync",
        "add",
        "zero",
        "--relgroup",
        "rg",
        "--dbgroup",
        "g",
        "--onetimecopy",
        "0",
        "--autokick",
        "off",
    ])
    .ok();
    p.run(&["sync", "add", "one", "--relgroup", "rg", "--dbgroup", "g", "--onetimecopy", "1"]).ok();
    p.run(&["sync", "add", "one", "--relgroup", "rg", "--dbgroup", "g"])
        .fails_with(&["sync \"one\" already exists"]);
    p.run(&["sync", "add", "bad", "--relgroup", "rg", "--dbgroup", "g", "--onetimecopy", "3"])
        .fails_with(&["invalid value '3'"]);
    let list = p.run(&["sync", "list", "--json"]).json();
    assert_eq!(list[0]["name"], "one");
    assert_eq!(list[0]["onetimecopy"], "always");
    assert_eq!(list[0]["autokick"], true);
    assert_eq!(list[1]["name"], "zero");
    assert_eq!(list[1]["onetimecopy"], "never");
    assert_eq!(list[1]["autokick"], false);

    p.run(&["sync", "update", "zero", "--autokick", "on", "--onetimecopy", "if-empty"]).ok();
    let zero = p.run(&["sync", "show", "zero", "--json"]).json();
    assert_eq!(
        (zero["autokick"].clone(), zero["onetimecopy"].clone()),
        (json!(true), json!("if-empty"))
    );
    p.run(&["sync", "update", "zero"]).fails_with(&["nothing to change"]);
    p.run(&["sync", "update", "nope", "--autokick", "on"])
        .fails_with(&["sync \"nope\" does not exist"]);
    let text = p.run(&["sync", "show", "one"]);
    assert!(text.ok().contains("onetimecopy: always"), "{text}");

    // What a sync uses cannot be removed from under it.
    p.run(&["relgroup", "remove", "rg"]).fails_with(&["in use by sync one, sync zero"]);
    p.run(&["dbgroup", "remove", "g"]).fails_with(&["in use by sync one, sync zero"]);
    p.run(&["db", "remove", "dst", "--force"]).fails_with(&["in use by sync one, sync zero"]);

    p.run(&["sync", "remove", "one"]).ok();
    p.run(&["sync", "remove", "one"]).fails_with(&["sync \"one\" does not exist"]);
    p.run(&["sync", "remove", "zero"]).ok();
    p.run(&["relgroup", "remove", "rg"]).ok();
    p.run(&["dbgroup", "remove", "g"]).ok();
    p.run(&["db", "remove", "dst"]).ok();
}

/// `sync add --onetimecopy always` onto target tables that hold rows says
/// which it will empty, with their rows; onto empty ones it says nothing.
#[test]
fn onetimecopy_always_names_the_target_rows_it_replaces() {
    let src = TestDb::new(cluster(17), "otcsrc");
    let dst = TestDb::new(cluster(17), "otcdst");
    let schema =
        "create table full_one (id int primary key); create table empty_one (id int primary key);";
    src.sql().exec(schema);
    dst.sql().exec(schema);
    dst.sql().exec("insert into full_one select generate_series(1, 3)");
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    let out = p.run(&[
        "sync",
        "add",
        "s",
        "--relgroup",
        "rg",
        "--dbgroup",
        "g",
        "--onetimecopy",
        "always",
    ]);
    out.ok();
    assert!(
        out.stderr.contains("replaces the rows target \"dst\" holds in public.full_one (3 rows)"),
        "{out}"
    );
    assert!(!out.stderr.contains("empty_one"), "{out}");
    p.run(&["teardown", "s"]).ok();
}
