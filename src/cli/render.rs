//! How listings look: a table for people, JSON (`--json`) for programs. Both
//! are printed from the same catalog structs.

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;

use crate::catalog::{Db, DbGroup, RelGroup, Sync};
use crate::inventory::display_name;
use crate::status::SyncStatus;

fn json<T: Serialize + ?Sized>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("catalog structs serialize"));
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    // Fitted to the terminal, unless it reports no usable width (a pty
    // without a size says 0 columns: every cell would be one letter wide).
    if t.width().is_some_and(|w| w >= 40) {
        t.set_content_arrangement(ContentArrangement::Dynamic);
    }
    t
}

/// 1536 → "1.5 kB", as pg_size_pretty would say (binary multiples).
pub fn size(bytes: i64) -> String {
    let units = ["bytes", "kB", "MB", "GB", "TB", "PB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} bytes") } else { format!("{value:.1} {}", units[unit]) }
}

fn password_source(db: &Db) -> String {
    match (db.password_stored, &db.password_file) {
        (true, _) => "stored in catalog".into(),
        (false, Some(f)) => format!("file {f}"),
        (false, None) => "PGPASSWORD or ~/.pgpass".into(),
    }
}

pub fn dbs(dbs: &[Db], as_json: bool) {
    if as_json {
        return json(dbs);
    }
    let mut t = table(&["name", "connection", "password", "version"]);
    for db in dbs {
        t.add_row(vec![
            db.name.clone(),
            db.conninfo.clone(),
            password_source(db),
            db.server_version.clone().unwrap_or_default(),
        ]);
    }
    println!("{t}");
}

pub fn db(db: &Db, used_by: &[String], as_json: bool) {
    if as_json {
        #[derive(Serialize)]
        struct Shown<'a> {
            #[serde(flatten)]
            db: &'a Db,
            used_by: &'a [String],
        }
        return json(&Shown { db, used_by });
    }
    println!("database:   {}", db.name);
    println!("connection: {}", db.conninfo);
    println!("password:   {}", password_source(db));
    println!("version:    {}", db.server_version.as_deref().unwrap_or("unknown"));
    println!("added:      {}", db.created_at);
    println!(
        "used by:    {}",
        if used_by.is_empty() { "nothing".to_string() } else { used_by.join(", ") }
    );
}

pub fn dbgroups(groups: &[DbGroup], as_json: bool) {
    if as_json {
        return json(groups);
    }
    let mut t = table(&["name", "source", "targets"]);
    for g in groups {
        t.add_row(vec![
            g.name.clone(),
            g.source().to_string(),
            g.targets().collect::<Vec<_>>().join(", "),
        ]);
    }
    println!("{t}");
}

pub fn relgroups(groups: &[RelGroup], as_json: bool) {
    if as_json {
        return json(groups);
    }
    let mut t = table(&["name", "database", "tables", "sequences", "est. size"]);
    for g in groups {
        let tables = g.members.iter().filter(|m| m.kind != "sequence").count();
        t.add_row(vec![
            g.name.clone(),
            g.db.clone(),
            tables.to_string(),
            (g.members.len() - tables).to_string(),
            size(g.members.iter().map(|m| m.est_bytes).sum()),
        ]);
    }
    println!("{t}");
}

pub fn relgroup(g: &RelGroup, as_json: bool) {
    if as_json {
        return json(g);
    }
    println!("relgroup \"{}\" of database \"{}\"", g.name, g.db);
    println!("large objects: {}", if g.large_objects { "included" } else { "not included" });
    let mut t = table(&["relation", "kind", "key", "est. rows", "est. size"]);
    for m in &g.members {
        t.add_row(vec![
            display_name(&m.schema, &m.name),
            m.kind.clone(),
            if m.kind != "sequence" && m.key_columns.is_empty() {
                "(none: whole rows)".to_string()
            } else {
                m.key_columns.join(", ")
            },
            if m.kind == "sequence" { String::new() } else { m.est_rows.to_string() },
            size(m.est_bytes),
        ]);
    }
    println!("{t}");
}

/// What replicating keyless tables costs, said where the user chose it.
pub fn keyless_warning(g: &RelGroup) {
    let keyless: Vec<String> = g
        .members
        .iter()
        .filter(|m| m.kind != "sequence" && m.key_columns.is_empty())
        .map(|m| display_name(&m.schema, &m.name))
        .collect();
    if !keyless.is_empty() {
        eprintln!(
            "warning: {} table(s) without a usable key are replicated by whole-row images: {}\n  \
             each change stores the whole row on the source, and each UPDATE or DELETE on the \
             target must find its row (a scan unless an index helps); add a primary key where \
             you can, or use --keyless refuse",
            keyless.len(),
            keyless.join(", ")
        );
    }
}

