//! `pgleap db ...`: adding, showing, updating and removing databases.

use std::os::unix::fs::PermissionsExt;

use crate::per_major;
use crate::support::{OWNER, Pgleap, TestDb, cluster};

fn write_private(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

per_major! {
    /// `db add` connects, reports the server version, and stores the entry.
    fn add_reports_the_server_version(major: u32) {
        let db = TestDb::new(cluster(major), "dbadd");
        let p = Pgleap::for_cluster(db.cluster);
        let out = p.run(&["db", "add", "src", "--dsn", &db.uri()]);
        assert!(out.ok().contains(&format!("PostgreSQL {major}.")), "{out}");
        let list = p.run(&["db", "list", "--json"]).json();
        let entries = list.as_array().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["name"], "src");
        let version = entries[0]["server_version"].as_str().unwrap();
        assert!(version.starts_with(&format!("{major}.")), "{version}");
        assert_eq!(
            entries[0]["conninfo"],
            format!("dbname={} host=127.0.0.1 port={} user={OWNER}", db.name, db.cluster.port)
        );
    }
}

#[test]
fn add_accepts_key_value_fields_and_unix_sockets() {
    let db = TestDb::new(cluster(17), "dbfields");
    let p = Pgleap::for_cluster(db.cluster);
    p.run(&["db", "add", "kv", "--dsn", &db.dsn()]).ok();
    let port = db.cluster.port.to_string();
    p.run(&[
        "db",
        "add",
        "fields",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--dbname",
        &db.name,
        "--user",
        OWNER,
    ])
    .ok();
    let socket = db.cluster.socket_dir.to_str().unwrap();
    p.run(&[
        "db", "add", "sock", "--host", socket, "--port", &port, "--dbname", &db.name, "--user",
        OWNER,
    ])
    .ok();
    let shown = p.run(&["db", "show", "sock", "--json"]).json();
    assert_eq!(
        shown["conninfo"],
        format!("dbname={} host={socket} port={port} user={OWNER}", db.name)
    );
    let text = p.run(&["db", "list"]);
    for name in ["kv", "fields", "sock"] {
        assert!(text.ok().contains(name), "{text}");
    }
}

#[test]
fn add_refuses_bad_input_and_leaves_nothing_behind() {
    let db = TestDb::new(cluster(17), "dbbad");
    let p = Pgleap::for_cluster(db.cluster);
    let port = db.cluster.port;

    p.run(&["db", "add", "x", "--dsn", "host=127.0.0.1 port"]).fails_with(&[
        "database \"x\"",
        "invalid connection string",
        "hint:",
    ]);
    p.run(&["db", "add", "x", "--dsn", "hots=127.0.0.1"])
        .fails_with(&["invalid connection option \"hots\""]);
    p.run(&["db", "add", "x", "--dsn", "sslmode=sometimes"]).fails_with(&["invalid sslmode"]);
    p.run(&["db", "add", "bad name", "--dsn", &db.dsn()]).fails_with(&["invalid database name"]);

    // Nothing listens on a port we just freed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    p.run(&["db", "add", "x", "--dsn", &format!("host=127.0.0.1 port={closed} dbname=d user=u")])
        .fails_with(&["database \"x\"", "cannot reach the server", "hint: check host and port"]);

    let wrong = Pgleap::new().env("PGPASSWORD", "not-the-password");
    wrong.run(&["db", "add", "x", "--dsn", &db.dsn()]).fails_with(&[
        "authentication failed",
        &format!("{OWNER}@127.0.0.1:{port}/{}", db.name),
        "hint: check the user name and the password",
    ]);
    let none = Pgleap::new();
    none.run(&["db", "add", "x", "--dsn", &db.dsn()])
        .fails_with(&["authentication failed", "none was found"]);

    let missing = format!("host=127.0.0.1 port={port} dbname=no_such_db user={OWNER}");
    p.run(&["db", "add", "x", "--dsn", &missing])
        .fails_with(&["database \"no_such_db\" does not exist", "createdb"]);

    let with_password =
        format!("postgresql://{OWNER}:{}@127.0.0.1:{port}/{}", db.cluster.owner_password, db.name);
    p.run(&["db", "add", "x", "--dsn", &with_password])
        .fails_with(&["contains a password", "--store-password"]);

    assert_eq!(p.run(&["db", "list", "--json"]).json(), serde_json::json!([]));

    p.run(&["db", "add", "x", "--dsn", &db.dsn()]).ok();
    p.run(&["db", "add", "x", "--dsn", &db.dsn()])
        .fails_with(&["database \"x\" already exists", "pgleap db remove x"]);
    p.run(&["db", "show", "nope"]).fails_with(&["database \"nope\" does not exist", "db list"]);
}

#[test]
fn store_password_needs_the_flag_and_makes_the_catalog_private() {
    let db = TestDb::new(cluster(17), "dbstore");
    let pw = &db.cluster.owner_password;
    let p = Pgleap::new().secret(pw);
    let dsn = format!("postgresql://{OWNER}:{pw}@127.0.0.1:{}/{}", db.cluster.port, db.name);
    p.run(&["db", "add", "s", "--dsn", &dsn, "--store-password"]).ok();
    let mode = std::fs::metadata(&p.catalog).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let shown = p.run(&["db", "show", "s", "--json"]).json();
    assert_eq!(shown["password_stored"], true);
    // The stored password is what later connections use (no PGPASSWORD here).
    p.run(&["db", "update", "s", "--port", &db.cluster.port.to_string()]).ok();
    // And it can be forgotten, after which nothing else supplies one.
    p.run(&["db", "update", "s", "--forget-password"]).fails_with(&["authentication failed"]);
    assert_eq!(p.run(&["db", "show", "s", "--json"]).json()["password_stored"], true);
}

