//! The daemon's status page, metrics and status API, read with a real HTTP
//! client during a copy and during streaming, and the page rendered by a
//! real headless browser.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{Pgleap, TestDb, cluster, free_port};

/// An HTTP/1.0 GET: (status line, body).
fn get(port: u16, path: &str) -> Option<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// The value of a metric line `name{...labels...} value` whose labels
/// contain `label`.
fn metric(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn metrics_status_api_and_page_follow_a_copy_and_the_sync_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "websrc");
    let dst = TestDb::new(cluster(17), "webdst");
    src.sql().exec(
        "create table big (id int primary key, note text);
         insert into big select g, repeat('x', 200) from generate_series(1, 400000) g;
         analyze big;",
    );
    let port = free_port();
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster])
        .env("PGLEAP_LISTEN", &format!("127.0.0.1:{port}"));
    p.declare(&src, &dst, &["--all-tables"]);
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    p.add_sync(&["--onetimecopy", "always"]);
    // The copy held at its first part by a lock on the target (SHARE lets
    // the copy plan its parts, not write them): the page shows it copying.
    let holder = dst.sql();
    holder.exec("begin; lock table big in share mode");
    p.run(&["start"]).ok();
    let copying = eventually("the copy's progress on the page", || {
        let (_, page) = get(port, "/")?;
        page.contains("<progress").then_some(page)
    });
    holder.exec("rollback");
    for shown in [
        "copying (0%",
        "class=\"sync working\"",
        "catalog ",
        " UTC",
        "PostgreSQL 15.",
        "PostgreSQL 17.",
        &format!("127.0.0.1:{}/{}", src.cluster.port, src.name),
        &format!("127.0.0.1:{}/{}", dst.cluster.port, dst.name),
        "not ready: the initial copy to dst is not done",
    ] {
        assert!(copying.contains(shown), "{shown:?} not on the page:\n{copying}");
    }

    // During the copy: bytes copied go up.
    let during = eventually("copy bytes in /metrics", || {
        let (status, body) = get(port, "/metrics")?;
        assert!(status.contains("200"), "{status}");
        metric(&body, "pgleap_copy_bytes_total", "sync=\"s\"").filter(|b| *b > 0.0)
    });
    // Then streaming: rows applied, a phase, lag and pending in the API.
    p.run(&["kick", "s", "--wait", "120"]).ok();
    src.sql().exec("update big set note = 'changed' where id <= 500");
    let applied = eventually("applied rows in /metrics", || {
        let (_, body) = get(port, "/metrics")?;
        metric(&body, "pgleap_applied_rows_total", "sync=\"s\"").filter(|r| *r >= 500.0)
    });
    let after = eventually("more copy bytes or the same", || {
        let (_, body) = get(port, "/metrics")?;
        metric(&body, "pgleap_copy_bytes_total", "sync=\"s\"")
    });
    assert!(after >= during && applied >= 500.0);
    let (_, body) = get(port, "/metrics").unwrap();
    // The exposition, read by a real parser: every series has its HELP
    // text and TYPE, per-target series carry the target, and the build is
    // named.
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("a valid exposition");
    let family = |m: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| m.strip_suffix(s))
            .unwrap_or(m)
            .to_string()
    };
    for sample in &scrape.samples {
        let name = family(&sample.metric);
        assert!(scrape.docs.contains_key(&name), "no HELP for {name}:\n{body}");
        assert!(body.contains(&format!("# TYPE {name} ")), "no TYPE for {name}:\n{body}");
        // The build, and a sync's slot (on its source, whatever the
        // targets: `PGLEAP_TEST_DECODING=1` runs this test with one).
        if name != "pgleap_build_info" && name != "pgleap_slot_retained_bytes" {
            assert_eq!(sample.labels.get("target"), Some("dst"), "{name} without its target");
        }
    }
    for name in [
        "pgleap_batch_duration_seconds",
        "pgleap_sync_up",
        "pgleap_lag_seconds",
        "pgleap_pending_keys",
        "pgleap_last_success_timestamp_seconds",
        "pgleap_build_info",
    ] {
        assert!(
            scrape.samples.iter().any(|s| family(&s.metric) == name),
            "{name} missing:\n{body}"
        );
    }
    if crate::support::cluster::decoding_everywhere() {
        let slot = scrape.samples.iter().find(|s| s.metric == "pgleap_slot_retained_bytes");
        let sync = slot.and_then(|s| s.labels.get("sync"));
        assert_eq!(sync, Some("s"), "the slot's retained WAL, by sync:\n{body}");
    }
    assert!(!body.contains("pgleap_sync_state"), "{body}");
    let api: serde_json::Value = eventually("a streaming phase in /api/status", || {
        let (_, body) = get(port, "/api/status")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["syncs"][0]["targets"][0]["phase"] == "streaming").then_some(v)
    });
    assert_eq!(api["syncs"][0]["name"], "s");

    // The page, as a browser renders it: the chart is drawn from at least
    // two samples of the lag.
    eventually("two lag samples", || {
        let (_, page) = get(port, "/")?;
        let points = page.split("points=\"").nth(1)?.split('"').next()?.split(' ').count();
        (points >= 2).then_some(())
    });
    let shot = p.home().join("page.png");
    let dom = std::process::Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--window-size=900,700"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--dump-dom")
        .arg(format!("http://127.0.0.1:{port}/"))
        .env("HOME", p.home())
        .output()
        .expect("run chromium (Debian's chromium package)");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("<polyline") && dom.contains("streaming"), "{dom}");
    assert!(dom.contains("s → dst"), "{dom}");
    // The cutover verdict, as `ready` gives it (at the default lag).
    assert!(api["syncs"][0]["not_ready"].is_array(), "{api}");
    assert!(
        dom.contains("ready to cut over") || dom.contains("not ready: "),
        "no cutover verdict on the page: {dom}"
    );
    let png = std::fs::read(&shot).expect("chromium wrote no screenshot");
    if let Ok(keep) = std::env::var("PGLEAP_KEEP_SCREENSHOT") {
        std::fs::write(keep, &png).unwrap();
    }
    assert!(png.starts_with(b"\x89PNG") && png.len() > 5_000, "{} bytes", png.len());
    assert!(dom.contains("class=\"sync good\""), "{dom}");

    // After a cutover: when, the write downtime, and the way back's state.
    p.run(&["cutover", "s", "--rollback-sync", "back"]).ok();
    let after = eventually("the cutover on the page", || {
        let (_, page) = get(port, "/")?;
        page.contains("writes fenced for").then_some(page)
    });
    for shown in ["class=\"sync done\"", "rollback sync</dt><dd>back &mdash; ", "way back of"] {
        assert!(after.contains(shown), "{shown:?} not on the page:\n{after}");
    }
    p.run(&["stop"]).ok();
}