pub fn syncs(syncs: &[Sync], as_json: bool) {
    if as_json {
        return json(syncs);
    }
    let mut t = table(&["name", "relgroup", "dbgroup", "onetimecopy", "autokick"]);
    for s in syncs {
        t.add_row(vec![
            s.name.clone(),
            s.relgroup.clone(),
            s.dbgroup.clone(),
            s.onetimecopy.as_str().to_string(),
            if s.autokick { "on" } else { "off" }.to_string(),
        ]);
    }
    println!("{t}");
}

pub fn sync(s: &Sync, relgroup: &RelGroup, dbgroup: &DbGroup, as_json: bool) {
    if as_json {
        #[derive(Serialize)]
        struct Shown<'a> {
            #[serde(flatten)]
            sync: &'a Sync,
            source: &'a str,
            targets: Vec<&'a str>,
            relations: Vec<String>,
        }
        return json(&Shown {
            sync: s,
            source: dbgroup.source(),
            targets: dbgroup.targets().collect(),
            relations: relgroup.members.iter().map(|m| display_name(&m.schema, &m.name)).collect(),
        });
    }
    println!("sync:        {}", s.name);
    println!("relgroup:    {} ({} relations)", s.relgroup, relgroup.members.len());
    println!("dbgroup:     {}", s.dbgroup);
    println!("source:      {}", dbgroup.source());
    println!("targets:     {}", dbgroup.targets().collect::<Vec<_>>().join(", "));
    println!("onetimecopy: {}", s.onetimecopy.as_str());
    println!("autokick:    {}", if s.autokick { "on" } else { "off" });
    println!("added:       {}", s.created_at);
}