#[test]
fn password_file_and_pgpass_are_referenced_not_copied() {
    let db = TestDb::new(cluster(17), "dbpwfile");
    let pw = db.cluster.owner_password.clone();
    let p = Pgleap::new().secret(&pw);
    let file = p.home().join("pw.txt");
    write_private(&file, &format!("{pw}\n"));
    p.run(&["db", "add", "f", "--dsn", &db.dsn(), "--password-file", file.to_str().unwrap()]).ok();
    let shown = p.run(&["db", "show", "f"]);
    assert!(shown.ok().contains("file "), "{shown}");
    assert!(!String::from_utf8_lossy(&std::fs::read(&p.catalog).unwrap()).contains(&pw));
    // The file is read at each connection: a wrong password there now fails.
    write_private(&file, "wrong\n");
    p.run(&["db", "update", "f", "--user", OWNER]).fails_with(&["authentication failed"]);

    let pgpass = p.home().join(".pgpass");
    write_private(&pgpass, &format!("127.0.0.1:{}:*:{OWNER}:{pw}\n", db.cluster.port));
    p.run(&["db", "add", "g", "--dsn", &db.dsn()]).ok();
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
    p.run(&["db", "update", "g", "--user", OWNER])
        .fails_with(&["group or world access", "authentication failed"]);
}

#[test]
fn pg_environment_variables_fill_the_connection() {
    let db = TestDb::new(cluster(17), "dbenv");
    let port = db.cluster.port.to_string();
    let p = Pgleap::for_cluster(db.cluster)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", &port)
        .env("PGUSER", OWNER)
        .env("PGDATABASE", &db.name)
        .env("PGSSLMODE", "disable");
    p.run(&["db", "add", "e"]).ok();
    let shown = p.run(&["db", "show", "e", "--json"]).json();
    assert_eq!(
        shown["conninfo"],
        format!("dbname={} host=127.0.0.1 port={port} sslmode=disable user={OWNER}", db.name)
    );
}

#[test]
fn update_reconnects_before_saving() {
    let a = TestDb::new(cluster(17), "dbupd_a");
    let b = TestDb::new(cluster(17), "dbupd_b");
    let p = Pgleap::for_cluster(a.cluster);
    p.run(&["db", "add", "a", "--dsn", &a.dsn()]).ok();
    p.run(&["db", "update", "a", "--dbname", &b.name]).ok();
    let conninfo = p.run(&["db", "show", "a", "--json"]).json()["conninfo"].clone();
    assert!(conninfo.as_str().unwrap().contains(&format!("dbname={}", b.name)));
    p.run(&["db", "update", "a", "--dbname", "no_such_db"]).fails_with(&["does not exist"]);
    assert_eq!(p.run(&["db", "show", "a", "--json"]).json()["conninfo"], conninfo);
    p.run(&["db", "update", "nope", "--dbname", &b.name])
        .fails_with(&["database \"nope\" does not exist"]);
}

#[test]
fn remove_is_refused_while_a_dbgroup_uses_it_unless_forced() {
    let a = TestDb::new(cluster(17), "dbrm_a");
    let b = TestDb::new(cluster(17), "dbrm_b");
    let p = Pgleap::for_cluster(a.cluster);
    p.run(&["db", "add", "a", "--dsn", &a.dsn()]).ok();
    p.run(&["db", "add", "b", "--dsn", &b.dsn()]).ok();
    p.run(&["dbgroup", "add", "g", "a:source", "b:target"]).ok();
    p.run(&["db", "remove", "b"]).fails_with(&["in use by dbgroup g", "--force"]);
    let used = p.run(&["db", "show", "b", "--json"]).json()["used_by"].clone();
    assert_eq!(used, serde_json::json!(["dbgroup g (target)"]));
    p.run(&["db", "remove", "b", "--force"]).ok();
    let group = p.run(&["dbgroup", "show", "g", "--json"]).json();
    assert_eq!(group[0]["members"], serde_json::json!([{"db": "a", "role": "source"}]));
    p.run(&["db", "remove", "b"]).fails_with(&["database \"b\" does not exist"]);
    let names: Vec<_> = p
        .run(&["db", "list", "--json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a"]);
}

/// Every catalog query pgleap builds, as built for the server's version,
/// is prepared by every major pgleap supports: a column or function that
/// one release lacks fails here, naming the query.
#[test]
fn every_catalog_query_prepares_on_every_major() {
    for major in [10, 11, 12, 15, 17, 18] {
        let db = TestDb::new(cluster(major), &format!("queries{major}"));
        let p = Pgleap::for_cluster(db.cluster);
        p.run(&["db", "add", "d", "--dsn", &db.dsn()]).ok();
        let out = p.run(&["db", "check-queries", "d"]);
        let text = out.ok();
        assert!(text.contains(&format!("PostgreSQL {major}.")), "{out}");
        assert!(text.contains("prepared all"), "{out}");
    }
}

/// A mistyped name is answered with the closest that exists.
#[test]
fn a_mistyped_name_says_which_was_meant() {
    let db = TestDb::new(cluster(17), "typo");
    let p = Pgleap::for_cluster(db.cluster);
    p.run(&["db", "add", "orders_main", "--dsn", &db.dsn()]).ok();
    p.run(&["db", "show", "orders_mian"])
        .fails_with(&["database \"orders_mian\" does not exist", "did you mean \"orders_main\"?"]);
    let far = p.run(&["db", "show", "inventory"]);
    assert!(!far.fails_with(&["does not exist"]).contains("did you mean"), "{far}");
}
