//! What the daemon shows over HTTP: `/metrics` (Prometheus), `/api/status`
//! (what `status --json` prints) and `/`, a self-contained status page
//! (no script, no CDN) with each sync's phase, progress, last error and its
//! lag over the last hour as a chart.
//!
//! The daemon's sampler refreshes a snapshot every few seconds (status of
//! every sync, and the lag history); the handlers only read it, so a slow
//! server never holds up a scrape, and the page is as fresh as the last
//! sample.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::status::SyncStatus;

/// How much lag history the page charts.
const HISTORY: Duration = Duration::from_secs(3600);

/// Per (sync, target): (unix seconds, lag seconds), oldest first.
type LagHistory = BTreeMap<(String, String), VecDeque<(u64, f64)>>;

/// What the handlers serve, refreshed by the sampler.
pub struct Board {
    /// The catalog the daemon serves, named on the page.
    catalog: String,
    metrics: PrometheusHandle,
    status: Mutex<serde_json::Value>,
    lag: Mutex<LagHistory>,
}

impl Board {
    /// Installs the process's metrics recorder.
    pub fn new(catalog: &std::path::Path) -> Option<Arc<Board>> {
        let builder = PrometheusBuilder::new()
            .set_buckets(&[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
            .ok()?;
        let metrics = builder.install_recorder().ok()?;
        Self::describe();
        Some(Arc::new(Board {
            catalog: catalog.display().to_string(),
            metrics,
            status: Mutex::new(serde_json::json!({"daemon_pid": std::process::id(), "syncs": []})),
            lag: Mutex::new(BTreeMap::new()),
        }))
    }

    /// What each series means (`# HELP`), and the build, once per process.
    fn describe() {
        use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
        describe_counter!(
            "pgleap_applied_rows_total",
            "Rows written to (inserted or updated on) or deleted from a target by the sync"
        );
        describe_counter!(
            "pgleap_errors_total",
            "Rounds of a sync that failed, by the server's SQLSTATE (none: no server error)"
        );
        describe_counter!(
            "pgleap_copy_bytes_total",
            Unit::Bytes,
            "Bytes streamed from the source to a target by the initial copy"
        );
        describe_histogram!(
            "pgleap_batch_duration_seconds",
            Unit::Seconds,
            "How long each applied batch took"
        );
        describe_gauge!("pgleap_sync_up", "1 while the last round of a sync to a target was good");
        describe_gauge!(
            "pgleap_last_success_timestamp_seconds",
            Unit::Seconds,
            "When the last good round of a sync to a target ended (Unix time)"
        );
        describe_gauge!(
            "pgleap_lag_seconds",
            Unit::Seconds,
            "Age of the oldest change the target has not received"
        );
        describe_gauge!("pgleap_pending_keys", "Changed keys the target has not received");
        describe_gauge!(
            "pgleap_copy_progress_ratio",
            "Share of the initial copy's parts done (1 once handed over to the sync)"
        );
        describe_gauge!(
            "pgleap_cutover_write_downtime_seconds",
            Unit::Seconds,
            "How long the cutover fenced writes on the source"
        );
        describe_gauge!(
            "pgleap_slot_retained_bytes",
            Unit::Bytes,
            "WAL the sync's replication slot keeps on the source (capture by decoding)"
        );
        describe_gauge!("pgleap_build_info", "The running pgleap's version (always 1)");
        metrics::gauge!("pgleap_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    }

    /// Takes a new sample: the gauges, the status snapshot, the history.
    pub fn sample(&self, syncs: &[SyncStatus]) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut lag = self.lag.lock().unwrap();
        for s in syncs {
            if let Some(d) = &s.decoding {
                let labels = [("sync", s.name.clone()), ("slot", d.slot.clone())];
                metrics::gauge!("pgleap_slot_retained_bytes", &labels).set(d.retained_bytes as f64);
            }
            for t in &s.targets {
                let labels = [("sync", s.name.clone()), ("target", t.target.clone())];
                if let Some(l) = t.lag_seconds {
                    metrics::gauge!("pgleap_lag_seconds", &labels).set(l);
                    let series = lag.entry((s.name.clone(), t.target.clone())).or_default();
                    series.push_back((now, l));
                    while series.front().is_some_and(|(at, _)| now - at > HISTORY.as_secs()) {
                        series.pop_front();
                    }
                }
                if let Some(p) = t.pending {
                    metrics::gauge!("pgleap_pending_keys", &labels).set(p as f64);
                }
                if let Some(ms) = s.write_downtime_ms {
                    metrics::gauge!("pgleap_cutover_write_downtime_seconds", &labels)
                        .set(ms as f64 / 1000.0);
                }
                if let Some(r) = t.copy_ratio {
                    metrics::gauge!("pgleap_copy_progress_ratio", &labels).set(r);
                }
            }
        }
        *self.status.lock().unwrap() = serde_json::json!({
            "daemon_pid": std::process::id(),
            "catalog": self.catalog,
            "sampled_at": utc(now),
            "syncs": syncs,
        });
    }
}

/// Serves the board on `listener` until the token is cancelled.
pub async fn serve(listener: tokio::net::TcpListener, board: Arc<Board>, stop: CancellationToken) {
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(prometheus))
        .route("/api/status", get(api_status))
        .with_state(board);
    let shutdown = async move { stop.cancelled().await };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::warn!("the status page stopped: {e}");
    }
}

/// Binds `addr`. A busy port refuses the start: the page found there
/// would be another process's (another pgleap's migration), and the
/// operator would read it as this one's.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let bound = l.local_addr().map_or(addr, |a| a);
    tracing::info!("status page and metrics on http://{bound}/");
    Ok(l)
}

