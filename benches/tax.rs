//! The source's write tax: pgbench throughput and one bulk UPDATE without
//! capture, with capture installed and nobody applying, and with the
//! daemon syncing to a target on the same machine, interleaved in the same
//! run (not a test: `cargo bench --bench tax`).
//!
//! PostgreSQL 12 source by default (pgbench scale `PGLEAP_BENCH_SCALE`, default 10)
//! with wal_level = logical (every variant runs on it, so the WAL that
//! level adds is in the baseline too), 17 target. Each round runs, in order: no capture, capture installed
//! (`sync add`, daemon stopped), capture with the daemon running; pgbench's
//! TPC-B-like script for `PGLEAP_BENCH_SECONDS` (default 20) with
//! `PGLEAP_BENCH_CLIENTS` (default 4), then one UPDATE of every account.
//! While the daemon syncs, its lag is sampled from `status` and, once
//! pgbench stops, the time until nothing is pending. The floors (triggers
//! whose body does nothing, statement- and row-level) run in each round
//! too, and every variant reports the WAL and the source server's CPU time
//! per transaction and per row of the bulk UPDATE. Ratios to the same
//! round's no-capture run; median of
//! `PGLEAP_BENCH_ROUNDS` (default 3) with the range. Capture runs with
//! statement triggers, with row triggers (`--trigger-level row`) and by
//! logical decoding (`--capture decoding`). The catch-up is the time from
//! the load's end until a row written after it is on the target.
//! `PGLEAP_BENCH_CAPTURE` (a comma list of statement, row, decoding,
//! decoding-stream; default the first three) picks the capture variants
//! of this build; decoding-stream is decoding with the daemon streaming
//! the slot (`PGLEAP_DECODING_STREAM=1`, a source of 14 or later).
//! `PGLEAP_BENCH_SOURCE` is the source's major version (default 12). With
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
use support::{Pgleap, TestDb, cluster, copy_database, logical_cluster};

/// The first target's lag (seconds) and pending changes, as status says.
fn lag_and_pending(p: &Pgleap) -> Option<(f64, i64)> {
    let status = p.run(&["status", "s", "--json"]).json_any();
    let target = &status["syncs"][0]["targets"][0];
    Some((target["lag_seconds"].as_f64()?, target["pending"].as_i64()?))
}

/// What the daemon's log says of its rounds since byte `from`: each
/// batch's milliseconds, and each pump's reading the slot and writing the
/// deltas (logged at debug: the bench's daemons run with it).
#[derive(Default)]
struct Rounds {
    batch: Vec<f64>,
    read: Vec<f64>,
    write: Vec<f64>,
}

fn rounds_in_log(p: &Pgleap, from: u64) -> Rounds {
    let log = std::fs::read_to_string(p.home().join("catalog.log")).unwrap_or_default();
    let field = |line: &str, key: &str| -> Option<f64> {
        let at = line.find(&format!(" {key}="))? + key.len() + 2;
        line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    let mut r = Rounds::default();
    for line in log.get(from as usize..).unwrap_or_default().lines() {
        if line.contains("batch applied") {
            r.batch.extend(field(line, "ms"));
        } else if line.contains("pumped") {
            r.read.extend(field(line, "read_ms"));
            r.write.extend(field(line, "write_ms"));
        }
    }
    r
}

fn log_len(p: &Pgleap) -> u64 {
    std::fs::metadata(p.home().join("catalog.log")).map_or(0, |m| m.len())
}

/// What a run cost the source, read before and after it: WAL written
/// (bytes) and the server's CPU time (seconds).
struct Cost {
    wal: i64,
    cpu: f64,
}

fn cost_now(db: &TestDb) -> Cost {
    let lsn = db.sql().value("select pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8");
    Cost { wal: lsn.parse().unwrap(), cpu: db.cluster.cpu_seconds() }
}

impl Cost {
    /// Per unit of work since `before`: (WAL bytes, CPU microseconds).
    fn per(&self, before: &Cost, units: f64) -> (f64, f64) {
        ((self.wal - before.wal) as f64 / units, (self.cpu - before.cpu) * 1e6 / units)
    }
}

/// Seconds for one UPDATE of every account, and its cost per row.
fn bulk(db: &TestDb, rows: f64) -> (f64, (f64, f64)) {
    let before = cost_now(db);
    let started = Instant::now();
    db.sql().exec("update pgbench_accounts set filler = filler");
    let seconds = started.elapsed().as_secs_f64();
    (seconds, cost_now(db).per(&before, rows))
}

/// pgbench's throughput, and its cost per transaction.
fn load(db: &TestDb, seconds: u64, clients: u64) -> (f64, (f64, f64)) {
    let before = cost_now(db);
    let throughput = tps(db, seconds, clients);
    (throughput, cost_now(db).per(&before, throughput * seconds as f64))
}

/// The floors: triggers on the four pgbench tables whose body does nothing,
/// statement triggers with transition tables (as pgleap's capture) or row
/// triggers (as Bucardo's). What any trigger-based capture pays at least.
fn install_floor(db: &TestDb, row: bool) {
    let mut sql = String::from(
        "create function public.bench_floor() returns trigger language plpgsql as
         $$ begin return null; end $$;",
    );
    for table in ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"] {
        for event in ["insert", "update", "delete"] {
            let (level, referencing) = match (row, event) {
                (true, _) => ("row", ""),
                (false, "insert") => ("statement", "referencing new table as n"),
                (false, "update") => ("statement", "referencing new table as n old table as o"),
                (false, _) => ("statement", "referencing old table as o"),
            };
            sql.push_str(&format!(
                "create trigger bench_floor_{event} after {event} on {table} {referencing}
                 for each {level} execute function public.bench_floor();"
            ));
        }
    }
    db.cluster.superuser(&db.name).exec(&sql);
}

