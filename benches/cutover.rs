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
//!
//! Client-visible outage: a probe client writing at 200 TPS and one writing
//! as fast as it can record every write's time and outcome, while a
//! database at the same scale is cut over and rolled back through a real
//! PgBouncer, and cut over with the fence alone (clients connected to the
//! old server directly: they get the fence's error until repointed). The
//! figure is the longest gap between two acknowledged writes, and the
//! number of client errors.
//!
//! Size axis: with `PGLEAP_BENCH_SCALES=10,100,300` only the fence under
//! the fixed-rate load is measured, at each of those scales, and the table
//! gives the slope of the write downtime per 100 scale units (1.5 GB):
//! nothing inside the fence may grow with the data (#28).
//!
//! Database axis (#25): with `PGLEAP_BENCH_DATABASES=1,3,10` only the
//! fence of a server move is measured: that many pgbench databases, scale
//! one each, on one PostgreSQL 12 server, each under pgbench at the rate
//! divided among them, moved to 17 by one `upgrade --databases ...` with
//! one fence; the baseline, in the same round, is the same databases moved
//! one `upgrade` each (the only way before), whose fences add up and whose
//! switches are spread over the whole run.
//!
//! `PGLEAP_BENCH_ROUNDS` (default 3) interleaved rounds; each figure is the
//! median with the range. With `PGLEAP_BENCH_BASELINE_BIN=PATH` (another
//! build of pgleap, e.g. the previous commit's), every cutover is also run
//! with that binary in the same round, so a change to the fence path is
//! measured against what it replaced.

#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::pooler::{APP_USER, Bouncer, Probe, ProbeLog, app_role};
use support::{OWNER, Pgleap, TestDb, cluster, finish, pgbench, tool};

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Returns (predicted ms, measured ms).
fn fence_under_load(scale: u64, load: &[&str], label: &str, bin: Option<&Path>) -> (f64, f64) {
    let src = TestDb::new(cluster(12), &format!("fence{label}src"));
    let dst = TestDb::new(cluster(17), &format!("fence{label}dst"));
    finish(pgbench(&src, &["-i", "-q", "-s", &scale.to_string()]).spawn().unwrap());
    let mut p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    if let Some(bin) = bin {
        p = p.binary(bin);
    }
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
    // Order-independent and bounded at any scale (a string_agg of scale
    // 300's 30M rows passes 1 GB).
    let digest = "select count(*), sum(('x' || substr(md5(a::text), 1, 15))::bit(60)::int8)
                  from pgbench_accounts a";
    assert_eq!(src.sql().value(digest), dst.sql().value(digest));
    p.run(&["teardown", "s"]).ok();
    let (predicted, measured) =
        (dry["fence_ms"].as_f64().unwrap(), real["fence_ms"].as_f64().unwrap());
    let steps = |r: &serde_json::Value| {
        let steps = r["inside_fence"].as_array().cloned().unwrap_or_default();
        let step = |s: &serde_json::Value| format!("{} {}", s["step"], s["ms"]);
        steps.iter().map(step).collect::<Vec<_>>().join(", ")
    };
    eprintln!("  scale {scale}: fence {measured} ms (predicted {predicted} ms)");
    eprintln!("    inside the fence: {}", steps(&real));
    eprintln!("    predicted: {}", steps(&dry));
    (predicted, measured)
}

/// What the probe clients saw during one switch: the longest gap between
/// acknowledged writes (ms, the worse of the two clients), their errors,
/// and the fence pgleap reported (ms).
#[derive(Clone, Copy, Default)]
struct Outage {
    gap_ms: f64,
    errors: usize,
    fence_ms: f64,
}

fn outage(logs: &[&ProbeLog], from: Instant, to: Instant, report: &serde_json::Value) -> Outage {
    Outage {
        gap_ms: logs
            .iter()
            .map(|l| l.longest_gap(from, to).as_secs_f64() * 1000.0)
            .fold(0.0, f64::max),
        errors: logs
            .iter()
            .map(|l| l.errors.iter().filter(|(t, _)| *t >= from && *t <= to).count())
            .sum(),
        fence_ms: report["fence_ms"].as_f64().unwrap_or(0.0),
    }
}