async fn prometheus(State(board): State<Arc<Board>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], board.metrics.render())
}

async fn api_status(State(board): State<Arc<Board>>) -> impl IntoResponse {
    axum::Json(board.status.lock().unwrap().clone())
}

async fn page(State(board): State<Arc<Board>>) -> Html<String> {
    let status = board.status.lock().unwrap().clone();
    let lag = board.lag.lock().unwrap().clone();
    let syncs: Vec<&serde_json::Value> = status["syncs"].as_array().into_iter().flatten().collect();
    let text = |v: &serde_json::Value| escape(v.as_str().unwrap_or("?"));
    let mut rows = String::new();
    for s in &syncs {
        let sync = s["name"].as_str().unwrap_or_default();
        for t in s["targets"].as_array().into_iter().flatten() {
            let target = t["target"].as_str().unwrap_or_default();
            let phase = t["phase"].as_str().unwrap_or("?");
            let tone = crate::status::tone(phase).as_str();
            let series = lag.get(&(sync.to_string(), target.to_string()));
            let server = |role: &str,
                          name: &serde_json::Value,
                          at: &serde_json::Value,
                          version: &serde_json::Value| {
                format!(
                    "<dt>{role}</dt><dd>{} &mdash; {} &mdash; {}</dd>",
                    text(name),
                    at.as_str().map_or("?".into(), escape),
                    version
                        .as_str()
                        .map_or("did not answer".into(), |v| format!("PostgreSQL {}", escape(v))),
                )
            };
            let mut facts =
                server("source", &s["source"], &s["source_address"], &s["source_version"]);
            facts.push_str(&server("target", &t["target"], &t["address"], &t["version"]));
            if let Some(r) = t["copy_ratio"].as_f64().filter(|r| *r < 1.0) {
                facts.push_str(&format!(
                    "<dt>initial copy</dt><dd><progress max=\"1\" value=\"{r:.3}\"></progress> \
                     {:.0}%</dd>",
                    r * 100.0
                ));
            }
            let lag_text = t["lag_seconds"].as_f64().map_or("?".into(), |l| format!("{l:.1} s"));
            facts.push_str(&format!(
                "<dt>lag</dt><dd>{lag_text}</dd><dt>pending keys</dt><dd>{}</dd>\
                 <dt>last good round</dt><dd>{}</dd><dt>last error</dt><dd>{}</dd>",
                t["pending"].as_i64().map_or("?".into(), |p| p.to_string()),
                t["last_good"].as_str().map_or("never".into(), escape),
                t["last_error"].as_str().map_or("none".into(), escape),
            ));
            if let Some(ms) = s["write_downtime_ms"].as_i64() {
                facts.push_str(&format!(
                    "<dt>cut over</dt><dd>{}: writes fenced for {:.3} s</dd>",
                    s["cut_over_at"].as_str().map_or("?".into(), escape),
                    ms as f64 / 1000.0
                ));
            }
            if let Some(back) = s["rollback_sync"].as_str() {
                let state = syncs
                    .iter()
                    .find(|o| o["name"] == back)
                    .and_then(|o| o["targets"][0]["phase"].as_str())
                    .unwrap_or("removed");
                facts.push_str(&format!(
                    "<dt>rollback sync</dt><dd>{} &mdash; {}</dd>",
                    escape(back),
                    escape(state)
                ));
            }
            if let Some(of) = s["rollback_of"].as_str() {
                facts.push_str(&format!(
                    "<dt>way back of</dt><dd>{} (pgleap rollback {} cuts over to it)</dd>",
                    escape(of),
                    escape(of)
                ));
            }
            let reasons: Vec<String> = s["not_ready"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(escape))
                .collect();
            let ready = if tone == "done" {
                String::new()
            } else if reasons.is_empty() {
                "<p class=\"ready\">ready to cut over</p>".to_string()
            } else {
                format!("<p class=\"notready\">not ready: {}</p>", reasons.join("; "))
            };
            rows.push_str(&format!(
                "<section class=\"sync {tone}\"><h2>{} &rarr; {}</h2>\
                 <p class=\"phase\">{}</p>{ready}<dl>{facts}</dl>{}</section>",
                escape(sync),
                escape(target),
                escape(phase),
                chart(series),
            ));
        }
    }
    if rows.is_empty() {
        rows.push_str("<p>No sync yet.</p>");
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" \
         content=\"5\"><title>pgleap</title><style>body{{font:14px sans-serif;margin:2em}}\
         .sync{{border:1px solid #ccc;border-left:8px solid #999;padding:1em;margin:1em 0}}\
         .good{{border-left-color:#2a6}}.working{{border-left-color:#d90}}\
         .attention{{border-left-color:#c22}}.done{{border-left-color:#36c}}\
         .phase{{font-weight:bold}}dl{{display:grid;grid-template-columns:10em auto}}\
         svg{{background:#f8f8f8}}</style></head><body><h1>pgleap</h1>\
         <p class=\"about\">catalog {} &mdash; daemon pid {} &mdash; sampled {}</p>{rows}\
         </body></html>",
        text(&status["catalog"]),
        status["daemon_pid"],
        text(&status["sampled_at"]),
    ))
}

