//! What every benchmark needs besides the test harness: its knobs, the
//! median of its rounds with their range, pgbench's throughput.

use crate::support::{self, TestDb};

/// An environment knob, or its default.
pub fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// (median, lowest, highest) of the rounds.
#[allow(dead_code)]
pub fn median_range(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// pgbench's TPC-B-like script for `seconds` with `clients`: transactions
/// per second.
#[allow(dead_code)]
pub fn tps(db: &TestDb, seconds: u64, clients: u64) -> f64 {
    let c = clients.to_string();
    let out = support::pgbench(db, &["-n", "-c", &c, "-j", "2", "-T", &seconds.to_string()])
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "pgbench: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench output:\n{text}"))
}