fn remove_floor(db: &TestDb) {
    db.cluster.superuser(&db.name).exec("drop function public.bench_floor() cascade");
}

fn main() {
    let scale = knob("PGLEAP_BENCH_SCALE", 10);
    let seconds = knob("PGLEAP_BENCH_SECONDS", 20);
    let clients = knob("PGLEAP_BENCH_CLIENTS", 4);
    let rounds = knob("PGLEAP_BENCH_ROUNDS", 3);
    let major = knob("PGLEAP_BENCH_SOURCE", 12) as u32;
    let src = TestDb::new(logical_cluster(major), "taxsrc");
    let dst = TestDb::new(cluster(17), "taxdst");
    eprintln!("loading pgbench scale {scale} into PostgreSQL {major} ...");
    let out = support::pgbench(&src, &["-i", "-q", "-s", &scale.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    copy_database(&src, &dst);
    // This build, with statement triggers (the default) and with row
    // triggers, and the baseline build if given: each its own catalog.
    let this = || Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let wanted =
        std::env::var("PGLEAP_BENCH_CAPTURE").unwrap_or_else(|_| "statement,row,decoding".into());
    let variants: [(&str, &str, &[&str]); 4] = [
        ("statement", ", statement triggers", &["--capture", "triggers"]),
        ("row", ", row triggers", &["--trigger-level", "row", "--capture", "triggers"]),
        ("decoding", ", logical decoding", &["--capture", "decoding"]),
        ("decoding-stream", ", logical decoding, streamed", &["--capture", "decoding"]),
    ];
    let mut builds: Vec<(&str, Pgleap, &[&str])> = variants
        .into_iter()
        .filter(|(key, _, _)| wanted.split(',').any(|w| w.trim() == *key))
        .map(|(key, label, args)| {
            // The daemon streams the slot, or reads it through the SQL
            // functions (the default).
            let stream = if key == "decoding-stream" { "1" } else { "0" };
            let p = this().env("PGLEAP_LOG", "pgleap=debug");
            (label, p.env("PGLEAP_DECODING_STREAM", stream), args)
        })
        .collect();
    if let Some(bin) = std::env::var_os("PGLEAP_BENCH_BASELINE_BIN") {
        let base = Pgleap::for_clusters(&[src.cluster, dst.cluster])
            .binary(Path::new(&bin))
            .env("PGLEAP_LOG", "pgleap=debug");
        builds.push((", baseline build", base, &[]));
    }
    for (_, p, _) in &builds {
        p.declare(&src, &dst, &["--all-tables"]);
    }
    let mut names = vec![
        "no capture".to_string(),
        "floor: statement triggers with transition tables, empty body".to_string(),
        "floor: row triggers, empty body".to_string(),
    ];
    const FLOORS: usize = 2;
    let rows = (scale * 100_000) as f64;
    for (label, _, _) in &builds {
        names.push(format!("capture, nobody applying{label}"));
        names.push(format!("capture, daemon syncing{label}"));
    }
    let mut tps_runs: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut bulk_runs: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    // Per variant: (WAL bytes, CPU µs) per transaction and per bulk row.
    let mut tx_costs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); names.len()];
    let mut row_costs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); names.len()];
    let mut lag_runs: Vec<Vec<f64>> = vec![Vec::new(); builds.len()];
    let mut catch_up: Vec<Vec<f64>> = vec![Vec::new(); builds.len()];
    let mut daemon_rounds: Vec<Rounds> = (0..builds.len()).map(|_| Rounds::default()).collect();
    for round in 1..=rounds {
        for (i, name) in names.iter().enumerate() {
            eprintln!("round {round}: {name} ...");
            let mut measure = |i: usize| {
                let (t, per_tx) = load(&src, seconds, clients);
                let (b, per_row) = bulk(&src, rows);
                tps_runs[i].push(t);
                bulk_runs[i].push(b);
                tx_costs[i].push(per_tx);
                row_costs[i].push(per_row);
            };
            if i == 0 {
                measure(0);
                continue;
            }
            if i <= FLOORS {
                install_floor(&src, i == 2);
                measure(i);
                remove_floor(&src);
                continue;
            }
            let (b, syncing) = ((i - 1 - FLOORS) / 2, (i - 1 - FLOORS) % 2 == 1);
            let (p, level) = (&builds[b].1, builds[b].2);
            if !syncing {
                p.add_sync(&[&["--onetimecopy", "never"][..], level].concat());
                measure(i);
                continue;
            }
            // Caught up first: the daemon's backlog is not the tax.
            p.run(&["kick", "s", "--wait", "600"]).ok();
            p.run(&["start"]).ok();
            // The daemon's lag as status reports it, sampled while pgbench
            // saturates the source, then how long the daemon takes to
            // catch up once the load stops.
            let stop = AtomicBool::new(false);
            let before = cost_now(&src);
            let logged = log_len(p);
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
            // Caught up when a row written after the load is on the
            // target: a batch whose snapshot sees it sees everything
            // committed before it (status's pending count does not see
            // what a slot holds undecoded).
            let started = Instant::now();
            let marker = format!("after round {round} of {name}");
            src.sql()
                .exec(&format!("update pgbench_tellers set filler = '{marker}' where tid = 1"));
            let applied = "select trim(filler) from pgbench_tellers where tid = 1";
            while dst.sql().value(applied) != marker {
                assert!(started.elapsed().as_secs() < 600, "the daemon never caught up");
                std::thread::sleep(Duration::from_millis(20));
            }
            catch_up[b].push(started.elapsed().as_secs_f64());
            let r = rounds_in_log(p, logged);
            daemon_rounds[b].batch.extend(r.batch);
            daemon_rounds[b].read.extend(r.read);
            daemon_rounds[b].write.extend(r.write);
            lag_runs[b].push(median_range(&samples).0);
            tps_runs[i].push(throughput);
            // The daemon's own reads and purges on the source count: what
            // syncing costs it (through the catch-up after the load).
            tx_costs[i].push(cost_now(&src).per(&before, throughput * seconds as f64));
            let (seconds_bulk, per_row) = bulk(&src, rows);
            bulk_runs[i].push(seconds_bulk);
            row_costs[i].push(per_row);
            p.run(&["kick", "s", "--wait", "600"]).ok();
            p.run(&["stop"]).ok();
            p.run(&["sync", "remove", "s"]).ok();
        }
    }

    println!(
        "## Source write tax, PostgreSQL {major} (scale {scale}, {clients} clients, {seconds} s) \
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
    // What a DBA sizes a source with: machine-independent WAL, and the
    // source server's CPU (this machine's), added over no capture.
    println!(
        "| capture | WAL per transaction, bytes | CPU per transaction, µs | WAL per bulk row, \
         bytes | CPU per bulk row, µs |"
    );
    println!("|---|---|---|---|---|");
    let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        median_range(&v.iter().map(f).collect::<Vec<_>>()).0
    };
    for (i, name) in names.iter().enumerate() {
        let (w, c) = (med(&tx_costs[i], |x| x.0), med(&tx_costs[i], |x| x.1));
        let (rw, rc) = (med(&row_costs[i], |x| x.0), med(&row_costs[i], |x| x.1));
        let (w0, c0) = (med(&tx_costs[0], |x| x.0), med(&tx_costs[0], |x| x.1));
        let (rw0, rc0) = (med(&row_costs[0], |x| x.0), med(&row_costs[0], |x| x.1));
        println!(
            "| {name} | {w:.0} ({:+.0}) | {c:.0} ({:+.0}) | {rw:.0} ({:+.0}) | {rc:.2} ({:+.2}) |",
            w - w0,
            c - c0,
            rw - rw0,
            rc - rc0
        );
    }
    println!();
    for (b, (label, _, _)) in builds.iter().enumerate() {
        let (lag, lag_lo, lag_hi) = median_range(&lag_runs[b]);
        let (up, up_lo, up_hi) = median_range(&catch_up[b]);
        println!(
            "Daemon syncing{label}: lag under the load (status every 0.5 s; median of the \
             rounds' medians) {lag:.2} s [{lag_lo:.2}-{lag_hi:.2}], catch-up after it stops \
             {up:.2} s [{up_lo:.2}-{up_hi:.2}]."
        );
        // Where the daemon's round goes (every round of every run pooled):
        // the batch, and for decoding the pump's two steps inside it.
        let r = &daemon_rounds[b];
        let ms = |v: &[f64]| {
            if v.is_empty() {
                return "-".to_string();
            }
            let mut sorted = v.to_vec();
            sorted.sort_by(f64::total_cmp);
            let (median, p90) = (sorted[sorted.len() / 2], sorted[sorted.len() * 9 / 10]);
            format!("{median:.0} ms (p90 {p90:.0})")
        };
        println!(
            "  {} batches, each {}; {} pumps, reading the slot {}, writing the deltas {}.",
            r.batch.len(),
            ms(&r.batch),
            r.read.len(),
            ms(&r.read),
            ms(&r.write)
        );
    }
}
