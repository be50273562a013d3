//! The corpus: public schemas nobody on the project wrote (tests/corpus,
//! README.md there gives each file's origin, commit and licence), each
//! moved live by `pgleap upgrade` as the non-superuser owner while its own
//! write load runs, cut over by the upgrade or by `pgleap cutover` on its
//! own (see [`Cut`]); then every table's rows and every object's
//! definition on the target are compared with the source's.
//!
//! The default run moves each schema once, between two majors it can live
//! on; `scripts/test -- --ignored corpus` moves them between the other
//! pairs too.

use std::io::Write;
use std::process::Stdio;

use crate::support::compare::{objects, rows};
use crate::support::{OWNER, Pgleap, TestDb, cluster, tool, writes_until_fenced};

/// One public schema: how to load it and how to write to it meanwhile.
struct Schema {
    name: &'static str,
    /// Loaded in order, as the owner.
    files: &'static [&'static str],
    /// Statements of one write transaction; `{i}` is its number.
    load: &'static str,
}

const CHINOOK: Schema = Schema {
    name: "chinook",
    files: &[include_str!("corpus/chinook.sql")],
    load: include_str!("corpus/chinook-load.sql"),
};

const NORTHWIND: Schema = Schema {
    name: "northwind",
    files: &[include_str!("corpus/northwind.sql")],
    load: include_str!("corpus/northwind-load.sql"),
};

/// PostgreSQL 18 only (uuidv7() defaults, a virtual generated column).
const PAGILA: Schema = Schema {
    name: "pagila",
    files: &[
        include_str!("corpus/pagila-pre-data.sql"),
        include_str!("corpus/pagila-data.sql"),
        include_str!("corpus/pagila-post-data.sql"),
    ],
    load: include_str!("corpus/pagila-load.sql"),
};

/// A real application's schema (apflora, as PostgREST's tests keep it):
/// 45 tables, 281 views, PL/pgSQL triggers, row security, trusted
/// extensions (so 13 and later as a non-superuser), and 499 tables without
/// columns. Published without rows: generated.
const APFLORA: Schema = Schema {
    name: "apflora",
    files: &[
        include_str!("corpus/apflora.sql"),
        // Its triggers record the requesting user, a NOT NULL column.
        "set request.jwt.claim.username = 'corpus';",
        include_str!("corpus/generate.sql"),
    ],
    load: include_str!("corpus/apflora-load.sql"),
};

/// Public datasets as Neon publishes them (pg_dump plain files of 15):
/// 8,807 Netflix titles keyed by text, the periodic table with quoted
/// CamelCase columns and numerics, a table named "2019" with a sequence
/// never drawn from. 12 and later (`default_table_access_method`).
const DATASETS: Schema = Schema {
    name: "datasets",
    files: &[
        include_str!("corpus/netflix.sql"),
        include_str!("corpus/periodic_table.sql"),
        include_str!("corpus/happiness_index.sql"),
    ],
    load: include_str!("corpus/datasets-load.sql"),
};

/// Loads the schema's files, in order, through one psql session as the
/// owner (pg_dump's plain files carry their rows as COPY ... FROM stdin).
fn load(db: &TestDb, schema: &Schema) {
    let mut psql = tool("psql")
        .args(["-q", "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", OWNER])
        .args(["-p", &db.cluster.port.to_string(), "-d", &db.name])
        .env("PGPASSWORD", &db.cluster.owner_password)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = psql.stdin.take().unwrap();
    for file in schema.files {
        stdin.write_all(file.as_bytes()).unwrap();
        stdin.write_all(b"\n;\n").unwrap();
    }
    drop(stdin);
    let out = psql.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loading {} into {}: {stderr}", schema.name, db.name);
}

/// How a move ends.
#[derive(Clone, Copy)]
enum Cut {
    /// `upgrade --cutover auto`: verify, then a cutover that trusts it.
    ByUpgrade,
    /// `upgrade --cutover never` (the daemon follows), then `pgleap
    /// cutover` on its own: row counts at one point before the fence,
    /// each drained key compared inside it.
    Separately,
}

