//! Large objects: copied with the initial copy, kept in sync while they are
//! created, rewritten and unlinked, brought exactly up to date inside the
//! cutover fence, and compared by verify.

use std::time::Duration;

use crate::support::{OWNER, Pgleap, Sql, TestDb, cluster};

/// Roles are per cluster, shared by every test: created once, whoever
/// comes first.
fn roles(db: &TestDb) {
    let admin = db.cluster.superuser("postgres");
    for role in ["lo_app", "lo_reader", "lo_secret"] {
        let _ = admin.try_exec(&format!("create role {role} nologin"));
    }
    let _ = admin.try_exec(&format!("grant lo_app to {OWNER}"));
}

/// Every large object as a user would check it: oid, owner, privileges and
/// the md5 of the whole content (read as superuser, so nothing is hidden).
fn inventory(db: &TestDb) -> Vec<Vec<Option<String>>> {
    db.cluster.superuser(&db.name).rows(
        "select oid::text, pg_get_userbyid(lomowner)::text, lomacl::text, md5(lo_get(oid))
         from pg_largeobject_metadata order by oid",
    )
}

fn create(sql: &Sql, content: &str) -> String {
    sql.value(&format!("select lo_from_bytea(0, {content})::text"))
}

/// A deterministic content of about `n` × 32 bytes, larger than pgleap's
/// copy chunk (256 KiB) for n above 8192.
fn big(n: u32, salt: &str) -> String {
    format!(
        "(select convert_to(string_agg(md5(g::text || '{salt}'), ''), 'UTF8')
          from generate_series(1, {n}) g)"
    )
}