/// How long ago, for a person: "12s ago", "4m ago", "never".
fn ago(seconds: Option<f64>) -> String {
    let Some(s) = seconds else { return "never".into() };
    let s = s.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

fn millis(ms: Option<i64>) -> String {
    ms.map(|m| format!("{:.1}s", m as f64 / 1000.0)).unwrap_or_default()
}

pub fn status(syncs: &[SyncStatus], daemon: Option<i32>, detailed: bool, as_json: bool) {
    if as_json {
        #[derive(Serialize)]
        struct Shown<'a> {
            daemon_pid: Option<i32>,
            syncs: &'a [SyncStatus],
        }
        return json(&Shown { daemon_pid: daemon, syncs });
    }
    match daemon {
        Some(pid) => println!("daemon: running (pid {pid})"),
        None => println!("daemon: not running"),
    }
    if detailed {
        for s in syncs {
            println!("sync:        {}", s.name);
            println!("source:      {}", s.source);
            println!("relgroup:    {} ({} tables)", s.relgroup, s.tables.len());
            for t in &s.tables {
                println!("             {t}");
            }
            println!("autokick:    {}", if s.autokick { "on" } else { "off" });
            println!("onetimecopy: {}", s.onetimecopy);
            println!(
                "large objects: {}",
                if s.large_objects {
                    format!("synced (a pass every {} s)", s.lo_interval)
                } else {
                    "not synced".to_string()
                }
            );
            if let Some(d) = &s.decoding {
                println!(
                    "capture:     logical decoding of {} tables, slot {}: keeps {:.1} MB of the \
                     source's WAL{}",
                    d.tables,
                    d.slot,
                    d.retained_bytes as f64 / 1e6,
                    d.wal_status.as_ref().map_or(String::new(), |w| format!(" ({w})"))
                );
            }
            if let Some(e) = &s.source_error {
                println!("source:      unreachable ({e})");
            }
            if let Some(reason) = &s.paused {
                println!("paused:      {reason}");
                println!(
                    "             change the target the same way, then pgleap sync resume {}",
                    s.name
                );
            }
            for n in &s.not_captured {
                println!("not synced:  {n}");
            }
            for t in &s.targets {
                let l = &t.last;
                println!("target:      {} ({}; last round {})", t.target, t.phase, l.state);
                if let Some(e) = &t.target_error {
                    println!("  cannot be read: {e}");
                }
                if let Some(w) = &t.waiting {
                    println!("  apply:     {w}");
                }
                if !t.roles_without_login.is_empty() {
                    println!(
                        "  roles:     {} log in on the source but not here: give each a \
                         password and LOGIN (ALTER ROLE ... LOGIN PASSWORD ...)",
                        t.roles_without_login.join(", ")
                    );
                }
                match &l.last_good {
                    Some(at) => println!(
                        "  last good: {at} ({}) took {}, {} rows written, {} deleted",
                        ago(l.last_good_age_s),
                        millis(l.last_good_ms),
                        l.last_inserts.unwrap_or(0),
                        l.last_deletes.unwrap_or(0)
                    ),
                    None => println!("  last good: never"),
                }
                match &l.last_bad {
                    Some(at) => println!(
                        "  last bad:  {at} ({}) took {}",
                        ago(l.last_bad_age_s),
                        millis(l.last_bad_ms)
                    ),
                    None => println!("  last bad:  never"),
                }
                if let Some(e) = &l.last_error {
                    println!(
                        "  error:     {e}{}",
                        l.last_sqlstate
                            .as_deref()
                            .map(|c| format!(" (SQLSTATE {c})"))
                            .unwrap_or_default()
                    );
                }
                println!("  pending:   {}", t.pending.map(|p| p.to_string()).unwrap_or("?".into()));
                println!(
                    "  lag:       {}",
                    t.lag_seconds.map(|l| format!("{l:.1}s")).unwrap_or("?".into())
                );
            }
        }
        return;
    }
    // Fits 80 columns: the phase's first words here, its explanation (and
    // what to do) on a line of its own below; the rest in --expanded.
    let mut t = table(&["sync", "target", "phase", "lag", "pending", "last good", "last bad"]);
    for s in syncs {
        for tg in &s.targets {
            let l = &tg.last;
            t.add_row(vec![
                s.name.clone(),
                tg.target.clone(),
                tg.phase.split(':').next().unwrap_or_default().to_string(),
                tg.lag_seconds.map(|l| format!("{l:.1}s")).unwrap_or("?".into()),
                tg.pending.map(|p| p.to_string()).unwrap_or("?".into()),
                ago(l.last_good_age_s),
                ago(l.last_bad_age_s),
            ]);
        }
    }
    println!("{t}");
    for s in syncs {
        if let Some(e) = &s.source_error {
            println!("{}: the source cannot be read: {e}", s.name);
        }
        for tg in &s.targets {
            if let Some(e) = &tg.target_error {
                println!("{}: target {} cannot be read: {e}", s.name, tg.target);
            }
        }
        for tg in s.targets.iter().filter(|t| t.phase.contains(':')) {
            println!("{} -> {}: {}", s.name, tg.target, tg.phase);
        }
        for tg in s.targets.iter().filter(|t| t.last.state == "bad") {
            if let Some(e) = &tg.last.last_error {
                println!("{} -> {}: last error: {e}", s.name, tg.target);
            }
        }
        if let Some(reason) = &s.paused {
            println!("{}: {reason}; then pgleap sync resume {}", s.name, s.name);
        }
        for n in &s.not_captured {
            println!("{}: {n}", s.name);
        }
        for tg in s.targets.iter().filter(|t| !t.roles_without_login.is_empty()) {
            println!(
                "{} -> {}: roles to give a password and LOGIN: {}",
                s.name,
                tg.target,
                tg.roles_without_login.join(", ")
            );
        }
    }
}

/// Asks a yes/no question on the terminal; without one, the answer is no.
/// On stderr, so that stdout holds only the results (`--json`).
pub fn confirm(question: &str) -> bool {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        eprintln!("{question} no terminal to ask: not now (use --cutover auto)");
        return false;
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    matches!(answer.trim(), "y" | "Y" | "yes")
}

