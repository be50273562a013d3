//! Backlog apply rate against COPY, interleaved in the same run (not a
//! test: `cargo bench --bench apply`).
//!
//! PostgreSQL 12 source, 17 target, pgbench_accounts of
//! `PGLEAP_BENCH_APPLY_ROWS` rows (default 1,000,000). Each round:
//!
//! 1. updated: every row updated on the source (one UPDATE), applied by
//!    `pgleap kick --wait`;
//! 2. mixed: a third of the rows deleted, a third updated, as many new rows
//!    inserted, applied the same way;
//! 3. baseline: the same number of rows COPYed from the source into an
//!    empty table with the same primary key on the target (`psql \copy`
//!    out, piped into `\copy` in).
//!
//! Rows per second of each, as a ratio to the baseline's; median of
//! `PGLEAP_BENCH_ROUNDS` rounds (default 3) with the range. Apply timings
//! per step are in the debug log (`PGLEAP_BENCH_LOG=1` prints them).

mod common;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::time::Instant;

use common::{knob, median_range};
use support::{OWNER, Pgleap, TestDb, cluster, copy_database, tool};

/// Seconds for `kick --wait` to apply what the source holds now.
fn kick(p: &Pgleap) -> f64 {
    let started = Instant::now();
    let out = p.run(&["kick", "s", "--wait", "3600"]);
    let secs = started.elapsed().as_secs_f64();
    if std::env::var_os("PGLEAP_BENCH_LOG").is_some() {
        eprintln!("{out}");
    }
    out.ok();
    secs
}

fn psql(db: &TestDb, command: &str) -> std::process::Command {
    let mut cmd = tool("psql");
    cmd.args(["-h", "127.0.0.1", "-U", OWNER, "-p", &db.cluster.port.to_string(), "-d", &db.name])
        .args(["-c", command])
        .env("PGPASSWORD", &db.cluster.owner_password);
    cmd
}

/// Seconds to COPY `rows` accounts into an empty table with a primary key.
fn copy_baseline(src: &TestDb, dst: &TestDb, rows: u64) -> f64 {
    dst.sql().exec(
        "drop table if exists copy_baseline;
         create table copy_baseline (like pgbench_accounts including all);",
    );
    let started = Instant::now();
    let mut out =
        psql(src, &format!("\\copy (select * from pgbench_accounts limit {rows}) to stdout"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let status = psql(dst, "\\copy copy_baseline from stdin")
        .stdin(out.stdout.take().unwrap())
        .status()
        .unwrap();
    assert!(status.success() && out.wait().unwrap().success());
    started.elapsed().as_secs_f64()
}

fn equal(src: &TestDb, dst: &TestDb) {
    let digest = "select md5(string_agg(a::text, ',' order by aid)) from pgbench_accounts a";
    assert_eq!(src.sql().value(digest), dst.sql().value(digest), "target differs after apply");
}

fn main() {
    let rows = knob("PGLEAP_BENCH_APPLY_ROWS", 1_000_000);
    let rounds = knob("PGLEAP_BENCH_ROUNDS", 3);
    let src = TestDb::new(cluster(12), "applysrc");
    let dst = TestDb::new(cluster(17), "applydst");
    let scale = rows.div_ceil(100_000);
    eprintln!("loading pgbench scale {scale} into PostgreSQL 12 ...");
    let out = support::pgbench(&src, &["-i", "-q", "-s", &scale.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    src.sql().exec(&format!("delete from pgbench_accounts where aid > {rows}"));
    src.sql().exec("vacuum analyze pgbench_accounts");
    copy_database(&src, &dst);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]).env("PGLEAP_LOG", "pgleap=debug");
    p.declare(&src, &dst, &["--table", "pgbench_accounts"]);
    p.add_sync(&["--onetimecopy", "never", "--autokick", "off"]);
    kick(&p);

    let (mut updated, mut mixed, mut baseline) = (Vec::new(), Vec::new(), Vec::new());
    let mut next = rows + 1;
    for round in 1..=rounds {
        eprintln!("round {round}: {rows} updated rows ...");
        src.sql().exec("update pgbench_accounts set abalance = abalance + 1");
        updated.push(rows as f64 / kick(&p));
        equal(&src, &dst);

        eprintln!("round {round}: {rows} mixed changes ...");
        let third = rows / 3;
        src.sql().exec(&format!(
            "delete from pgbench_accounts where aid % 3 = 0;
             update pgbench_accounts set abalance = abalance - 1 where aid % 3 = 1;
             insert into pgbench_accounts (aid, bid, abalance, filler)
             select g, 1, 0, 'new' from generate_series({next}, {}) g;",
            next + third - 1
        ));
        next += third;
        mixed.push(rows as f64 / kick(&p));
        equal(&src, &dst);

        eprintln!("round {round}: COPY of {rows} rows ...");
        baseline.push(rows as f64 / copy_baseline(&src, &dst, rows));
        src.sql().exec("vacuum pgbench_accounts");
        dst.sql().exec("vacuum pgbench_accounts");
    }
    p.run(&["sync", "remove", "s"]).ok();

    let (b, blo, bhi) = median_range(&baseline);
    println!("## Backlog apply, PostgreSQL 12 to 17, {rows} rows ({rounds} rounds)\n");
    println!("| method | rows/s, median [range] | ratio to COPY, median [range] |");
    println!("|---|---|---|");
    for (name, runs) in [("updated keys", &updated), ("mixed insert/update/delete", &mixed)] {
        let (m, lo, hi) = median_range(runs);
        let ratios: Vec<f64> = runs.iter().zip(&baseline).map(|(r, b)| r / b).collect();
        let (rm, rlo, rhi) = median_range(&ratios);
        println!(
            "| pgleap kick --wait, {name} | {m:.0} [{lo:.0}-{hi:.0}] | {rm:.2} [{rlo:.2}-{rhi:.2}] |"
        );
    }
    println!("| COPY into a table with its primary key | {b:.0} [{blo:.0}-{bhi:.0}] | 1.00 |");
}
