//! The catalog file: where it lives, and many processes writing at once.

use crate::support::{Pgleap, TestDb, cluster};

#[test]
fn concurrent_processes_do_not_corrupt_the_catalog() {
    let db = TestDb::new(cluster(17), "catconc");
    let p = Pgleap::for_cluster(db.cluster);
    let dsn = db.dsn();
    let children: Vec<_> = (0..8)
        .map(|i| {
            p.command()
                .args(["db", "add", &format!("db{i}"), "--dsn", &dsn])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // The same name from two processes: exactly one wins.
    let racers: Vec<_> = (0..4)
        .map(|_| {
            p.command()
                .args(["dbgroup", "add", "g", "db0:source", "db1:target"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let wins = racers
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .filter(|o| o.status.success())
        .count();
    assert_eq!(wins, 1);
    let names: Vec<String> = p
        .run(&["db", "list", "--json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (0..8).map(|i| format!("db{i}")).collect();
    assert_eq!(names, expected);
}

#[test]
fn catalog_location_follows_flag_then_env_then_data_dir() {
    let p = Pgleap::new();
    // No PGLEAP_CATALOG: the user's data directory.
    let out =
        p.command().env_remove("PGLEAP_CATALOG").args(["db", "list", "--json"]).output().unwrap();
    assert!(out.status.success());
    assert!(p.home().join(".local/share/pgleap/catalog.db").exists());
    // PGLEAP_CATALOG.
    p.run(&["db", "list"]).ok();
    assert!(p.catalog.exists());
    // --catalog wins over the environment.
    let flag = p.home().join("elsewhere/c.db");
    p.run(&["--catalog", flag.to_str().unwrap(), "db", "list"]).ok();
    assert!(flag.exists());
}
