//! The one progress reporter: bars on a terminal, log lines otherwise.
//!
//! On a TTY, indicatif draws one bar per running unit of work and a total
//! that moves with the bytes as they flow (against the estimated size, with
//! the rate, an ETA and the phase). Without one (a pipe, a log file,
//! systemd), a line with the same is logged every few seconds, when a unit
//! finishes and when the phase changes, so a long copy is never silent.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

const LOG_EVERY: Duration = Duration::from_secs(5);
const TOTAL_TEMPLATE: &str =
    "{prefix} {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})";
const UNIT_TEMPLATE: &str = "  {spinner} {prefix}: {bytes} ({bytes_per_sec})";

struct Counters {
    units_done: u64,
    rows: u64,
    bytes: u64,
    last_log: Instant,
}

pub struct Progress {
    what: String,
    units: u64,
    est_bytes: u64,
    started: Instant,
    counters: Mutex<Counters>,
    bars: Option<(MultiProgress, ProgressBar)>,
}

/// One running unit: its bar, if any.
pub struct Unit {
    name: String,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// `units` pieces of work estimated at `est_bytes` bytes in all.
    pub fn new(what: &str, units: u64, est_bytes: u64) -> Progress {
        let bars = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let total = multi.add(ProgressBar::new(est_bytes.max(1)));
            total.set_style(
                ProgressStyle::with_template(TOTAL_TEMPLATE)
                    .expect("valid template, see the tests")
                    .progress_chars("=> "),
            );
            total.set_prefix(what.to_string());
            total.set_message(format!("data: 0/{units} parts"));
            (multi, total)
        });
        Progress {
            what: what.to_string(),
            units,
            est_bytes,
            started: Instant::now(),
            counters: Mutex::new(Counters {
                units_done: 0,
                rows: 0,
                bytes: 0,
                last_log: Instant::now(),
            }),
            bars,
        }
    }

    pub fn start_unit(&self, name: &str) -> Unit {
        let bar = self.bars.as_ref().map(|(multi, _)| {
            let bar = multi.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template(UNIT_TEMPLATE).expect("valid template, see the tests"),
            );
            bar.set_prefix(name.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Unit { name: name.to_string(), bar }
    }

    /// Bytes streamed for a unit so far.
    pub fn advance(&self, unit: &Unit, bytes: u64) {
        if let Some(bar) = &unit.bar {
            bar.inc(bytes);
        }
        if let Some((_, total)) = &self.bars {
            // The estimate is the source's size on disk: the stream may
            // outgrow it, and the bar then just stays full.
            total.inc(bytes);
        }
        let mut c = self.counters.lock().unwrap();
        c.bytes += bytes;
        if self.bars.is_none() && c.last_log.elapsed() >= LOG_EVERY {
            c.last_log = Instant::now();
            self.log_line(&c);
        }
    }

    pub fn finish_unit(&self, unit: Unit, rows: u64) {
        if let Some(bar) = unit.bar {
            bar.finish_and_clear();
        }
        let mut c = self.counters.lock().unwrap();
        c.units_done += 1;
        c.rows += rows;
        match &self.bars {
            Some((_, total)) => {
                total.set_message(format!("data: {}/{} parts", c.units_done, self.units));
            }
            None => tracing::info!(
                "{}: {} done ({} rows); {}/{} parts",
                self.what,
                unit.name,
                rows,
                c.units_done,
                self.units
            ),
        }
    }

    fn log_line(&self, c: &Counters) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = c.bytes as f64 / secs;
        let eta = match self.est_bytes.checked_sub(c.bytes) {
            Some(left) if rate > 0.0 && c.units_done < self.units => {
                format!(", eta {:.0} s", left as f64 / rate)
            }
            _ => String::new(),
        };
        tracing::info!(
            "{}: data: {}/{} parts, {} rows, {:.1} of about {:.1} MB, {:.1} MB/s{eta}",
            self.what,
            c.units_done,
            self.units,
            c.rows,
            c.bytes as f64 / 1e6,
            self.est_bytes as f64 / 1e6,
            rate / 1e6
        );
    }

    /// The data is in; what runs now (indexes, analyze, ...).
    pub fn phase(&self, name: &str) {
        match &self.bars {
            Some((_, total)) => total.set_message(name.to_string()),
            None => tracing::info!("{}: {name}", self.what),
        }
    }

    pub fn finish(&self) {
        if let Some((_, total)) = &self.bars {
            total.finish_and_clear();
        }
        let c = self.counters.lock().unwrap();
        self.log_line(&c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bars are drawn only on a terminal, which tests never have: an
    /// invalid template would panic only in front of a user.
    #[test]
    fn templates_are_valid() {
        ProgressStyle::with_template(TOTAL_TEMPLATE).unwrap();
        ProgressStyle::with_template(UNIT_TEMPLATE).unwrap();
    }

    #[test]
    fn counts_without_a_terminal() {
        let p = Progress::new("test", 2, 10);
        let u = p.start_unit("a");
        p.advance(&u, 100);
        p.finish_unit(u, 5);
        let c = p.counters.lock().unwrap();
        assert_eq!((c.units_done, c.rows, c.bytes), (1, 5, 100));
    }
}
