//! The source's write tax: pgbench throughput and one bulk UPDATE without
//! capture, with capture installed and nobody applying, and with the
//! daemon syncing to a target on the same machine, interleaved in the same
//! run (not a test: `cargo bench --bench tax`).
//!
//! PostgreSQL 12 source (pgbench scale `PGLEAP_BENCH_SCALE`, default 10),
//! 17 target. Each round runs, in order: no capture, capture installed
//! (`sync add`, daemon stopped), capture with the daemon running; pgbench's
//! TPC-B-like script for `PGLEAP_BENCH_SECONDS` (default 20) with
//! `PGLEAP_BENCH_CLIENTS` (default 4), then one UPDATE of every account.
//! Ratios to the same round's no-capture run; median of
//! `PGLEAP_BENCH_ROUNDS` (default 3) with the range.

mod common;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::time::Instant;

use common::{knob, median_range, tps};
use support::{Pgleap, TestDb, cluster, copy_database};

/// Seconds for one UPDATE of every account.
fn bulk(db: &TestDb) -> f64 {
    let started = Instant::now();
    db.sql().exec("update pgbench_accounts set filler = filler");
    started.elapsed().as_secs_f64()
}

fn main() {
    let scale = knob("PGLEAP_BENCH_SCALE", 10);
    let seconds = knob("PGLEAP_BENCH_SECONDS", 20);
    let clients = knob("PGLEAP_BENCH_CLIENTS", 4);
    let rounds = knob("PGLEAP_BENCH_ROUNDS", 3);
    let src = TestDb::new(cluster(12), "taxsrc");
    let dst = TestDb::new(cluster(17), "taxdst");
    eprintln!("loading pgbench scale {scale} into PostgreSQL 12 ...");
    let out = support::pgbench(&src, &["-i", "-q", "-s", &scale.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    copy_database(&src, &dst);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);

    let names = ["no capture", "capture, nobody applying", "capture, daemon syncing"];
    let mut tps_runs: [Vec<f64>; 3] = Default::default();
    let mut bulk_runs: [Vec<f64>; 3] = Default::default();
    for round in 1..=rounds {
        for (i, name) in names.iter().enumerate() {
            eprintln!("round {round}: {name} ...");
            match i {
                1 => p.add_sync(&["--onetimecopy", "never"]),
                2 => {
                    // Caught up first: the daemon's backlog is not the tax.
                    p.run(&["kick", "s", "--wait", "600"]).ok();
                    p.run(&["start"]).ok();
                }
                _ => {}
            }
            tps_runs[i].push(tps(&src, seconds, clients));
            bulk_runs[i].push(bulk(&src));
            if i == 2 {
                p.run(&["kick", "s", "--wait", "600"]).ok();
                p.run(&["stop"]).ok();
                p.run(&["sync", "remove", "s"]).ok();
            }
        }
    }

    println!(
        "## Source write tax, PostgreSQL 12 (scale {scale}, {clients} clients, {seconds} s) \
         to 17 ({rounds} rounds)\n"
    );
    println!(
        "| capture | pgbench tps, median [range] | tps ratio | UPDATE of every account, s | time ratio |"
    );
    println!("|---|---|---|---|---|");
    for (i, name) in names.iter().enumerate() {
        let (t, tlo, thi) = median_range(&tps_runs[i]);
        let (b, blo, bhi) = median_range(&bulk_runs[i]);
        let tr: Vec<f64> = tps_runs[i].iter().zip(&tps_runs[0]).map(|(a, b)| a / b).collect();
        let br: Vec<f64> = bulk_runs[i].iter().zip(&bulk_runs[0]).map(|(a, b)| a / b).collect();
        let (trm, trlo, trhi) = median_range(&tr);
        let (brm, brlo, brhi) = median_range(&br);
        println!(
            "| {name} | {t:.0} [{tlo:.0}-{thi:.0}] | {trm:.2} [{trlo:.2}-{trhi:.2}] | \
             {b:.2} [{blo:.2}-{bhi:.2}] | {brm:.2} [{brlo:.2}-{brhi:.2}] |"
        );
    }
}