#[test]
fn large_objects_copied_synced_cut_over_and_verified_pg12_to_pg17() {
    let src = TestDb::new(cluster(12), "losrc");
    let dst = TestDb::new(cluster(17), "lodst");
    roles(&src);
    roles(&dst);
    let s = src.sql();
    s.exec(
        "create table docs (id serial primary key, body oid, note text);
         insert into docs (note) select 'n' || g from generate_series(1, 50000) g;",
    );
    let small = create(&s, "'\\x0102'::bytea");
    let empty = create(&s, "''::bytea");
    let large = create(&s, &big(20_000, "a"));
    let owned = create(&s, "'owned by lo_app'::bytea");
    s.exec(&format!("alter large object {owned} owner to lo_app"));
    let granted = create(&s, "'readable by lo_reader'::bytea");
    s.exec(&format!(
        "grant select on large object {granted} to lo_reader;
         grant select, update on large object {granted} to public"
    ));
    let doomed = create(&s, "'unlinked later'::bytea");
    let rewritten = create(&s, &big(12_000, "b"));
    let secret = {
        let admin = src.cluster.superuser(&src.name);
        let oid = admin.value("select lo_from_bytea(0, 'not for pgleap')::text");
        admin.exec(&format!("alter large object {oid} owner to lo_secret"));
        oid
    };
    s.exec(&format!("insert into docs (body, note) values ({small}, 'small'), ({large}, 'large')"));

    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
    let shown = p.run(&["relgroup", "show", "rg", "--json"]).json();
    assert_eq!(shown["large_objects"], true, "on by default when the database has any");
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    p.add_sync(&["--onetimecopy", "always", "--large-objects-every", "1"]);

    // Writes before, during and after the initial copy, while the daemon
    // copies and syncs.
    let writer = {
        let sql = src.sql();
        let (large, rewritten) = (large.clone(), rewritten.clone());
        std::thread::spawn(move || {
            let mut made = Vec::new();
            for i in 0..40 {
                made.push(sql.value(&format!(
                    "select lo_from_bytea(0, convert_to(repeat('w{i}', {}), 'UTF8'))::text",
                    1 + i * 500
                )));
                sql.exec(&format!("select lo_put({rewritten}, {}, '\\xdeadbeef')", i * 9000));
                if i % 3 == 0 {
                    let gone = made.remove(0);
                    sql.exec(&format!("select lo_unlink({gone})"));
                }
                sql.exec(&format!("update docs set note = 'w{i}' where id = {}", i + 1));
                std::thread::sleep(Duration::from_millis(50));
            }
            // Past the first chunk of a large object.
            sql.exec(&format!("select lo_put({large}, 300000, 'tail')"));
        })
    };
    p.run(&["start"]).ok();
    writer.join().unwrap();
    s.exec(&format!("select lo_unlink({doomed})"));
    let late = create(&s, &big(10_000, "late"));
    p.run(&["kick", "s", "--wait", "120"]).ok();
    let status = p.run(&["status", "s"]);
    assert!(status.ok().contains("large objects: synced"), "{status}");

    let without_secret = |db: &TestDb| {
        let mut rows = inventory(db);
        rows.retain(|r| r[0].as_deref() != Some(secret.as_str()));
        rows
    };
    assert_eq!(without_secret(&src), inventory(&dst), "synced while the daemon runs");
    let verified = p.run(&["verify", "s"]);
    assert!(verified.ok().contains("large objects"), "{verified}");

    // One more rewrite that only the cutover's last pass can see.
    s.exec(&format!("select lo_put({owned}, 0, 'OWNED')"));
    p.run(&["stop"]).ok();
    let report = p.run(&["cutover", "s", "--json"]).json();
    assert!(report["large_objects_ms"].as_i64().is_some(), "{report}");
    assert!(report["fence_ms"].as_i64() >= report["large_objects_ms"].as_i64(), "{report}");

    let target = inventory(&dst);
    assert_eq!(without_secret(&src), target, "after cutover");
    let oids: Vec<&str> = target.iter().map(|r| r[0].as_deref().unwrap()).collect();
    for oid in [&small, &empty, &large, &owned, &granted, &rewritten, &late] {
        assert!(oids.contains(&oid.as_str()), "large object {oid} is on the target");
    }
    assert!(!oids.contains(&doomed.as_str()) && !oids.contains(&secret.as_str()));
    let owner = dst.sql().value(&format!(
        "select pg_get_userbyid(lomowner) from pg_largeobject_metadata where oid = {owned}"
    ));
    assert_eq!(owner, "lo_app");

    let equal = p.run(&["verify", "s", "--json"]);
    assert_eq!(equal.code, 0, "{equal}");
    let only = p.run(&["verify", "s", "--table", "large objects", "--json"]).json();
    assert_eq!(only[0]["tables"].as_array().unwrap().len(), 1, "{only}");
    assert_eq!(only[0]["tables"][0]["table"], "large objects", "{only}");
    dst.sql().exec(&format!("select lo_put({granted}, 0, 'X')"));
    let planted = p.run(&["verify", "s", "--json"]);
    assert_eq!(planted.code, 1, "{planted}");
    let report: serde_json::Value = serde_json::from_str(&planted.stdout).unwrap();
    let tables = &report[0]["tables"];
    let lo = tables.as_array().unwrap().iter().find(|t| t["table"] == "large objects").unwrap();
    assert_eq!(lo["differing_keys"], serde_json::json!([granted]), "{planted}");
}

#[test]
fn preflight_names_the_large_objects_the_role_cannot_read_and_relgroup_can_leave_them() {
    let src = TestDb::new(cluster(15), "lopresrc");
    let dst = TestDb::new(cluster(17), "lopredst");
    roles(&src);
    src.sql().exec("create table t (id int primary key); insert into t values (1);");
    let admin = src.cluster.superuser(&src.name);
    let secret = admin.value("select lo_from_bytea(0, 'hidden')::text");
    admin.exec(&format!("alter large object {secret} owner to lo_secret"));

    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let out =
        p.run(&["upgrade", "--source", &src.dsn(), "--target", &dst.dsn(), "--cutover", "never"]);
    let text = out.ok();
    assert!(
        text.contains("1 large object(s) the role cannot read") && text.contains(&secret),
        "{out}"
    );
    // Without a cutover, the daemon follows the source from here on.
    assert!(text.contains("started the daemon"), "{out}");
    assert_eq!(dst.sql().value("select count(*) from pg_largeobject_metadata"), "0");

    p.run(&[
        "relgroup",
        "add",
        "nolo",
        "--db",
        "upgrade_source",
        "--all-tables",
        "--no-large-objects",
    ])
    .ok();
    let shown = p.run(&["relgroup", "show", "nolo"]);
    assert!(shown.ok().contains("large objects: not included"), "{shown}");
}
