//! Where log lines go and how they look. A person at a terminal reads the
//! commands' own lines (and the progress bars); pgleap's log there says
//! only what went wrong, as `warning: ...`, drawn between the bars. Off a
//! terminal (a pipe, a log file, systemd) the log is the record: timestamped
//! lines, info level, or JSON objects.

use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::{Cli, LogFormat};

/// Sets up the one subscriber for this process.
pub fn init(cli: &Cli) {
    let daemon = cli.command.is_daemon();
    let terminal = std::io::stderr().is_terminal();
    let person = terminal && !daemon && cli.log_format == LogFormat::Text;
    if cli.quiet {
        crate::progress::hide();
    }
    let default = match cli.verbose {
        // The daemon's log is its record of what it did. Server notices
        // (logged by tokio-postgres) say nothing to the user; a slot's
        // stream ended by another pgleap process that took the slot is
        // expected (pgleap logs a stream that broke under a pump itself).
        0 if daemon => "info,tokio_postgres=warn,pgwire_replication=off",
        // The bars and the commands' lines say what happens.
        0 if person || cli.quiet => "warn",
        // pgleap's own info lines are its progress reports off a TTY.
        0 => "warn,pgleap=info",
        1 => "pgleap=debug,info",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("PGLEAP_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::progress::LogWriter)
        // A closed stderr must not stop anything: the subscriber would
        // report its own write error with eprintln!, which panics there
        // (and a panicking signal task never stopped the daemon).
        .log_internal_errors(false);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text if person && cli.verbose == 0 => logs.event_format(Plain).init(),
        // Colour codes only for a person at a terminal, not in log files.
        LogFormat::Text => logs.with_ansi(terminal).init(),
    }
}

/// `warning: the message key=value`: no timestamp or module for a person
/// who did not ask for a log.
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warning",
            Level::INFO => "note",
            _ => "debug",
        };
        write!(writer, "{level}: ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
