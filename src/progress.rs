//! The one progress reporter: bars on a terminal, log lines otherwise.
//!
//! On a TTY, indicatif draws one bar per running unit of work and a total
//! that moves as the work flows (bytes streamed, or items such as keys),
//! with the rate, an ETA and the phase. Without one (a pipe, a log file,
//! systemd), a line with the same is logged every few seconds, when a unit
//! finishes and when the phase changes, so a long copy is never silent.
//! `--quiet` hides both.
//!
//! A byte total starts as an estimate (the source's size on disk, which a
//! COPY stream does not match): each finished unit replaces its estimate
//! with what it streamed, and scales the estimate of those left by the
//! ratio seen so far, so the bar ends full, not frozen at 61 %.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

const LOG_EVERY: Duration = Duration::from_secs(5);
const BYTES_TEMPLATE: &str =
    "{prefix} {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})";
const ITEMS_TEMPLATE: &str =
    "{prefix} {msg} [{bar:30}] {human_pos}/{human_len} {noun} ({per_sec}, eta {eta})";
const UNIT_TEMPLATE: &str = "  {spinner} {prefix}: {bytes} ({bytes_per_sec})";
const ITEM_UNIT_TEMPLATE: &str = "  {spinner} {prefix} ({elapsed})";

/// `--quiet`: no bars, no progress lines.
static HIDDEN: AtomicBool = AtomicBool::new(false);

/// The bars on screen, if any: log lines are written around them.
static DRAWN: Mutex<Option<MultiProgress>> = Mutex::new(None);

pub fn hide() {
    HIDDEN.store(true, Ordering::Relaxed);
}

/// What a total counts.
#[derive(Clone, Copy)]
enum Measure {
    Bytes,
    /// Items, named by the noun ("keys").
    Items(&'static str),
}

struct Counters {
    units_done: u64,
    rows: u64,
    /// Streamed so far (bytes or items).
    amount: u64,
    /// Of the finished units: their estimates, and what they streamed.
    done_estimated: u64,
    done_streamed: u64,
    last_log: Instant,
}

pub struct Progress {
    what: String,
    measure: Measure,
    units: u64,
    estimate: u64,
    started: Instant,
    counters: Mutex<Counters>,
    bars: Option<(MultiProgress, ProgressBar)>,
}

/// One running unit: its estimate, what it streamed, its bar if any.
pub struct Unit {
    name: String,
    estimate: u64,
    streamed: AtomicU64,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// `units` pieces of work estimated at `est_bytes` bytes in all.
    pub fn new(what: &str, units: u64, est_bytes: u64) -> Progress {
        Progress::with(what, Measure::Bytes, units, est_bytes)
    }

    /// `units` pieces of work of `total` items (named by `noun`) in all.
    pub fn counted(what: &str, noun: &'static str, units: u64, total: u64) -> Progress {
        Progress::with(what, Measure::Items(noun), units, total)
    }

