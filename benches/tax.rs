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
//! While the daemon syncs, its lag is sampled from `status` and, once
//! pgbench stops, the time until nothing is pending. Ratios to the same
//! round's no-capture run; median of
//! `PGLEAP_BENCH_ROUNDS` (default 3) with the range. With
//! `PGLEAP_BENCH_BASELINE_BIN=PATH` (another build of pgleap), each round
//! also runs the two capture variants with that build's capture and daemon.

mod common;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{knob, median_range, tps};
use support::{Pgleap, TestDb, cluster, copy_database};

/// The first target's lag (seconds) and pending changes, as status says.
fn lag_and_pending(p: &Pgleap) -> Option<(f64, i64)> {
    let status = p.run(&["status", "s", "--json"]).json_any();
    let target = &status["syncs"][0]["targets"][0];
    Some((target["lag_seconds"].as_f64()?, target["pending"].as_i64()?))
}

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
    // This build, and the baseline build if given: each its own catalog.
    let mut builds = vec![("", Pgleap::for_clusters(&[src.cluster, dst.cluster]))];
    if let Some(bin) = std::env::var_os("PGLEAP_BENCH_BASELINE_BIN") {
        let base = Pgleap::for_clusters(&[src.cluster, dst.cluster]).binary(Path::new(&bin));
        builds.push((", baseline build", base));
    }
    for (_, p) in &builds {
        p.declare(&src, &dst, &["--all-tables"]);
    }
    let mut names = vec!["no capture".to_string()];
    for (label, _) in &builds {
        names.push(format!("capture, nobody applying{label}"));
        names.push(format!("capture, daemon syncing{label}"));
    }
    let mut tps_runs: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut bulk_runs: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut lag_runs: Vec<Vec<f64>> = vec![Vec::new(); builds.len()];
    let mut catch_up: Vec<Vec<f64>> = vec![Vec::new(); builds.len()];
    for round in 1..=rounds {
        for (i, name) in names.iter().enumerate() {
            eprintln!("round {round}: {name} ...");
            if i == 0 {
                tps_runs[0].push(tps(&src, seconds, clients));
                bulk_runs[0].push(bulk(&src));
                continue;
            }
            let (b, syncing) = ((i - 1) / 2, (i - 1) % 2 == 1);
            let p = &builds[b].1;
            if !syncing {
                p.add_sync(&["--onetimecopy", "never"]);
                tps_runs[i].push(tps(&src, seconds, clients));
                bulk_runs[i].push(bulk(&src));
                continue;
            }
            // Caught up first: the daemon's backlog is not the tax.
            p.run(&["kick", "s", "--wait", "600"]).ok();
            p.run(&["start"]).ok();
            // The daemon's lag as status reports it, sampled while pgbench
            // saturates the source, then how long the daemon takes to
            // catch up once the load stops.
            let stop = AtomicBool::new(false);
            let (throughput, samples) = std::thread::scope(|scope| {
                let sampler = scope.spawn(|| {
                    let mut lags = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        if let Some((lag, _)) = lag_and_pending(p) {
                            lags.push(lag);
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    lags
                });
                let throughput = tps(&src, seconds, clients);
                stop.store(true, Ordering::Relaxed);
                (throughput, sampler.join().unwrap())
            });
            let started = Instant::now();
            while lag_and_pending(p).is_none_or(|(_, pending)| pending > 0) {
                assert!(started.elapsed().as_secs() < 600, "the daemon never caught up");
                std::thread::sleep(Duration::from_millis(20));
            }
            catch_up[b].push(started.elapsed().as_secs_f64());
            lag_runs[b].push(median_range(&samples).0);
            tps_runs[i].push(throughput);
            bulk_runs[i].push(bulk(&src));
            p.run(&["kick", "s", "--wait", "600"]).ok();
            p.run(&["stop"]).ok();
            p.run(&["sync", "remove", "s"]).ok();
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
    println!();
    for (b, (label, _)) in builds.iter().enumerate() {
        let (lag, lag_lo, lag_hi) = median_range(&lag_runs[b]);
        let (up, up_lo, up_hi) = median_range(&catch_up[b]);
        println!(
            "Daemon syncing{label}: lag under the load (status every 0.5 s; median of the \
             rounds' medians) {lag:.2} s [{lag_lo:.2}-{lag_hi:.2}], catch-up after it stops \
             {up:.2} s [{up_lo:.2}-{up_hi:.2}]."
        );
    }
}