pub fn cutover(r: &crate::cutover::CutoverReport, as_json: bool) {
    if as_json {
        return json(r);
    }
    if r.dry_run {
        println!(
            "dry run of the cutover of sync \"{}\" to \"{}\": predicted write downtime {:.3} s \
             ({} tables, {} sequences, {} foreign keys and {} triggers to add); the source was not fenced",
            r.sync,
            r.target,
            r.fence_ms as f64 / 1000.0,
            r.tables,
            r.sequences,
            r.foreign_keys,
            r.triggers
        );
        for object in &r.would_create {
            println!("the cutover would create on the target: {object}");
        }
        print_steps("predicted inside the fence", &r.inside_fence);
        print_steps("before the fence (writes go on)", &r.before_fence);
    } else {
        println!(
            "cut over sync \"{}\" to \"{}\": writes were fenced for {:.3} s; {} tables drained, \
             {} sequences set, {} foreign keys validated, {} triggers created; the source now refuses writes",
            r.sync,
            r.target,
            r.fence_ms as f64 / 1000.0,
            r.tables,
            r.sequences,
            r.foreign_keys,
            r.triggers
        );
        print_steps("inside the fence", &r.inside_fence);
        print_steps("before the fence (writes went on)", &r.before_fence);
        if let Some(ms) = r.paused_ms {
            println!(
                "the poolers held the clients' queries for {:.3} s and sent them to \"{}\"",
                ms as f64 / 1000.0,
                r.target
            );
        }
        if let Some(ms) = r.large_objects_ms {
            println!("the fence included the last large-object pass: {:.3} s", ms as f64 / 1000.0);
        }
        if let Some(back) = &r.rollback_sync {
            println!(
                "rollback sync \"{back}\" captures on \"{}\" and replicates back; \
                 pgleap status {back} shows it",
                r.target
            );
        }
        if !r.others.is_empty() {
            match &r.keep_sync {
                Some(keep) => println!(
                    "the other targets ({}) were brought to the same final state; sync \"{keep}\" \
                     keeps them following \"{}\"",
                    r.others.join(", "),
                    r.target
                ),
                None => println!(
                    "the other targets ({}) were brought to the same final state and left as they \
                     are (nothing follows \"{}\" to them)",
                    r.others.join(", "),
                    r.target
                ),
            }
        }
    }
}

/// The end of `upgrade`: each step's time, the write downtime, what next.
/// One line of a cutover's steps and their times: where a rehearsal says
/// the time goes.
fn print_steps(what: &str, steps: &[crate::cutover::StepTime]) {
    if steps.is_empty() {
        return;
    }
    let parts: Vec<String> =
        steps.iter().map(|s| format!("{} {:.3} s", s.step, s.ms as f64 / 1000.0)).collect();
    println!("{what}: {}", parts.join(", "));
}

pub fn upgrade_summary(r: &crate::upgrade::UpgradeReport, as_json: bool) {
    if as_json {
        return json(r);
    }
    let total: f64 = r.steps.iter().map(|s| s.seconds).sum();
    let share = |seconds: f64| {
        if total > 0.0 { format!("{:.0} %", 100.0 * seconds / total) } else { String::new() }
    };
    let mut t = table(&["step", "time", "share"]);
    for s in &r.steps {
        t.add_row(vec![s.step.clone(), format!("{:.1} s", s.seconds), share(s.seconds)]);
        // The cutover's own steps, the fence's among them.
        if s.step == "cutover"
            && let Some(c) = &r.cutover
        {
            let inner = c
                .before_fence
                .iter()
                .map(|s| ("", s))
                .chain(c.inside_fence.iter().map(|s| ("fence: ", s)));
            for (prefix, s) in inner {
                let seconds = s.ms as f64 / 1000.0;
                t.add_row(vec![
                    format!("  {prefix}{}", s.step),
                    format!("{seconds:.3} s"),
                    share(seconds),
                ]);
            }
        }
    }
    println!("{t}");
    match &r.cutover {
        Some(c) => println!("write downtime: {:.3} s", c.fence_ms as f64 / 1000.0),
        None => println!("write downtime: none yet (not cut over)"),
    }
    for n in &r.next {
        println!("next: {n}");
    }
}

/// A server move's rollback (or any one-fence cutover of several
/// databases): each database's share, and the server's write downtime.
pub fn server_cutover(r: &crate::cutover::ServerCutoverReport, as_json: bool) {
    if as_json {
        return json(r);
    }
    for d in &r.databases {
        println!(
            "cut over sync \"{}\" to \"{}\": writes were fenced for {:.3} s; {} tables drained, \
             {} sequences set",
            d.sync,
            d.target,
            d.fence_ms as f64 / 1000.0,
            d.tables,
            d.sequences
        );
    }
    print_steps("inside the fence", &r.inside_fence);
    server_downtime(r);
}

/// The server's write downtime, and the poolers' pause.
fn server_downtime(r: &crate::cutover::ServerCutoverReport) {
    println!(
        "write downtime of the server: {:.3} s ({} databases in one fence)",
        r.fence_ms as f64 / 1000.0,
        r.databases.len()
    );
    if let Some(ms) = r.paused_ms {
        println!("the poolers held the clients' queries for {:.3} s", ms as f64 / 1000.0);
    }
}

