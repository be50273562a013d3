//! One large table keyed by uuid, PostgreSQL 15 to 17: the initial copy by
//! one stream (`--jobs 1`) against the same copy split into ranges of
//! blocks (`--jobs 2`), interleaved, in the same run (not a test: `cargo
//! bench --bench split`; `PGLEAP_BENCH_SPLIT_ROWS`, default 2,000,000;
//! `PGLEAP_BENCH_ROUNDS`, default 3).

mod common;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::time::Instant;

use common::{knob, median_range};
use support::{Pgleap, TestDb, cluster};

/// Seconds for schema copy + initial copy (indexes included) with `jobs`.
fn copy(src: &TestDb, jobs: &str, round: u64) -> f64 {
    let dst = TestDb::new(cluster(17), &format!("splitdst{jobs}r{round}"));
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(src, &dst, &["--all-tables"]);
    let started = Instant::now();
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["kick", "s", "--wait", "3600", "--jobs", jobs]).ok();
    let seconds = started.elapsed().as_secs_f64();
    let count = "select count(*) from doc";
    assert_eq!(dst.sql().value(count), src.sql().value(count));
    p.run(&["teardown", "s"]).ok();
    seconds
}

fn main() {
    let rows = knob("PGLEAP_BENCH_SPLIT_ROWS", 2_000_000);
    let rounds = knob("PGLEAP_BENCH_ROUNDS", 3);
    let src = TestDb::new(cluster(15), "splitsrc");
    eprintln!("loading {rows} rows keyed by uuid into PostgreSQL 15 ...");
    src.sql().exec(&format!(
        "create table doc (id uuid primary key, body text not null);
         insert into doc select md5(g::text)::uuid, repeat(md5(g::text), 3)
         from generate_series(1, {rows}) g;
         analyze doc;"
    ));
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        eprintln!("round {round}: one stream, then two ranges of blocks ...");
        one.push(copy(&src, "1", round));
        two.push(copy(&src, "2", round));
    }
    let (m1, lo1, hi1) = median_range(&one);
    let (m2, lo2, hi2) = median_range(&two);
    println!("## One uuid-keyed table of {rows} rows, PostgreSQL 15 to 17 ({rounds} rounds)\n");
    println!("| initial copy | wall s, median [range] | speed-up over one stream |");
    println!("|---|---|---|");
    println!("| one stream (--jobs 1, baseline) | {m1:.2} [{lo1:.2}–{hi1:.2}] | 1.00 |");
    println!("| block ranges (--jobs 2) | {m2:.2} [{lo2:.2}–{hi2:.2}] | {:.2} |", m1 / m2);
}