/// A database at `scale` synced 12 -> 17 with the probes writing; returns
/// (cutover, rollback) through PgBouncer, or (cutover, nothing) with the
/// fence alone.
fn client_outage(scale: u64, through_pooler: bool) -> (Outage, Option<Outage>) {
    let label = if through_pooler { "bouncer" } else { "fenceonly" };
    let src = TestDb::new(cluster(12), &format!("outage{label}src"));
    let dst = TestDb::new(cluster(17), &format!("outage{label}dst"));
    finish(pgbench(&src, &["-i", "-q", "-s", &scale.to_string()]).spawn().unwrap());
    app_role(&src);
    app_role(&dst);
    let probe_table = format!(
        "create table if not exists probe (id bigserial primary key, client int not null);
         grant select, insert on probe to {APP_USER};
         grant usage on sequence probe_id_seq to {APP_USER};"
    );
    src.sql().exec(&probe_table);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    dst.sql().exec(&probe_table);
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["kick", "s", "--wait", "600", "--jobs", "2"]).ok();
    p.run(&["start"]).ok();
    let bouncer = Bouncer::start(&src);
    let (port, db) = match through_pooler {
        true => (bouncer.port, "app".to_string()),
        false => (src.cluster.port, src.name.clone()),
    };
    let rated = Probe::start(port, &db, 1, Some(Duration::from_millis(5)));
    let flat = Probe::start(port, &db, 2, None);
    std::thread::sleep(Duration::from_secs(3));
    let admin = bouncer.admin();
    let mut switch = vec!["--json", "--max-lag", "1"];
    if through_pooler {
        switch.extend(["--pgbouncer", admin.as_str(), "--pgbouncer-db", "app"]);
    }
    let cut_at = Instant::now();
    let mut args = vec!["cutover", "s", "--rollback-sync", "back"];
    args.extend(&switch);
    let cut = p.run(&args).json();
    std::thread::sleep(Duration::from_secs(3));
    let back_at = Instant::now();
    let back = through_pooler.then(|| {
        let mut args = vec!["rollback", "s"];
        args.extend(&switch);
        let report = p.run(&args).json();
        std::thread::sleep(Duration::from_secs(3));
        report
    });
    let done_at = Instant::now();
    let (rated, flat) = (rated.finish(), flat.finish());
    p.run(&["stop"]).ok();
    let logs = [&rated, &flat];
    (outage(&logs, cut_at, back_at, &cut), back.map(|b| outage(&logs, back_at, done_at, &b)))
}

/// Median and range of a series, formatted in seconds from milliseconds.
fn seconds(ms: &[f64]) -> String {
    let mut v = ms.to_vec();
    v.sort_by(f64::total_cmp);
    format!("{:.2} [{:.2}–{:.2}]", v[v.len() / 2] / 1000.0, v[0] / 1000.0, v[v.len() - 1] / 1000.0)
}

