//! Write downtime of a cutover under load, against the downtime of a
//! dump/restore migration of the same database, in the same run (not a
//! test: `cargo bench --bench cutover`).
//!
//! For each load (pgbench at a fixed rate, and unthrottled), a PostgreSQL 12
//! database at pgbench scale PGLEAP_BENCH_SCALE (default 10) is synced to
//! PostgreSQL 17 by the daemon while pgbench writes; `cutover --dry-run`
//! predicts the fence and `cutover` measures it. The baseline is the time
//! of `pg_dump -Fc` + `pg_restore -j 2` of the same database: with
//! dump/restore, writes must stop for all of it.

#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::time::{Duration, Instant};

use support::{OWNER, Pgleap, TestDb, cluster, finish, pgbench, tool};

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Returns (predicted ms, measured ms).
fn fence_under_load(scale: u64, load: &[&str], label: &str) -> (f64, f64) {
    let src = TestDb::new(cluster(12), &format!("fence{label}src"));
    let dst = TestDb::new(cluster(17), &format!("fence{label}dst"));
    finish(pgbench(&src, &["-i", "-q", "-s", &scale.to_string()]).spawn().unwrap());
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["kick", "s", "--wait", "600", "--jobs", "2"]).ok();
    p.run(&["start"]).ok();
    let mut args = vec!["-n", "-c", "4", "-j", "2", "-T", "600"];
    args.extend(load);
    let mut writes = pgbench(&src, &args).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(10));
    let dry = p.run(&["cutover", "s", "--dry-run", "--json", "--max-lag", "1"]).json();
    std::thread::sleep(Duration::from_secs(5));
    let real = p.run(&["cutover", "s", "--json", "--max-lag", "1"]).json();
    let _ = writes.kill();
    let _ = writes.wait();
    p.run(&["stop"]).ok();
    let digest = "select md5(string_agg(a::text, ',' order by aid)) from pgbench_accounts a";
    assert_eq!(src.sql().value(digest), dst.sql().value(digest));
    p.run(&["teardown", "s"]).ok();
    (dry["fence_ms"].as_f64().unwrap(), real["fence_ms"].as_f64().unwrap())
}

fn main() {
    let scale = knob("PGLEAP_BENCH_SCALE", 10);
    let rate = knob("PGLEAP_BENCH_RATE", 200).to_string();

    eprintln!("baseline: pg_dump -Fc + pg_restore -j 2 of pgbench scale {scale} ...");
    let src = TestDb::new(cluster(12), "fencebaselinesrc");
    let dst = TestDb::new(cluster(17), "fencebaselinedst");
    finish(pgbench(&src, &["-i", "-q", "-s", &scale.to_string()]).spawn().unwrap());
    let file = std::env::temp_dir().join(format!("pgleap-fencebench-{}.dump", std::process::id()));
    let conn = |db: &TestDb| {
        vec![
            "-h".to_string(),
            "127.0.0.1".into(),
            "-U".into(),
            OWNER.into(),
            "-p".into(),
            db.cluster.port.to_string(),
        ]
    };
    let started = Instant::now();
    let dumped = tool("pg_dump")
        .args(conn(&src))
        .args(["-Fc", "--no-owner", "-f"])
        .arg(&file)
        .arg(&src.name)
        .env("PGPASSWORD", &src.cluster.owner_password)
        .status()
        .unwrap();
    let restored = tool("pg_restore")
        .args(conn(&dst))
        .args(["-j", "2", "--no-owner", "-d", &dst.name])
        .arg(&file)
        .env("PGPASSWORD", &dst.cluster.owner_password)
        .status()
        .unwrap();
    assert!(dumped.success() && restored.success());
    let baseline_ms = started.elapsed().as_secs_f64() * 1000.0;
    let _ = std::fs::remove_file(&file);

    eprintln!("cutover under pgbench at {rate} tps ...");
    let rated = fence_under_load(scale, &["-R", &rate], "rated");
    eprintln!("cutover under unthrottled pgbench ...");
    let full = fence_under_load(scale, &[], "full");

    println!("## Cutover write downtime (PostgreSQL 12 to 17, pgbench scale {scale}, 4 clients)\n");
    println!("| migration | load | write downtime, s | ratio to dump/restore |");
    println!("|---|---|---|---|");
    println!(
        "| pg_dump -Fc + pg_restore -j 2 (baseline) | writes stopped | {:.2} | 1.000 |",
        baseline_ms / 1000.0
    );
    for (load, (dry, real)) in [(format!("{rate} tps"), rated), ("unthrottled".to_string(), full)] {
        println!(
            "| pgleap cutover (dry run predicted {:.2} s) | {load} | {:.2} | {:.3} |",
            dry / 1000.0,
            real / 1000.0,
            real / baseline_ms
        );
    }
}