/// The end of a server move: each database, the fence, what is left to do.
pub fn server_summary(r: &crate::server::ServerReport, as_json: bool) {
    if as_json {
        return json(r);
    }
    let mut t = table(&["database", "sync", "tables", "MB", "created", "fenced"]);
    for d in &r.databases {
        let fenced = r
            .cutover
            .as_ref()
            .and_then(|c| c.databases.iter().find(|c| c.sync == d.sync))
            .map_or(String::new(), |c| format!("{:.3} s", c.fence_ms as f64 / 1000.0));
        t.add_row(vec![
            d.database.clone(),
            d.sync.clone(),
            d.preflight.tables.to_string(),
            format!("{:.1}", d.preflight.size_bytes as f64 / 1e6),
            if d.created { "yes".into() } else { "no".into() },
            fenced,
        ]);
    }
    println!("{t}");
    let mut steps = table(&["step", "time", "share"]);
    for s in &r.steps {
        steps.add_row(vec![
            s.step.clone(),
            format!("{:.1} s", s.seconds),
            format!("{:.0} %", 100.0 * s.share),
        ]);
    }
    if let Some(c) = &r.cutover {
        for (prefix, s) in c
            .before_fence
            .iter()
            .map(|s| ("  ", s))
            .chain(c.inside_fence.iter().map(|s| ("  fence: ", s)))
        {
            steps.add_row(vec![
                format!("{prefix}{}", s.step),
                format!("{:.3} s", s.ms as f64 / 1000.0),
                String::new(),
            ]);
        }
        // Where each database's share of the fence went.
        for d in &c.databases {
            for s in &d.inside_fence {
                steps.add_row(vec![
                    format!("    {}: {}", d.sync, s.step),
                    format!("{:.3} s", s.ms as f64 / 1000.0),
                    String::new(),
                ]);
            }
        }
    }
    println!("{steps}");
    if !r.passwords_to_set.is_empty() {
        println!(
            "roles to give a password and LOGIN on the target: {}",
            r.passwords_to_set.join(", ")
        );
    }
    match &r.cutover {
        Some(c) => server_downtime(c),
        None => println!("write downtime: none yet (not cut over)"),
    }
    for n in &r.next {
        println!("next: {n}");
    }
}

/// What `schema copy` (and the upgrade's schema step) adds to pg_dump's
/// part: roles, and the objects it could not create.
pub fn schema_copied(c: &crate::schema::SchemaCopied) {
    for line in c.lines() {
        println!("{line}");
    }
}

pub fn verify(reports: &[crate::verify::TargetReport], as_json: bool) {
    if as_json {
        return json(&reports);
    }
    for crate::verify::TargetReport { target, tables, schema } in reports {
        let mut t = table(&["table", "source rows", "target rows", "result", "differing keys"]);
        for r in tables {
            t.add_row(vec![
                r.table.clone(),
                r.source_rows.to_string(),
                r.target_rows.to_string(),
                if r.equal { "equal" } else { "DIFFERENT" }.to_string(),
                r.differing_keys
                    .iter()
                    .cloned()
                    .chain(r.missing.iter().map(|m| format!("missing on the target: {m}")))
                    .collect::<Vec<_>>()
                    .join("; "),
            ]);
        }
        println!("target \"{target}\"");
        println!("{t}");
        let resumed: u32 = tables.iter().map(|r| r.resumed_parts).sum();
        if resumed > 0 {
            println!(
                "resumed: {resumed} part(s) found equal by an interrupted verify were not \
                 compared again"
            );
        }
        let unchanged: u32 = tables.iter().map(|r| r.unchanged_parts).sum();
        if unchanged > 0 {
            let compared: u32 = tables.iter().map(|r| r.parts - r.unchanged_parts).sum();
            println!(
                "incremental: {unchanged} part(s) found equal by the last verify and untouched \
                 since were not compared again; {compared} compared"
            );
        }
        if schema.is_empty() {
            println!("schema: every object equal");
        }
        for d in schema {
            println!("schema: {}", crate::fidelity::describe(d));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_like_pg_size_pretty() {
        assert_eq!(super::size(10), "10 bytes");
        assert_eq!(super::size(1536), "1.5 kB");
        assert_eq!(super::size(8 * 1024 * 1024), "8.0 MB");
    }
}
