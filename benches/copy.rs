//! Initial copy speed, PostgreSQL 12 to 17, against the usual ways of doing
//! it, in the same run (not a test: `cargo bench --bench copy`).
//!
//! Data: pgbench at PGLEAP_BENCH_COPY_SCALE (default 50) plus a wide-row
//! table (PGLEAP_BENCH_WIDE_ROWS rows of about 2 kB, default 100,000).
//! Each method loads into an empty database of the same PostgreSQL 17
//! server, schema and indexes included:
//!
//! - pgleap: `schema copy`, then a sync with `onetimecopy always` and one
//!   `kick --wait --jobs 2` (parallel COPY from one snapshot, indexes after).
//! - `pg_dump -Fc` to a file, then `pg_restore -j 2`.
//! - `pg_dump | psql`, the Bucardo recipe's way.
//! - The ingest ceiling: psql `\copy ... from` local files of the same data
//!   into tables without indexes (no network hop from the source, no index
//!   builds).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::process::Stdio;
use std::time::Instant;

use support::{OWNER, Pgleap, TestDb, cluster, tool};

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn conn_args(db: &TestDb) -> Vec<String> {
    vec![
        "-h".into(),
        "127.0.0.1".into(),
        "-U".into(),
        OWNER.into(),
        "-p".into(),
        db.cluster.port.to_string(),
    ]
}

fn check(status: std::process::ExitStatus, what: &str) {
    assert!(status.success(), "{what} failed");
}

fn main() {
    let scale = knob("PGLEAP_BENCH_COPY_SCALE", 50);
    let wide_rows = knob("PGLEAP_BENCH_WIDE_ROWS", 100_000);
    let src = TestDb::new(cluster(12), "copybenchsrc");
    eprintln!("loading pgbench scale {scale} and {wide_rows} wide rows into PostgreSQL 12 ...");
    check(
        tool("pgbench")
            .args(conn_args(&src))
            .args(["-i", "-q", "-s", &scale.to_string(), &src.name])
            .env("PGPASSWORD", &src.cluster.owner_password)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap(),
        "pgbench -i",
    );
    src.sql().exec(&format!(
        "create table wide (id int primary key, payload text, blob bytea, doc jsonb, at timestamptz);
         insert into wide select g, repeat(md5(g::text), 20), decode(repeat(md5(g::text), 10), 'hex'),
                jsonb_build_object('n', g, 'tags', jsonb_build_array('a', 'b', g::text)),
                timestamptz '2020-01-01' + g * interval '1 minute'
         from generate_series(1, {wide_rows}) g;
         analyze;"
    ));
    let tables =
        ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history", "wide"];
    let bytes: i64 = src
        .sql()
        .value(&format!(
            "select sum(pg_total_relation_size(c))::int8 from unnest(array['{}']::regclass[]) c",
            tables.join("','")
        ))
        .parse()
        .unwrap();
    let mb = bytes as f64 / 1e6;
    let target = cluster(17);
    let mut results: Vec<(&str, f64)> = Vec::new();

    // pgleap.
    let dst = TestDb::new(target, "copybench_pgleap");
    let p = Pgleap::for_clusters(&[src.cluster, target]);
    p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
    eprintln!("pgleap ...");
    let started = Instant::now();
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    p.run(&["kick", "s", "--wait", "3600", "--jobs", "2"]).ok();
    results.push(("pgleap (schema copy + onetimecopy, 2 jobs)", started.elapsed().as_secs_f64()));
    let count = "select count(*) from pgbench_accounts";
    assert_eq!(src.sql().value(count), dst.sql().value(count));
    p.run(&["sync", "remove", "s"]).ok();

    // pg_dump -Fc | pg_restore -j 2.
    let dst = TestDb::new(target, "copybench_restore");
    let file = std::env::temp_dir().join(format!("pgleap-copybench-{}.dump", std::process::id()));
    eprintln!("pg_dump -Fc, pg_restore -j 2 ...");
    let started = Instant::now();
    check(
        tool("pg_dump")
            .args(conn_args(&src))
            .args(["-Fc", "--no-owner", "-f"])
            .arg(&file)
            .arg(&src.name)
            .env("PGPASSWORD", &src.cluster.owner_password)
            .status()
            .unwrap(),
        "pg_dump -Fc",
    );
    check(
        tool("pg_restore")
            .args(conn_args(&dst))
            .args(["-j", "2", "--no-owner", "-d", &dst.name])
            .arg(&file)
            .env("PGPASSWORD", &target.owner_password)
            .status()
            .unwrap(),
        "pg_restore",
    );
    results.push(("pg_dump -Fc + pg_restore -j 2", started.elapsed().as_secs_f64()));
    let _ = std::fs::remove_file(&file);

    // pg_dump | psql.
    let dst = TestDb::new(target, "copybench_psql");
    eprintln!("pg_dump | psql ...");
    let started = Instant::now();
    let mut dump = tool("pg_dump")
        .args(conn_args(&src))
        .args(["--no-owner", &src.name])
        .env("PGPASSWORD", &src.cluster.owner_password)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    check(
        tool("psql")
            .args(conn_args(&dst))
            .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &dst.name])
            .env("PGPASSWORD", &target.owner_password)
            .stdin(dump.stdout.take().unwrap())
            .stdout(Stdio::null())
            .status()
            .unwrap(),
        "psql",
    );
    check(dump.wait().unwrap(), "pg_dump");
    results.push(("pg_dump | psql (the recipe's way)", started.elapsed().as_secs_f64()));

    // Ceiling: local files into unindexed tables.
    let dst = TestDb::new(target, "copybench_ceiling");
    let dir = tempfile::tempdir().unwrap();
    let mut dump_schema = tool("pg_dump")
        .args(conn_args(&src))
        .args(["--section=pre-data", "--no-owner", &src.name])
        .env("PGPASSWORD", &src.cluster.owner_password)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    check(
        tool("psql")
            .args(conn_args(&dst))
            .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &dst.name])
            .env("PGPASSWORD", &target.owner_password)
            .stdin(dump_schema.stdout.take().unwrap())
            .stdout(Stdio::null())
            .status()
            .unwrap(),
        "psql (pre-data)",
    );
    check(dump_schema.wait().unwrap(), "pg_dump (pre-data)");
    for t in tables {
        let f = dir.path().join(t);
        check(
            tool("psql")
                .args(conn_args(&src))
                .args(["-q", "-d", &src.name, "-c", &format!("\\copy {t} to '{}'", f.display())])
                .env("PGPASSWORD", &src.cluster.owner_password)
                .status()
                .unwrap(),
            "\\copy to",
        );
    }
    eprintln!("ceiling: \\copy from local files ...");
    let started = Instant::now();
    for t in tables {
        let f = dir.path().join(t);
        check(
            tool("psql")
                .args(conn_args(&dst))
                .args(["-q", "-d", &dst.name, "-c", &format!("\\copy {t} from '{}'", f.display())])
                .env("PGPASSWORD", &target.owner_password)
                .status()
                .unwrap(),
            "\\copy from",
        );
    }
    results.push(("ceiling: \\copy from local files, no indexes", started.elapsed().as_secs_f64()));

    let recipe = results[2].1;
    println!(
        "## Initial copy, PostgreSQL 12 to 17 (pgbench scale {scale} + {wide_rows} wide rows, {mb:.0} MB on disk)\n"
    );
    println!("| method | seconds | MB/s | speed vs pg_dump \\| psql |");
    println!("|---|---|---|---|");
    for (name, secs) in &results {
        println!("| {name} | {secs:.1} | {:.1} | {:.2} |", mb / secs, recipe / secs);
    }
}
