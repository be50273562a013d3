//! `pgleap dbgroup ...`.

use crate::support::{Pgleap, TestDb, cluster};

/// A runner with databases a, b and c in its catalog.
fn three_dbs() -> (Pgleap, TestDb) {
    let db = TestDb::new(cluster(17), "dbgroup");
    let p = Pgleap::for_cluster(db.cluster);
    for name in ["a", "b", "c"] {
        p.run(&["db", "add", name, "--dsn", &db.dsn()]).ok();
    }
    (p, db)
}

#[test]
fn add_list_show_remove() {
    let (p, _db) = three_dbs();
    p.run(&["dbgroup", "add", "g", "a:source", "b:target", "c:target"]).ok();
    let groups = p.run(&["dbgroup", "list", "--json"]).json();
    assert_eq!(
        groups[0]["members"],
        serde_json::json!([
            {"db": "a", "role": "source"},
            {"db": "b", "role": "target"},
            {"db": "c", "role": "target"}
        ])
    );
    let text = p.run(&["dbgroup", "list"]);
    assert!(text.ok().contains("b, c"), "{text}");
    assert_eq!(p.run(&["dbgroup", "show", "g", "--json"]).json(), groups);
    p.run(&["dbgroup", "remove", "g"]).ok();
    assert_eq!(p.run(&["dbgroup", "list", "--json"]).json(), serde_json::json!([]));
}

#[test]
fn add_refuses_bad_groups() {
    let (p, _db) = three_dbs();
    p.run(&["dbgroup", "add", "g", "a:source", "nope:target"])
        .fails_with(&["database \"nope\" does not exist"]);
    p.run(&["dbgroup", "add", "g", "a:source", "b:source"]).fails_with(&["2 sources"]);
    p.run(&["dbgroup", "add", "g", "a:target", "b:target"]).fails_with(&["0 sources"]);
    p.run(&["dbgroup", "add", "g", "a:source"]).fails_with(&["has no target"]);
    p.run(&["dbgroup", "add", "g", "a:source", "a:target"]).fails_with(&["appears twice"]);
    p.run(&["dbgroup", "add", "g", "a:source", "b:replica"])
        .fails_with(&["invalid dbgroup member \"b:replica\"", "DB:source or DB:target"]);
    p.run(&["dbgroup", "add", "g", "a", "b:target"]).fails_with(&["invalid dbgroup member"]);
    assert_eq!(p.run(&["dbgroup", "list", "--json"]).json(), serde_json::json!([]));
    p.run(&["dbgroup", "add", "g", "a:source", "b:target"]).ok();
    p.run(&["dbgroup", "add", "g", "a:source", "c:target"])
        .fails_with(&["dbgroup \"g\" already exists"]);
    p.run(&["dbgroup", "remove", "nope"]).fails_with(&["dbgroup \"nope\" does not exist"]);
    p.run(&["dbgroup", "show", "nope"]).fails_with(&["dbgroup \"nope\" does not exist"]);
}
