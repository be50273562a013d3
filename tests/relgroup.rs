//! `pgleap relgroup ...`: resolving tables and sequences on the source.

use serde_json::{Value, json};

use crate::per_major;
use crate::support::{Pgleap, TestDb, cluster};

/// Tables of every shape the resolver must recognise, owned by the owner.
const SCHEMA: &str = r#"
    create table public.pk (id int primary key, v text);
    create table public.uniq (a int not null, b int not null, c text, unique (a, b));
    create table public.events (id bigint, at date not null, primary key (id, at))
        partition by range (at);
    create table public.events_2025 partition of public.events
        for values from ('2025-01-01') to ('2026-01-01');
    create table public.events_2026 partition of public.events
        for values from ('2026-01-01') to ('2027-01-01');
    create table public."select" ("from" int primary key);
    create table public."Mixed Case" ("Id" int primary key);
    create table public."with""quote" (id int primary key);
    create table public."ünïcode" (id int primary key);
    create sequence public.counter;
    create table public.ident (id int generated always as identity primary key);
    create view public.v as select * from public.pk;
    insert into public.pk select g, 'row ' || g from generate_series(1, 1000) g;
    analyze public.pk;
"#;

fn members(v: &Value) -> Vec<(String, String, String, Value)> {
    v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["schema"].as_str().unwrap().to_string(),
                m["name"].as_str().unwrap().to_string(),
                m["kind"].as_str().unwrap().to_string(),
                m["key_columns"].clone(),
            )
        })
        .collect()
}

fn m(name: &str, kind: &str, keys: Value) -> (String, String, String, Value) {
    ("public".into(), name.into(), kind.into(), keys)
}

per_major! {
    /// Every table and sequence is found with its key; partitions are not
    /// members, their root is.
    fn all_tables_and_sequences_resolve_with_keys(major: u32) {
        let db = TestDb::new(cluster(major), "rgall");
        db.sql().exec(SCHEMA);
        let p = Pgleap::for_cluster(db.cluster);
        p.run(&["db", "add", "src", "--dsn", &db.dsn()]).ok();
        let out = p.run(&["relgroup", "add", "rg", "--db", "src", "--all-tables", "--all-sequences"]);
        assert!(out.ok().contains("8 table(s), 2 sequence(s)"), "{out}");
        let shown = p.run(&["relgroup", "show", "rg", "--json"]).json();
        assert_eq!(
            members(&shown),
            vec![
                m("Mixed Case", "table", json!(["Id"])),
                m("events", "partitioned table", json!(["id", "at"])),
                m("ident", "table", json!(["id"])),
                m("pk", "table", json!(["id"])),
                m("select", "table", json!(["from"])),
                m("uniq", "table", json!(["a", "b"])),
                m("with\"quote", "table", json!(["id"])),
                m("ünïcode", "table", json!(["id"])),
                m("counter", "sequence", json!([])),
                m("ident_id_seq", "sequence", json!([])),
            ]
        );
        let pk = &shown["members"].as_array().unwrap()[3];
        assert_eq!(pk["est_rows"], 1000);
        assert!(pk["est_bytes"].as_i64().unwrap() > 8192, "{pk}");
        let text = p.run(&["relgroup", "show", "rg"]);
        for shown_name in ["public.\"Mixed Case\"", "public.\"with\"\"quote\"", "partitioned table"] {
            assert!(text.ok().contains(shown_name), "{text}");
        }
    }
}

#[test]
fn tables_without_a_usable_key_are_refused_on_request_with_the_full_list() {
    let db = TestDb::new(cluster(17), "rgkeyless");
    db.sql().exec(
        "create table public.ok (id int primary key);
         create table public.nokey (v text);
         create table public.partial (id int not null, v text);
         create unique index on public.partial (id) where v is not null;
         create table public.nullable (id int unique, v text);
         create table public.expr (v text not null);
         create unique index on public.expr (lower(v));",
    );
    let p = Pgleap::for_cluster(db.cluster);
    p.run(&["db", "add", "src", "--dsn", &db.dsn()]).ok();
    let err =
        p.run(&["relgroup", "add", "rg", "--db", "src", "--all-tables", "--keyless", "refuse"]);
    err.fails_with(&[
        "4 table(s)",
        "public.expr, public.nokey, public.nullable, public.partial",
        "ADD PRIMARY KEY",
    ]);
    assert_eq!(p.run(&["relgroup", "list", "--json"]).json(), json!([]));
    // By default they are accepted, with a warning saying what it costs.
    let allowed = p.run(&["relgroup", "add", "all", "--db", "src", "--all-tables"]);
    assert!(allowed.ok().contains("5 table(s)"), "{allowed}");
    assert!(allowed.stderr.contains("4 table(s) without a usable key"), "{allowed}");
    let shown = p.run(&["relgroup", "show", "all", "--json"]).json();
    assert_eq!(members(&shown)[1], m("nokey", "table", json!([])));
    let mut args =
        vec!["relgroup", "add", "rg", "--db", "src", "--all-tables", "--keyless", "refuse"];
    for t in ["public.expr", "public.nokey", "public.nullable", "public.partial"] {
        args.extend(["--exclude-table", t]);
    }
    p.run(&args).ok();
    let shown = p.run(&["relgroup", "show", "rg", "--json"]).json();
    assert_eq!(members(&shown), vec![m("ok", "table", json!(["id"]))]);
}