    fn with(what: &str, measure: Measure, units: u64, estimate: u64) -> Progress {
        let shown = std::io::stderr().is_terminal() && !HIDDEN.load(Ordering::Relaxed);
        let bars = shown.then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let total = multi.add(ProgressBar::new(estimate.max(1)));
            let style = match measure {
                Measure::Bytes => ProgressStyle::with_template(BYTES_TEMPLATE),
                Measure::Items(noun) => {
                    ProgressStyle::with_template(&ITEMS_TEMPLATE.replace("{noun}", noun))
                }
            };
            total.set_style(style.expect("valid template, see the tests").progress_chars("=> "));
            total.set_prefix(what.to_string());
            total.set_message(format!("0/{units} parts"));
            *DRAWN.lock().unwrap() = Some(multi.clone());
            (multi, total)
        });
        Progress {
            what: what.to_string(),
            measure,
            units,
            estimate,
            started: Instant::now(),
            counters: Mutex::new(Counters {
                units_done: 0,
                rows: 0,
                amount: 0,
                done_estimated: 0,
                done_streamed: 0,
                last_log: Instant::now(),
            }),
            bars,
        }
    }

    /// A unit of work estimated at `estimate` (bytes or items).
    pub fn start_unit(&self, name: &str, estimate: u64) -> Unit {
        let bar = self.bars.as_ref().map(|(multi, _)| {
            let bar = multi.add(ProgressBar::new_spinner());
            let template = match self.measure {
                Measure::Bytes => UNIT_TEMPLATE,
                Measure::Items(_) => ITEM_UNIT_TEMPLATE,
            };
            bar.set_style(
                ProgressStyle::with_template(template).expect("valid template, see the tests"),
            );
            bar.set_prefix(name.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Unit { name: name.to_string(), estimate, streamed: AtomicU64::new(0), bar }
    }

    /// Streamed for a unit so far (bytes or items).
    pub fn advance(&self, unit: &Unit, amount: u64) {
        unit.streamed.fetch_add(amount, Ordering::Relaxed);
        if let Some(bar) = &unit.bar {
            bar.inc(amount);
        }
        if let Some((_, total)) = &self.bars {
            total.inc(amount);
        }
        let mut c = self.counters.lock().unwrap();
        c.amount += amount;
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
        c.done_estimated += unit.estimate;
        c.done_streamed += unit.streamed.into_inner();
        match &self.bars {
            Some((_, total)) => {
                total.set_message(format!("{}/{} parts", c.units_done, self.units));
                total.set_length(self.expected(&c).max(total.position()).max(1));
            }
            None if !HIDDEN.load(Ordering::Relaxed) => tracing::info!(
                "{}: {} done ({} rows); {}/{} parts",
                self.what,
                unit.name,
                rows,
                c.units_done,
                self.units
            ),
            None => {}
        }
    }

    /// The total as now expected: what the finished units streamed, and
    /// the others' estimate scaled as the finished ones turned out.
    fn expected(&self, c: &Counters) -> u64 {
        let left = self.estimate.saturating_sub(c.done_estimated);
        let ratio = if c.done_estimated > 0 {
            c.done_streamed as f64 / c.done_estimated as f64
        } else {
            1.0
        };
        let expected = c.done_streamed + (left as f64 * ratio) as u64;
        if c.units_done >= self.units { c.done_streamed.max(c.amount) } else { expected }
    }

    fn log_line(&self, c: &Counters) {
        if HIDDEN.load(Ordering::Relaxed) {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = c.amount as f64 / secs;
        let expected = self.expected(c);
        let eta = match expected.checked_sub(c.amount) {
            Some(left) if rate > 0.0 && c.units_done < self.units => {
                format!(", eta {:.0} s", left as f64 / rate)
            }
            _ => String::new(),
        };
        let (what, units, rows) = (&self.what, self.units, c.rows);
        match self.measure {
            Measure::Bytes => tracing::info!(
                "{what}: data: {}/{units} parts, {rows} rows, {:.1} of about {:.1} MB, {:.1} MB/s{eta}",
                c.units_done,
                c.amount as f64 / 1e6,
                expected as f64 / 1e6,
                rate / 1e6
            ),
            Measure::Items(noun) => tracing::info!(
                "{what}: {}/{units} parts, {} of {expected} {noun}, {rate:.0} {noun}/s{eta}",
                c.units_done,
                c.amount,
            ),
        }
    }

    /// The data is in; what runs now (indexes, analyze, ...).
    pub fn phase(&self, name: &str) {
        match &self.bars {
            Some((_, total)) => total.set_message(name.to_string()),
            None if !HIDDEN.load(Ordering::Relaxed) => tracing::info!("{}: {name}", self.what),
            None => {}
        }
    }

    pub fn finish(&self) {
        self.clear();
        let c = self.counters.lock().unwrap();
        self.log_line(&c);
    }

    /// Takes the bars off the screen.
    fn clear(&self) {
        if let Some((_, total)) = &self.bars {
            total.finish_and_clear();
            DRAWN.lock().unwrap().take();
        }
    }
}

impl Drop for Progress {
    /// A unit of work that failed or was interrupted: its bars go too.
    fn drop(&mut self) {
        self.clear();
    }
}

/// Where log lines go: stderr, written between the bars' redraws when
/// bars are on screen (else a line would be torn by the next redraw).
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let drawn = DRAWN.lock().unwrap().clone();
        match drawn {
            Some(multi) => multi.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bars are drawn only on a terminal, which tests never have: an
    /// invalid template would panic only in front of a user.
    #[test]
    fn templates_are_valid() {
        ProgressStyle::with_template(BYTES_TEMPLATE).unwrap();
        ProgressStyle::with_template(&ITEMS_TEMPLATE.replace("{noun}", "keys")).unwrap();
        ProgressStyle::with_template(UNIT_TEMPLATE).unwrap();
        ProgressStyle::with_template(ITEM_UNIT_TEMPLATE).unwrap();
    }

    #[test]
    fn counts_without_a_terminal() {
        let p = Progress::new("test", 2, 10);
        let u = p.start_unit("a", 5);
        p.advance(&u, 100);
        p.finish_unit(u, 5);
        let c = p.counters.lock().unwrap();
        assert_eq!((c.units_done, c.rows, c.amount), (1, 5, 100));
    }

    /// The total follows what the units turn out to stream: a copy whose
    /// stream is 60 % of the size on disk ends at 100 %, not at 60 %.
    #[test]
    fn the_total_follows_what_finished_units_streamed() {
        let p = Progress::new("test", 4, 4000);
        let a = p.start_unit("a", 1000);
        p.advance(&a, 600);
        p.finish_unit(a, 1);
        assert_eq!(p.expected(&p.counters.lock().unwrap()), 600 + 1800);
        for name in ["b", "c", "d"] {
            let u = p.start_unit(name, 1000);
            p.advance(&u, 600);
            p.finish_unit(u, 1);
        }
        let c = p.counters.lock().unwrap();
        assert_eq!((p.expected(&c), c.amount), (2400, 2400));
    }
}