/// Unix seconds as `2026-12-05 16:22:59 UTC` (days to civil date after
/// H. Hinnant's algorithm: no date crate for one line of the page).
fn utc(unix: u64) -> String {
    let (days, secs) = ((unix / 86400) as i64, unix % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// The lag over the last hour as an inline SVG line chart.
fn chart(series: Option<&VecDeque<(u64, f64)>>) -> String {
    let (w, h) = (600.0, 120.0);
    let Some(series) = series.filter(|s| !s.is_empty()) else {
        return "<p class=\"nochart\">no lag sampled yet</p>".into();
    };
    // From the first sample kept (at most an hour ago) to the last.
    let end = series.back().map_or(0, |p| p.0) as f64;
    let start = series.front().map_or(0, |p| p.0) as f64;
    let span = (end - start).max(1.0);
    let top = series.iter().map(|p| p.1).fold(1.0_f64, f64::max);
    let points: Vec<String> = series
        .iter()
        .map(|(at, l)| {
            let x = (*at as f64 - start) / span * w;
            let y = h - 2.0 - l / top * (h - 20.0);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        "<svg class=\"lag\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         role=\"img\" aria-label=\"lag over the last {minutes:.0} minutes, up to {top:.1} s\">\
         <line x1=\"0\" y1=\"{base}\" x2=\"{w}\" y2=\"{base}\" stroke=\"#999\"/>\
         <polyline fill=\"none\" stroke=\"#2a6\" stroke-width=\"2\" points=\"{}\"/>\
         <text x=\"4\" y=\"12\">lag, up to {top:.1} s</text>\
         <text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">last {minutes:.0} min</text></svg>",
        points.join(" "),
        minutes = (span / 60.0).ceil(),
        base = h - 2.0,
        tx = w - 4.0,
        ty = 12,
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_seconds_read_as_utc() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::utc(1_796_487_779), "2026-12-05 16:22:59 UTC");
    }
}
