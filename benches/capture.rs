//! Capture overhead and apply rate, measured against baselines in the same
//! run (not a test: `cargo bench --bench capture`).
//!
//! 1. Source write throughput: pgbench's TPC-B-like script against a
//!    PostgreSQL 12 source, without capture, with pgleap's capture
//!    (statement-level triggers with transition tables), and, for
//!    comparison, with the row-level trigger design and with a NOTIFY per
//!    statement (Bucardo's autokick), each as a ratio to the baseline.
//! 2. Apply rate: a backlog of changed rows (one UPDATE of up to a million
//!    accounts) applied by `pgleap kick --wait` to a PostgreSQL 17 target,
//!    against a plain COPY of the same rows from source to target.
//!
//! Knobs: PGLEAP_BENCH_SCALE (pgbench scale, default 10 = 1M accounts),
//! PGLEAP_BENCH_SECONDS (per pgbench run, default 20), PGLEAP_BENCH_CLIENTS
//! (default 4). The servers are the test harness's: fsync is off, so the
//! numbers show CPU and lock costs, not disk.

mod common;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::time::Instant;

use common::{knob, tps};
use support::{OWNER, Pgleap, TestDb, cluster, copy_database, tool};

/// Row-level capture, as Bucardo does it: one trigger call and one delta
/// insert per row. Optionally with a NOTIFY per statement.
fn install_row_capture(db: &TestDb, notify: bool) {
    let mut sql = String::from("create schema bench_capture;");
    for (table, key) in
        [("pgbench_accounts", "aid"), ("pgbench_branches", "bid"), ("pgbench_tellers", "tid")]
    {
        sql.push_str(&format!(
            "create table bench_capture.{table} (txid int8, {key} int);
             create function bench_capture.{table}() returns trigger language plpgsql as $$
             begin
                 if tg_op <> 'INSERT' then
                     insert into bench_capture.{table} values (txid_current(), old.{key});
                 end if;
                 if tg_op <> 'DELETE' then
                     insert into bench_capture.{table} values (txid_current(), new.{key});
                 end if;
                 return null;
             end $$;
             create trigger bench_row after insert or update or delete on {table}
                 for each row execute function bench_capture.{table}();"
        ));
        if notify {
            sql.push_str(&format!(
                "create function bench_capture.{table}_kick() returns trigger language plpgsql as
                 $$ begin perform pg_notify('bench_kick', ''); return null; end $$;
                 create trigger bench_kick after insert or update or delete on {table}
                     for each statement execute function bench_capture.{table}_kick();"
            ));
        }
    }
    db.sql().exec(&sql);
}

fn remove_row_capture(db: &TestDb) {
    let mut sql = String::new();
    for table in ["pgbench_accounts", "pgbench_branches", "pgbench_tellers"] {
        sql.push_str(&format!(
            "drop trigger if exists bench_row on {table}; drop trigger if exists bench_kick on {table};"
        ));
    }
    sql.push_str("drop schema bench_capture cascade;");
    db.sql().exec(&sql);
}

fn declare(p: &Pgleap, src: &TestDb, dst: &TestDb) {
    let rg = ["--all-tables", "--all-sequences", "--exclude-table", "public.pgbench_history"];
    p.declare(src, dst, &rg);
}

