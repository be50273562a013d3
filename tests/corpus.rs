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

use crate::support::{OWNER, Pgleap, Sql, TestDb, cluster, tool, writes_until_fenced};

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

/// The schemas a user's objects live in.
const USER_SCHEMAS: &str = "(select oid from pg_namespace
    where nspname not in ('pg_catalog', 'information_schema', 'pgleap')
      and nspname not like 'pg\\_toast%' and nspname not like 'pg\\_temp%')";

/// Every object's definition, as a DBA would list them to compare two
/// servers: columns, indexes, constraints, triggers, rules, functions,
/// views, types, sequences (with their values), partitions, policies,
/// privileges and comments.
fn objects(sql: &Sql) -> Vec<Vec<Option<String>>> {
    sql.rows(&format!(
        "set search_path = '';
         select 'column', a.attrelid::regclass::text || '.' || a.attname,
                concat_ws(' ', format_type(a.atttypid, a.atttypmod), a.attnotnull::text,
                          pg_get_expr(d.adbin, d.adrelid), a.attidentity,
                          nullif(to_jsonb(a) ->> 'attgenerated', ''),
                          (select collname from pg_collation where oid = a.attcollation
                             and a.attcollation <> 100))
           from pg_attribute a join pg_class c on c.oid = a.attrelid
           left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
          where c.relnamespace in {USER_SCHEMAS} and c.relkind in ('r', 'p', 'v', 'm', 'f')
            and a.attnum > 0 and not a.attisdropped
         union all
         select 'index', indexrelid::regclass::text, pg_get_indexdef(indexrelid)
           from pg_index i join pg_class c on c.oid = i.indrelid
          where c.relnamespace in {USER_SCHEMAS}
         union all
         select 'constraint', conrelid::regclass::text || ' ' || conname,
                pg_get_constraintdef(oid) || ' ' || convalidated::text
           from pg_constraint where connamespace in {USER_SCHEMAS}
            -- NOT NULL: a column's attnotnull (18 also lists it here).
            and contype <> 'n'
         union all
         select 'trigger', tgrelid::regclass::text || ' ' || tgname,
                pg_get_triggerdef(oid) || ' ' || tgenabled::text
           from pg_trigger where not tgisinternal and tgname not like 'pgleap%'
            and tgrelid in (select oid from pg_class where relnamespace in {USER_SCHEMAS})
         union all
         select 'rule', schemaname || '.' || tablename || ' ' || rulename, definition
           from pg_rules where schemaname not in ('pg_catalog', 'pgleap')
         union all
         select 'function', p.oid::regprocedure::text,
                concat_ws(' ', coalesce(to_jsonb(p) ->> 'prokind',
                                        case when to_jsonb(p) ->> 'proisagg' = 'true' then 'a'
                                             when to_jsonb(p) ->> 'proiswindow' = 'true' then 'w'
                                             else 'f' end),
                          pg_get_function_result(p.oid), p.provolatile,
                          p.prosecdef::text, l.lanname, p.prosrc, p.proconfig::text)
           from pg_proc p join pg_language l on l.oid = p.prolang
          where p.pronamespace in {USER_SCHEMAS}
            -- An extension's own functions come with its version, which
            -- each major ships its own of.
            and not exists (select 1 from pg_depend e
                            where e.classid = 'pg_proc'::regclass and e.objid = p.oid
                              and e.deptype = 'e')
         union all
         select 'aggregate', aggfnoid::regprocedure::text,
                concat_ws(' ', aggkind, aggtransfn::regproc::text, aggfinalfn::regproc::text,
                          aggtranstype::regtype::text, agginitval)
           from pg_aggregate
          where aggfnoid in (select oid from pg_proc where pronamespace in {USER_SCHEMAS})
            and not exists (select 1 from pg_depend e
                            where e.classid = 'pg_proc'::regclass and e.objid = aggfnoid
                              and e.deptype = 'e')
         union all
         -- 16 and later print a view's columns without their table's
         -- name where one table is in scope: qualifiers are left out.
         select 'view', c.oid::regclass::text,
                c.relkind::text || ' ' ||
                regexp_replace(regexp_replace(pg_get_viewdef(c.oid),
                                              '(\"[^\"]+\"|\\m[[:alpha:]_][[:alnum:]_]*)\\.', '', 'g'),
                               '\\s+', ' ', 'g') || ' ' ||
                coalesce((select ispopulated::text from pg_matviews m
                          where m.schemaname = n.nspname and m.matviewname = c.relname), '')
           from pg_class c join pg_namespace n on n.oid = c.relnamespace
          where c.relnamespace in {USER_SCHEMAS} and c.relkind in ('v', 'm')
         union all
         select 'type', t.oid::regtype::text,
                concat_ws(' ', t.typtype, format_type(t.typbasetype, t.typtypmod), t.typnotnull::text,
                          (select string_agg(enumlabel, ',' order by enumsortorder)
                             from pg_enum where enumtypid = t.oid),
                          (select string_agg(pg_get_constraintdef(k.oid), ',' order by conname)
                             from pg_constraint k where k.contypid = t.oid))
           from pg_type t
          where t.typnamespace in {USER_SCHEMAS} and t.typtype in ('d', 'e', 'r')
            and not exists (select 1 from pg_depend e
                            where e.classid = 'pg_type'::regclass and e.objid = t.oid
                              and e.deptype = 'e')
         union all
         select 'sequence', s.seqrelid::regclass::text,
                concat_ws(' ', s.seqtypid::regtype::text, s.seqincrement, s.seqmin, s.seqmax,
                          s.seqcycle::text, q.last_value)
           from pg_sequence s join pg_class c on c.oid = s.seqrelid
           join pg_sequences q on q.schemaname = c.relnamespace::regnamespace::text
                              and q.sequencename = c.relname
          where c.relnamespace in {USER_SCHEMAS}
         union all
         select 'partition', c.oid::regclass::text,
                i.inhparent::regclass::text || ' ' || pg_get_expr(c.relpartbound, c.oid)
           from pg_class c join pg_inherits i on i.inhrelid = c.oid
          where c.relnamespace in {USER_SCHEMAS} and c.relispartition
         union all
         select 'policy', schemaname || '.' || tablename || ' ' || policyname,
                concat_ws(' ', permissive, roles::text, cmd, qual, with_check)
           from pg_policies
         union all
         select 'row security', oid::regclass::text,
                relrowsecurity::text || relforcerowsecurity::text
           from pg_class where relrowsecurity and relnamespace in {USER_SCHEMAS}
         union all
         select 'acl', c.oid::regclass::text || ' ' || a.grantee::text, a.privilege_type
           from pg_class c, aclexplode(c.relacl) a
          where c.relnamespace in {USER_SCHEMAS} and a.grantee <> c.relowner
         union all
         -- Who besides the owner may use or create in each schema (the
         -- owner of public differs by major: pg_database_owner since 15).
         select 'schema acl', n.nspname,
                (select string_agg(case a.grantee when 0 then 'PUBLIC'
                                   else a.grantee::regrole::text end || ':' || a.privilege_type,
                                   ',' order by 1)
                   from aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
                  where a.grantee <> n.nspowner)
           from pg_namespace n where n.oid in {USER_SCHEMAS}
         union all
         select 'comment', classoid::regclass::text || ' ' || objoid::text || ' ' || objsubid,
                description
           from pg_description
          where classoid = 'pg_class'::regclass
            and objoid in (select oid from pg_class where relnamespace in {USER_SCHEMAS})
         order by 1, 2, 3;
         reset search_path"
    ))
    .into_iter()
    // The comment's key names the table by its oid, which differs: the
    // comment is compared by its text and table.
    .map(|mut row| {
        if row[0].as_deref() == Some("comment") {
            row[1] = None;
        }
        row
    })
    .collect()
}

/// Every table's rows (partitions each on their own), as text, sorted.
/// Floats by their bits: 11 and 12 print one float4 as "0.0500000007" and
/// "0.05".
fn rows(sql: &Sql) -> Vec<(String, Vec<Vec<Option<String>>>)> {
    let tables = sql.rows(&format!(
        "select c.oid::regclass::text,
                coalesce(string_agg(
                    case when a.atttypid in (700, 701)
                         then format('encode(float8send(%I::float8), ''hex'')', a.attname)
                         else quote_ident(a.attname) end, ', ' order by a.attnum), '')
         from pg_class c
         left join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
         where c.relkind = 'r' and c.relnamespace in {USER_SCHEMAS}
         group by c.oid order by 1"
    ));
    tables
        .into_iter()
        .map(|t| {
            let (name, columns) = (t[0].clone().unwrap(), t[1].clone().unwrap());
            let all =
                sql.rows(&format!("select row({columns})::text from only {name} x order by 1"));
            (name, all)
        })
        .collect()
}

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