#[test]
fn named_tables_are_resolved_like_sql_names() {
    let db = TestDb::new(cluster(17), "rgnamed");
    db.sql().exec(SCHEMA);
    let p = Pgleap::for_cluster(db.cluster);
    p.run(&["db", "add", "src", "--dsn", &db.dsn()]).ok();
    p.run(&[
        "relgroup",
        "add",
        "rg",
        "--db",
        "src",
        "--table",
        "public.\"Mixed Case\"",
        "--table",
        "\"select\"",
        "--sequence",
        "public.counter",
    ])
    .ok();
    let shown = p.run(&["relgroup", "show", "rg", "--json"]).json();
    assert_eq!(
        members(&shown),
        vec![
            m("Mixed Case", "table", json!(["Id"])),
            m("select", "table", json!(["from"])),
            m("counter", "sequence", json!([])),
        ]
    );
    let add = |args: &[&str]| {
        let mut all = vec!["relgroup", "add", "x", "--db", "src"];
        all.extend(args);
        p.run(&all)
    };
    add(&["--table", "public.nope"])
        .fails_with(&["relation public.nope does not exist", "SCHEMA.NAME"]);
    add(&["--table", "nope.pk"]).fails_with(&["relation nope.pk does not exist"]);
    add(&["--table", "public.events_2025"])
        .fails_with(&["is a partition of events", "--table events"]);
    add(&["--table", "public.counter"]).fails_with(&["is a sequence", "--sequence public.counter"]);
    add(&["--table", "public.v"]).fails_with(&["not a table"]);
    add(&["--sequence", "public.pk"]).fails_with(&["not a sequence"]);
    add(&[]).fails_with(&["nothing selected", "--all-tables"]);
    add(&["--table", "public.pk"]).ok();
    add(&["--table", "public.pk"]).fails_with(&["relgroup \"x\" already exists"]);
    p.run(&["relgroup", "add", "y", "--db", "nope", "--all-tables"])
        .fails_with(&["database \"nope\" does not exist"]);
}

#[test]
fn schemas_select_and_exclude() {
    let db = TestDb::new(cluster(17), "rgschema");
    db.sql().exec(
        "create schema s1; create schema s2;
         create table s1.a (id int primary key);
         create table s2.b (id int primary key);
         create table public.c (id int primary key);",
    );
    let p = Pgleap::for_cluster(db.cluster);
    p.run(&["db", "add", "src", "--dsn", &db.dsn()]).ok();
    let names = |group: &str| -> Vec<String> {
        p.run(&["relgroup", "show", group, "--json"]).json()["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| format!("{}.{}", m["schema"].as_str().unwrap(), m["name"].as_str().unwrap()))
            .collect()
    };
    p.run(&["relgroup", "add", "one", "--db", "src", "--schema", "s1"]).ok();
    assert_eq!(names("one"), ["s1.a"]);
    p.run(&["relgroup", "add", "rest", "--db", "src", "--all-tables", "--exclude-schema", "s2"])
        .ok();
    assert_eq!(names("rest"), ["public.c", "s1.a"]);
    p.run(&["relgroup", "add", "bad", "--db", "src", "--schema", "s9"])
        .fails_with(&["schema \"s9\" does not exist"]);
    p.run(&["relgroup", "add", "none", "--db", "src", "--all-sequences"])
        .fails_with(&["matches no table or sequence"]);
    let list = p.run(&["relgroup", "list"]);
    assert!(list.ok().contains("rest"), "{list}");
    p.run(&["relgroup", "remove", "one"]).ok();
    p.run(&["relgroup", "remove", "one"]).fails_with(&["relgroup \"one\" does not exist"]);
    let left: Vec<Value> = p
        .run(&["relgroup", "list", "--json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].clone())
        .collect();
    assert_eq!(left, [json!("rest")]);
}