fn add_sync(p: &Pgleap) {
    p.add_sync(&["--onetimecopy", "never", "--autokick", "off"]);
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let scale = knob("PGLEAP_BENCH_SCALE", 10);
    let seconds = knob("PGLEAP_BENCH_SECONDS", 20);
    let clients = knob("PGLEAP_BENCH_CLIENTS", 4);
    let src = TestDb::new(cluster(12), "benchsrc");
    let dst = TestDb::new(cluster(17), "benchdst");
    eprintln!("loading pgbench scale {scale} into PostgreSQL 12 ...");
    let out = support::pgbench(&src, &["-i", "-q", "-s", &scale.to_string()]).output().unwrap();
    assert!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    // A table without a key, for the whole-row apply rate.
    src.sql().exec("create table bench_keyless (n int, v text)");
    copy_database(&src, &dst);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    declare(&p, &src, &dst);

    let bulk_rows = (scale * 100_000).min(1_000_000);
    // One statement changing many rows: where per-row triggers pay most.
    let bulk = || {
        let started = Instant::now();
        src.sql()
            .exec(&format!("update pgbench_accounts set filler = filler where aid <= {bulk_rows}"));
        started.elapsed().as_secs_f64()
    };
    eprintln!("pgbench without capture ...");
    let baseline = (tps(&src, seconds, clients), bulk());
    add_sync(&p);
    eprintln!("pgbench with pgleap capture ...");
    let statement = (tps(&src, seconds, clients), bulk());
    p.run(&["kick", "s", "--wait", "600"]).ok();
    p.run(&["sync", "remove", "s"]).ok();
    install_row_capture(&src, false);
    eprintln!("pgbench with row-level capture ...");
    let row = (tps(&src, seconds, clients), bulk());
    remove_row_capture(&src);
    install_row_capture(&src, true);
    eprintln!("pgbench with row-level capture and a NOTIFY per statement ...");
    let notify = (tps(&src, seconds, clients), bulk());
    remove_row_capture(&src);

    // Apply: a backlog of changed rows, then one kick. The target was
    // equal before (pgbench writes went through the sync above, and the
    // row-capture runs' changes are caught up by re-copying).
    dst.sql().exec("drop schema public cascade; create schema public;");
    copy_database(&src, &dst);
    add_sync(&p);
    let rows = (scale * 100_000).min(1_000_000);
    src.sql()
        .exec(&format!("update pgbench_accounts set abalance = abalance + 1 where aid <= {rows}"));
    eprintln!("applying {rows} changed rows ...");
    let started = Instant::now();
    p.run(&["kick", "s", "--wait", "3600"]).ok();
    let apply_secs = started.elapsed().as_secs_f64();
    let digest = "select md5(string_agg(a::text, ',' order by aid)) from pgbench_accounts a";
    assert_eq!(src.sql().value(digest), dst.sql().value(digest), "target differs after apply");

    let keyless_rows = 100_000;
    src.sql().exec(&format!(
        "insert into bench_keyless select g, md5(g::text) from generate_series(1, {keyless_rows}) g"
    ));
    eprintln!("applying {keyless_rows} inserts into a keyless table ...");
    let started = Instant::now();
    p.run(&["kick", "s", "--wait", "3600"]).ok();
    let keyless_secs = started.elapsed().as_secs_f64();
    let digest = "select md5(string_agg(k::text, ',' order by n)) from bench_keyless k";
    assert_eq!(src.sql().value(digest), dst.sql().value(digest), "keyless table differs");

    // The ceiling: the same rows through one COPY pipe, source to target.
    dst.sql().exec("create table copy_ceiling (like pgbench_accounts)");
    let started = Instant::now();
    let mut out = tool("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            OWNER,
            "-p",
            &src.cluster.port.to_string(),
            "-d",
            &src.name,
        ])
        .args([
            "-c",
            &format!("\\copy (select * from pgbench_accounts where aid <= {rows}) to stdout"),
        ])
        .env("PGPASSWORD", &src.cluster.owner_password)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = tool("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            OWNER,
            "-p",
            &dst.cluster.port.to_string(),
            "-d",
            &dst.name,
        ])
        .args(["-c", "\\copy copy_ceiling from stdin"])
        .env("PGPASSWORD", &dst.cluster.owner_password)
        .stdin(out.stdout.take().unwrap())
        .status()
        .unwrap();
    assert!(status.success() && out.wait().unwrap().success());
    let copy_secs = started.elapsed().as_secs_f64();
    p.run(&["sync", "remove", "s"]).ok();

    println!(
        "## Capture overhead (PostgreSQL 12 source, pgbench scale {scale}, {clients} clients, {seconds} s each)\n"
    );
    println!("| capture | pgbench tps | tps ratio | UPDATE of {bulk_rows} rows, s | time ratio |");
    println!("|---|---|---|---|---|");
    for (name, (t, b)) in [
        ("none", baseline),
        ("pgleap (statement triggers, transition tables)", statement),
        ("row-level triggers", row),
        ("row-level triggers + NOTIFY per statement", notify),
    ] {
        println!("| {name} | {t:.0} | {:.2} | {b:.2} | {:.2} |", t / baseline.0, b / baseline.1);
    }
    println!("\n## Apply rate (PostgreSQL 12 to 17, {rows} changed rows)\n");
    println!("| method | seconds | rows/s | ratio to COPY |");
    println!("|---|---|---|---|");
    println!(
        "| pgleap kick --wait | {apply_secs:.2} | {:.0} | {:.2} |",
        rows as f64 / apply_secs,
        copy_secs / apply_secs
    );
    println!(
        "| psql \\copy out \\| \\copy in (ceiling) | {copy_secs:.2} | {:.0} | 1.00 |",
        rows as f64 / copy_secs
    );
    println!("\n## Keyless apply rate ({keyless_rows} inserts into a table without a key)\n");
    println!("| method | seconds | rows/s |");
    println!("|---|---|---|");
    println!(
        "| pgleap kick --wait | {keyless_secs:.2} | {:.0} |",
        keyless_rows as f64 / keyless_secs
    );
}