fn median(ms: &[f64]) -> f64 {
    let mut v = ms.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Write downtime of `pg_dump -Fc` + `pg_restore -j 2`, in ms.
fn dump_restore(scale: u64) -> f64 {
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
    let _ = std::fs::remove_file(&file);
    started.elapsed().as_secs_f64() * 1000.0
}

fn main() {
    let scale = knob("PGLEAP_BENCH_SCALE", 10);
    let rate = knob("PGLEAP_BENCH_RATE", 200).to_string();
    let rounds = knob("PGLEAP_BENCH_ROUNDS", 3);
    let baseline_bin = std::env::var_os("PGLEAP_BENCH_BASELINE_BIN").map(PathBuf::from);
    let mut bins: Vec<(&str, Option<&Path>)> = vec![("this build", None)];
    if let Some(b) = &baseline_bin {
        bins.push(("baseline build", Some(b.as_path())));
    }
    if let Ok(counts) = std::env::var("PGLEAP_BENCH_DATABASES") {
        let counts: Vec<usize> = counts.split(',').map(|s| s.trim().parse().unwrap()).collect();
        return fence_by_databases(&counts, &rate, rounds);
    }
    if let Ok(scales) = std::env::var("PGLEAP_BENCH_SCALES") {
        let scales: Vec<u64> = scales.split(',').map(|s| s.trim().parse().unwrap()).collect();
        return fence_by_size(&scales, &rate, rounds, &bins);
    }
    let loads: [(String, Vec<&str>); 2] =
        [(format!("{rate} tps"), vec!["-R", &rate]), ("unthrottled".to_string(), vec![])];

    let mut dump_ms = Vec::new();
    let mut pooled: Vec<(Outage, Outage)> = Vec::new();
    let mut fenced: Vec<Outage> = Vec::new();
    // (load, binary) -> (predicted, measured) per round.
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); loads.len() * bins.len()];
    for round in 1..=rounds {
        eprintln!("round {round}: pg_dump -Fc + pg_restore -j 2 of pgbench scale {scale} ...");
        dump_ms.push(dump_restore(scale));
        eprintln!("round {round}: cutover and rollback through PgBouncer, probes writing ...");
        let (cut, back) = client_outage(scale, true);
        pooled.push((cut, back.unwrap()));
        eprintln!("round {round}: cutover with the fence alone, probes writing ...");
        fenced.push(client_outage(scale, false).0);
        for (l, (load, args)) in loads.iter().enumerate() {
            for (b, (bin_label, bin)) in bins.iter().enumerate() {
                eprintln!("round {round}: cutover under pgbench at {load} ({bin_label}) ...");
                let label = format!("l{l}b{b}");
                runs[l * bins.len() + b].push(fence_under_load(scale, args, &label, *bin));
            }
        }
    }

    let baseline = median(&dump_ms);
    println!(
        "## Cutover write downtime (PostgreSQL 12 to 17, pgbench scale {scale}, 4 clients, \
         median [range] of {rounds} interleaved rounds)\n"
    );
    println!("| migration | load | write downtime, s | ratio to dump/restore |");
    println!("|---|---|---|---|");
    println!(
        "| pg_dump -Fc + pg_restore -j 2 (baseline) | writes stopped | {} | 1.000 |",
        seconds(&dump_ms)
    );
    for (l, (load, _)) in loads.iter().enumerate() {
        for (b, (bin_label, _)) in bins.iter().enumerate() {
            let series = &runs[l * bins.len() + b];
            let dry: Vec<f64> = series.iter().map(|r| r.0).collect();
            let real: Vec<f64> = series.iter().map(|r| r.1).collect();
            println!(
                "| pgleap cutover, {bin_label} (dry run predicted {}) | {load} | {} | {:.3} |",
                seconds(&dry),
                seconds(&real),
                median(&real) / baseline
            );
        }
    }

    println!(
        "\n## Client-visible outage (probes at 200 TPS and flat out; median [range] of {rounds} rounds)\n"
    );
    println!("| switch | longest gap between acknowledged writes, s | client errors | fence, s |");
    println!("|---|---|---|---|");
    println!(
        "| pg_dump -Fc + pg_restore -j 2 (baseline) | {} (writes stopped) | every write | |",
        seconds(&dump_ms)
    );
    let row = |label: &str, runs: &[Outage]| {
        let gaps: Vec<f64> = runs.iter().map(|o| o.gap_ms).collect();
        let fences: Vec<f64> = runs.iter().map(|o| o.fence_ms).collect();
        let errors: Vec<String> = runs.iter().map(|o| o.errors.to_string()).collect();
        println!("| {label} | {} | {} | {} |", seconds(&gaps), errors.join(", "), seconds(&fences));
    };
    row("cutover through PgBouncer", &pooled.iter().map(|r| r.0).collect::<Vec<_>>());
    row("rollback through PgBouncer", &pooled.iter().map(|r| r.1).collect::<Vec<_>>());
    row("cutover, fence alone (clients not repointed, 3 s window)", &fenced);
}

/// The fence at each scale, under pgbench at `rate` tps, each binary in
/// every round; the slope is a least-squares line through the medians.
fn fence_by_size(scales: &[u64], rate: &str, rounds: u64, bins: &[(&str, Option<&Path>)]) {
    // (scale, binary) -> (predicted, measured) per round.
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); scales.len() * bins.len()];
    for round in 1..=rounds {
        for (i, scale) in scales.iter().enumerate() {
            for (b, (bin_label, bin)) in bins.iter().enumerate() {
                eprintln!("round {round}: cutover at scale {scale}, {rate} tps ({bin_label}) ...");
                let label = format!("s{i}b{b}");
                runs[i * bins.len() + b].push(fence_under_load(
                    *scale,
                    &["-R", rate],
                    &label,
                    *bin,
                ));
            }
        }
    }
    println!(
        "## Write downtime by database size (PostgreSQL 12 to 17, pgbench at {rate} tps, 4 \
         clients, median [range] of {rounds} interleaved rounds)\n"
    );
    println!(
        "| build | scale | write downtime, s | dry run predicted, s | ratio to smallest scale |"
    );
    println!("|---|---|---|---|---|");
    for (b, (bin_label, _)) in bins.iter().enumerate() {
        let medians: Vec<f64> =
            (0..scales.len()).map(|i| median(&measured(&runs[i * bins.len() + b]))).collect();
        for (i, scale) in scales.iter().enumerate() {
            let series = &runs[i * bins.len() + b];
            let dry: Vec<f64> = series.iter().map(|r| r.0).collect();
            println!(
                "| {bin_label} | {scale} | {} | {} | {:.2} |",
                seconds(&measured(series)),
                seconds(&dry),
                medians[i] / medians[0]
            );
        }
        let xs: Vec<f64> = scales.iter().map(|s| *s as f64).collect();
        println!(
            "| {bin_label} | slope | {:.3} s per 100 scale units | | |",
            slope(&xs, &medians) / 10.0
        );
    }
}

