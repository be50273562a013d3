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
//!
//! With `PGLEAP_BENCH_BASELINE_BIN=PATH` (another build of pgleap, e.g. the
//! previous commit's), each round also runs that build's copy, so a change
//! is measured against what it replaced in the same run.

mod common;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use common::{knob, median_range};
use support::{OWNER, Pgleap, TestDb, cluster, tool};

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
    let rounds = knob("PGLEAP_BENCH_ROUNDS", 3);
    let baseline_bin = std::env::var_os("PGLEAP_BENCH_BASELINE_BIN").map(PathBuf::from);
    let mut names = vec![
        "pgleap (schema copy + onetimecopy, 2 jobs)",
        "pg_dump -Fc + pg_restore -j 2",
        "pg_dump | psql (the recipe's way)",
        "ceiling: \\copy from local files, no indexes",
    ];
    if baseline_bin.is_some() {
        names.push("pgleap, baseline build");
    }
    let files = tempfile::tempdir().unwrap();
    export_tables(&src, &tables, files.path());
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 1..=rounds {
        eprintln!("round {round}: pgleap ...");
        runs[0].push(pgleap_copy(&src, target, round, None));
        if let Some(bin) = &baseline_bin {
            eprintln!("round {round}: pgleap, baseline build ...");
            runs[4].push(pgleap_copy(&src, target, round, Some(bin)));
        }
        eprintln!("round {round}: pg_dump -Fc, pg_restore -j 2 ...");
        runs[1].push(dump_restore(&src, target, round));
        eprintln!("round {round}: pg_dump | psql ...");
        runs[2].push(dump_psql(&src, target, round));
        eprintln!("round {round}: ceiling ...");
        runs[3].push(ceiling(&src, target, &tables, files.path(), round));
    }
    println!(
        "## Initial copy, PostgreSQL 12 to 17 (pgbench scale {scale} + {wide_rows} wide rows, \
         {mb:.0} MB on disk, {rounds} rounds)\n"
    );
    println!(
        "| method | seconds, median [range] | MB/s | time vs pg_dump \\| psql, median [range] |"
    );
    println!("|---|---|---|---|");
    for (i, name) in names.iter().enumerate() {
        let (m, lo, hi) = median_range(&runs[i]);
        let ratios: Vec<f64> = runs[i].iter().zip(&runs[2]).map(|(a, b)| a / b).collect();
        let (rm, rlo, rhi) = median_range(&ratios);
        println!(
            "| {name} | {m:.1} [{lo:.1}-{hi:.1}] | {:.1} | {rm:.2} [{rlo:.2}-{rhi:.2}] |",
            mb / m
        );
    }
}

/// Seconds for pgleap's schema copy and initial copy into a new database.
fn pgleap_copy(
    src: &TestDb,
    target: &'static support::Cluster,
    round: u64,
    bin: Option<&Path>,
) -> f64 {
    let dst = TestDb::new(target, &format!("copybench_pgleap{round}"));
    let mut p = Pgleap::for_clusters(&[src.cluster, target]);
    if let Some(bin) = bin {
        p = p.binary(bin);
    }
    p.declare(src, &dst, &["--all-tables", "--all-sequences"]);
    let started = Instant::now();
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
    let out = p.run(&["kick", "s", "--wait", "3600", "--jobs", "2"]);
    let secs = started.elapsed().as_secs_f64();
    if std::env::var_os("PGLEAP_BENCH_LOG").is_some() {
        eprintln!("{out}");
    }
    out.ok();
    let count = "select count(*) from pgbench_accounts";
    assert_eq!(src.sql().value(count), dst.sql().value(count));
    p.run(&["sync", "remove", "s"]).ok();
    secs
}

/// Seconds for pg_dump -Fc to a file, then pg_restore -j 2.
fn dump_restore(src: &TestDb, target: &'static support::Cluster, round: u64) -> f64 {
    let dst = TestDb::new(target, &format!("copybench_restore{round}"));
    let file = std::env::temp_dir().join(format!("pgleap-copybench-{}.dump", std::process::id()));
    let started = Instant::now();
    check(
        tool("pg_dump")
            .args(conn_args(src))
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
    let secs = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&file);
    secs
}

/// Seconds for pg_dump piped into psql.
fn dump_psql(src: &TestDb, target: &'static support::Cluster, round: u64) -> f64 {
    let dst = TestDb::new(target, &format!("copybench_psql{round}"));
    let started = Instant::now();
    let mut dump = tool("pg_dump")
        .args(conn_args(src))
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
    started.elapsed().as_secs_f64()
}

/// The tables' rows as local files, for the ceiling.
fn export_tables(src: &TestDb, tables: &[&str], dir: &std::path::Path) {
    for t in tables {
        let f = dir.join(t);
        check(
            tool("psql")
                .args(conn_args(src))
                .args(["-q", "-d", &src.name, "-c", &format!("\\copy {t} to '{}'", f.display())])
                .env("PGPASSWORD", &src.cluster.owner_password)
                .status()
                .unwrap(),
            "\\copy to",
        );
    }
}

/// Seconds to load the local files into tables without indexes.
fn ceiling(
    src: &TestDb,
    target: &'static support::Cluster,
    tables: &[&str],
    dir: &std::path::Path,
    round: u64,
) -> f64 {
    let dst = TestDb::new(target, &format!("copybench_ceiling{round}"));
    let mut dump_schema = tool("pg_dump")
        .args(conn_args(src))
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
    let started = Instant::now();
    for t in tables {
        let f = dir.join(t);
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
    started.elapsed().as_secs_f64()
}