/// Moves `schema` from PostgreSQL `from` to `to` under its write load and
/// compares everything.
fn moves_live(schema: &Schema, from: u32, to: u32, cut: Cut) {
    let label = format!("corpus{}{from}to{to}", schema.name);
    let src = TestDb::new(cluster(from), &format!("{label}src"));
    let dst = TestDb::new(cluster(to), &format!("{label}dst"));
    load(&src, schema);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let load = schema.load;
    let writer = writes_until_fenced(src.sql(), move |i| load.replace("{i}", &i.to_string()));
    let mode = match cut {
        Cut::ByUpgrade => "auto",
        Cut::Separately => "never",
    };
    let out =
        p.run(&["upgrade", "--source", &src.dsn(), "--target", &dst.dsn(), "--cutover", mode]);
    println!("{out}");
    out.ok();
    if let Cut::Separately = cut {
        let cutover = p.run(&["cutover", "upgrade"]);
        println!("{cutover}");
        assert!(cutover.ok().contains("writes were fenced for"), "{cutover}");
        p.run(&["stop"]).ok();
    }
    let writes = writer.join().unwrap();
    assert!(writes > 0, "{}: no write went through during the move", schema.name);
    let (s, d) = (src.sql(), dst.sql());
    let (source_rows, target_rows) = (rows(&s), rows(&d));
    assert!(!source_rows.is_empty());
    for ((table, a), (_, b)) in source_rows.iter().zip(&target_rows) {
        assert!(
            a == b,
            "{}: {table} differs ({} rows on the source, {})",
            schema.name,
            a.len(),
            b.len()
        );
    }
    assert_eq!(
        source_rows.iter().map(|t| &t.0).collect::<Vec<_>>(),
        target_rows.iter().map(|t| &t.0).collect::<Vec<_>>(),
        "{}: the tables differ",
        schema.name
    );
    let (a, b) = (objects(&s), objects(&d));
    let only_source: Vec<_> = a.iter().filter(|o| !b.contains(o)).collect();
    let only_target: Vec<_> = b.iter().filter(|o| !a.contains(o)).collect();
    assert!(
        only_source.is_empty() && only_target.is_empty(),
        "{}: objects differ\n  source only: {only_source:#?}\n  target only: {only_target:#?}",
        schema.name
    );
    println!(
        "{}: {} tables, {} rows, {} objects equal after {writes} write transactions",
        schema.name,
        source_rows.len(),
        source_rows.iter().map(|t| t.1.len()).sum::<usize>(),
        a.len()
    );
    let verify = p.run(&["verify", "upgrade"]);
    assert!(verify.ok().contains("schema: every object equal"), "{verify}");
}

#[test]
fn chinook_moves_live_pg12_to_pg17() {
    moves_live(&CHINOOK, 12, 17, Cut::Separately);
}

/// Its real columns: 11 prints floats unlike 12 and later.
#[test]
fn northwind_moves_live_pg11_to_pg17() {
    moves_live(&NORTHWIND, 11, 17, Cut::ByUpgrade);
}

#[test]
fn apflora_moves_live_pg15_to_pg17() {
    moves_live(&APFLORA, 15, 17, Cut::ByUpgrade);
}

#[test]
#[ignore = "the whole corpus: scripts/test -- --ignored corpus"]
fn apflora_moves_live_pg17_to_pg18() {
    moves_live(&APFLORA, 17, 18, Cut::Separately);
}

#[test]
fn datasets_move_live_pg12_to_pg18() {
    moves_live(&DATASETS, 12, 18, Cut::Separately);
}

#[test]
#[ignore = "the whole corpus: scripts/test -- --ignored corpus"]
fn datasets_move_live_pg15_to_pg15() {
    moves_live(&DATASETS, 15, 15, Cut::ByUpgrade);
}

/// A same-major move (new hardware): pagila needs PostgreSQL 18.
#[test]
fn pagila_moves_live_pg18_to_pg18() {
    moves_live(&PAGILA, 18, 18, Cut::Separately);
}

#[test]
#[ignore = "the whole corpus: scripts/test -- --ignored corpus"]
fn chinook_moves_live_pg10_to_pg15() {
    moves_live(&CHINOOK, 10, 15, Cut::ByUpgrade);
}

#[test]
#[ignore = "the whole corpus: scripts/test -- --ignored corpus"]
fn chinook_moves_live_pg17_to_pg18() {
    moves_live(&CHINOOK, 17, 18, Cut::ByUpgrade);
}

#[test]
#[ignore = "the whole corpus: scripts/test -- --ignored corpus"]
fn northwind_moves_live_pg15_to_pg18() {
    moves_live(&NORTHWIND, 15, 18, Cut::Separately);
}

#[test]
#[ignore = "the whole corpus: scripts/test -- --ignored corpus"]
fn northwind_moves_live_pg12_to_pg12() {
    moves_live(&NORTHWIND, 12, 12, Cut::Separately);
}