fn measured(series: &[(f64, f64)]) -> Vec<f64> {
    series.iter().map(|r| r.1).collect()
}

/// Least-squares slope of `ys` (ms) over `xs`.
fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let num: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}

/// `n` pgbench databases on the shared 12 server, each under pgbench at
/// `rate / n` tps; returns (server move's one fence, sum of the fences of
/// one upgrade per database), in ms.
fn server_fences(n: usize, rate: u64, round: u64) -> (f64, f64) {
    let mut fences = (0.0, 0.0);
    for one_by_one in [false, true] {
        let label = format!("srv{n}r{round}{}", if one_by_one { "each" } else { "all" });
        let dbs: Vec<TestDb> =
            (0..n).map(|i| TestDb::new(cluster(12), &format!("{label}d{i}"))).collect();
        for db in &dbs {
            finish(pgbench(db, &["-i", "-q", "-s", "1"]).spawn().unwrap());
        }
        let per_db = (rate as usize / n).max(1).to_string();
        let mut loads: Vec<_> = dbs
            .iter()
            .map(|db| pgbench(db, &["-n", "-c", "1", "-R", &per_db, "-T", "900"]).spawn().unwrap())
            .collect();
        let (src, dst) = (cluster(12), cluster(17));
        let p = Pgleap::for_clusters(&[src, dst]);
        let server =
            |c: &support::Cluster| format!("postgresql://{OWNER}@127.0.0.1:{}/postgres", c.port);
        let downtime = |out: &str, prefix: &str| -> f64 {
            let line = out.lines().find(|l| l.starts_with(prefix)).expect(prefix);
            line[prefix.len()..].split(' ').next().unwrap().parse::<f64>().unwrap() * 1000.0
        };
        if one_by_one {
            // A single upgrade moves into a database that exists.
            for db in &dbs {
                dst.superuser("postgres")
                    .exec(&format!("create database \"{}\" owner {OWNER}", db.name));
            }
            let mut sum = 0.0;
            for db in &dbs {
                let out = p.run(&[
                    "upgrade",
                    "--source",
                    &db.uri(),
                    "--target",
                    &format!("postgresql://{OWNER}@127.0.0.1:{}/{}", dst.port, db.name),
                    "--name",
                    &db.name,
                    "--cutover",
                    "auto",
                    "--max-lag",
                    "1",
                ]);
                if out.code != 0 {
                    panic!("{out}");
                }
                sum += downtime(&out.stdout, "write downtime: ");
            }
            fences.1 = sum;
        } else {
            let names: Vec<&str> = dbs.iter().map(|d| d.name.as_str()).collect();
            let out = p.run(&[
                "upgrade",
                "--source",
                &server(src),
                "--target",
                &server(dst),
                "--databases",
                &names.join(","),
                "--cutover",
                "auto",
                "--max-lag",
                "1",
            ]);
            if out.code != 0 {
                panic!("{out}");
            }
            fences.0 = downtime(&out.stdout, "write downtime of the server: ");
        }
        for l in &mut loads {
            let _ = l.kill();
            let _ = l.wait();
        }
        let admin = dst.superuser("postgres");
        for db in &dbs {
            let _ = admin.try_exec(&format!(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = '{0}';
                 drop database if exists \"{0}\"",
                db.name
            ));
        }
    }
    eprintln!("  {n} databases: one fence {:.0} ms, {n} fences {:.0} ms", fences.0, fences.1);
    fences
}

/// The server move's fence for each number of databases, against one
/// upgrade per database, interleaved.
fn fence_by_databases(counts: &[usize], rate: &str, rounds: u64) {
    let rate: u64 = rate.parse().unwrap();
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); counts.len()];
    for round in 1..=rounds {
        for (i, n) in counts.iter().enumerate() {
            eprintln!("round {round}: {n} databases, {rate} tps among them ...");
            runs[i].push(server_fences(*n, rate, round));
        }
    }
    println!(
        "## Write downtime of a server move by number of databases (PostgreSQL 12 to 17, \
         pgbench scale 1 each, {rate} tps among them, median [range] of {rounds} interleaved \
         rounds)\n"
    );
    println!(
        "| databases | one upgrade --databases: one fence, s | one upgrade each: fences added, s | ratio |"
    );
    println!("|---|---|---|---|");
    for (i, n) in counts.iter().enumerate() {
        let one: Vec<f64> = runs[i].iter().map(|r| r.0).collect();
        let each: Vec<f64> = runs[i].iter().map(|r| r.1).collect();
        println!(
            "| {n} | {} | {} | {:.2} |",
            seconds(&one),
            seconds(&each),
            median(&one) / median(&each)
        );
    }
}
