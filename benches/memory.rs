//! pgleap's peak memory on large values (not a test: `cargo bench --bench
//! memory`): a table of `PGLEAP_BENCH_VALUES` (default 4) rows holding a
//! `PGLEAP_BENCH_VALUE_MB` (default 64) MB bytea each, PostgreSQL 15 to 17:
//! the initial copy, then a batch after every value was rewritten, each
//! run as `pgleap kick --wait` under `/usr/bin/time`, whose maximum
//! resident set size is the figure. With `PGLEAP_BENCH_BASELINE_BIN`
//! (another build) each round runs that build too; the baseline figure is
//! the same workload's stream size (what one copy of the batch's COPY
//! stream takes: a bytea travels as hex, twice its bytes).

mod common;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::path::PathBuf;

use common::{knob, median_range};
use support::{Pgleap, TestDb, cluster};

/// Peak RSS in MB of `pgleap ARGS`, run by `p` (its binary, its
/// environment) under /usr/bin/time.
fn peak_mb(p: &Pgleap, args: &[&str]) -> f64 {
    let cmd = p.command();
    let mut timed = std::process::Command::new("/usr/bin/time");
    timed.env_clear().arg("-f").arg("%M").arg(cmd.get_program()).args(args);
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            timed.env(k, v);
        }
    }
    let out = timed.output().expect("run /usr/bin/time (Debian's time package)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let kb: f64 = stderr.lines().last().and_then(|l| l.trim().parse().ok()).unwrap();
    kb / 1024.0
}

fn main() {
    let values = knob("PGLEAP_BENCH_VALUES", 4);
    let mb = knob("PGLEAP_BENCH_VALUE_MB", 64);
    let rounds = knob("PGLEAP_BENCH_ROUNDS", 3);
    let src = TestDb::new(cluster(15), "memsrc");
    eprintln!("loading {values} values of {mb} MB into PostgreSQL 15 ...");
    // md5s decoded: incompressible bytes, stored out of line as they
    // come; aggregated as bytea, so a value may come near 1 GB (its hex
    // text would pass the server's 1 GB limit).
    src.sql().exec(&format!(
        "create table big (id int primary key, v bytea not null);
         alter table big alter column v set storage external;
         insert into big select i, (select string_agg(decode(md5((i * 1000000 + g)::text), 'hex'), ''::bytea)
                                    from generate_series(1, {mb} * 65536) g)
         from generate_series(1, {values}) i;"
    ));
    let this = PathBuf::from(Pgleap::new().command().get_program());
    let mut builds = vec![("this build", this)];
    if let Some(bin) = std::env::var_os("PGLEAP_BENCH_BASELINE_BIN") {
        builds.push(("baseline build", PathBuf::from(bin)));
    }
    let mut copy: Vec<Vec<f64>> = vec![Vec::new(); builds.len()];
    let mut batch: Vec<Vec<f64>> = vec![Vec::new(); builds.len()];
    for round in 1..=rounds {
        for (b, (name, bin)) in builds.iter().enumerate() {
            eprintln!("round {round}: {name} ...");
            let dst = TestDb::new(cluster(17), &format!("memdst{b}r{round}"));
            dst.sql().exec("create table big (id int primary key, v bytea not null)");
            let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]).binary(bin);
            p.declare(&src, &dst, &["--all-tables"]);
            p.add_sync(&["--onetimecopy", "always", "--autokick", "off"]);
            copy[b].push(peak_mb(&p, &["kick", "s", "--wait", "600", "--jobs", "1"]));
            src.sql().exec("update big set v = v || '\\x00'::bytea");
            batch[b].push(peak_mb(&p, &["kick", "s", "--wait", "600"]));
            let sums = "select string_agg(md5(v), ',' order by id) from big";
            assert_eq!(dst.sql().value(sums), src.sql().value(sums));
            p.run(&["teardown", "s"]).ok();
        }
    }
    println!(
        "## Peak memory on {values} values of {mb} MB (bytea), PostgreSQL 15 to 17 \
         ({rounds} rounds)\n"
    );
    println!("| build | initial copy, peak RSS MB | batch rewriting every value, peak RSS MB |");
    println!("|---|---|---|");
    for (b, (name, _)) in builds.iter().enumerate() {
        let (c, clo, chi) = median_range(&copy[b]);
        let (t, tlo, thi) = median_range(&batch[b]);
        println!("| {name} | {c:.0} [{clo:.0}-{chi:.0}] | {t:.0} [{tlo:.0}-{thi:.0}] |");
    }
    println!("\nOne value's COPY stream: {} MB (hex, two characters a byte).", 2 * mb);
}
