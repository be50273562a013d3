//! What every benchmark needs besides the test harness: its knobs, and the
//! median of its rounds with their range.

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
