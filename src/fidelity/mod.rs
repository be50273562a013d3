//! Schema fidelity: the objects of a database, kind by kind, as definitions
//! that compare across major versions; what the target lacks or has
//! different; and what pgleap creates, at the stage where it belongs.
//!
//! Every object is read from the catalog by the server's own deparsing
//! functions (`pg_get_indexdef`, `pg_get_constraintdef`, `pg_identify_object`
//! ...) under an empty search_path, so names come out qualified and quoted
//! by the server's rules on both sides. Stages:
//!
//! - pre-data: created by `schema copy` (pg_dump) or by pgleap right after
//!   it: policies and the row-security flag, comments, privileges, database
//!   settings. The owner bypasses row security unless it is forced, so the
//!   copy and the sync are not affected.
//! - after the data: indexes at every level of a partition tree and on
//!   materialized views, key and check constraints (NOT VALID kept NOT
//!   VALID), materialized views populated, statistics.
//! - at cutover, inside the fence: foreign keys and triggers (they would
//!   fire during apply; see `target`), and FORCE ROW LEVEL SECURITY (it
//!   would filter pgleap's own writes).

mod checks;
mod kinds;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

pub use checks::{create_role_sql, forced_row_security, missing_roles, untrusted_functions};
use kinds::*;

use crate::apply::Plan;
use crate::error::Result;
use crate::pg::{Conn, Sql};
use crate::pg::{NamedQuery, PgVersion};

/// When an object is created on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    PreData,
    AfterData,
    Cutover,
}

/// One object of one side.
#[derive(Debug, Clone)]
struct Object {
    kind: &'static str,
    /// Qualified and quoted by the server; unique within the kind.
    name: String,
    definition: String,
    stage: Stage,
    /// How pgleap creates it on the target, when it does.
    create: Option<String>,
    /// Order among creations (lower first), after the stage.
    rank: u8,
    /// How a privilege is taken back when the target grants it and the
    /// source does not.
    revoke: Option<String>,
}

/// What the target lacks or has different.
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub kind: &'static str,
    pub name: String,
    /// `missing`, `different` or `extra` (a privilege the source does not
    /// grant).
    pub problem: &'static str,
    pub source: String,
    pub target: String,
    pub stage: Stage,
    /// Why pgleap did not create it, once it tried (or cannot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip)]
    create: Option<String>,
    #[serde(skip)]
    rank: u8,
}

/// Which objects are compared: the schemas (all user schemas when empty)
/// and, within them, the tables (all when `None`) with their partitions
/// and inheritance children. pgleap's own schemas are left out.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub schemas: Vec<String>,
    pub tables: Option<Vec<String>>,
    pub exclude: Vec<String>,
}

impl Difference {
    /// Whether pgleap tried to create it and the server refused.
    pub fn create_failed(&self) -> bool {
        self.reason.is_some()
    }
}

impl Scope {
    /// A sync's tables and their schemas, without pgleap's own schema.
    pub fn of_plan(plan: &Plan) -> Scope {
        Scope {
            schemas: Vec::new(),
            tables: Some(plan.tables.iter().map(|t| t.table.clone()).collect()),
            exclude: vec![plan.schema.clone()],
        }
    }
}

/// Compares the two databases within `scope`.
pub async fn compare(src: &Conn, tgt: &Conn, scope: &Scope) -> Result<Vec<Difference>> {
    let source = inventory(src, scope, Side::Source).await?;
    let target = inventory(tgt, scope, Side::Target).await?;
    Ok(diff(source, target))
}

/// Creates on the target what pgleap creates of `differences`, up to
/// `stage`; returns those still missing or different, each with the reason
/// when creating it failed. Each creation is one statement: a failure
/// leaves nothing half-made and does not stop the others.
pub async fn create(
    tgt: &Conn,
    mut differences: Vec<Difference>,
    stage: Stage,
) -> Result<Vec<Difference>> {
    differences.sort_by_key(|d| (d.stage, d.rank));
    let mut left = Vec::new();
    for mut d in differences {
        let Some(sql) = d.create.clone().filter(|_| d.stage <= stage) else {
            left.push(d);
            continue;
        };
        match tgt.batch_execute(&sql).await {
            Ok(()) => tracing::info!(kind = d.kind, name = d.name, "created on the target"),
            Err(e) => {
                d.reason = Some(e.message().to_string());
                left.push(d);
            }
        }
    }
    Ok(left)
}

/// What [`create`] would do, without leaving anything: each creation is
/// tried in one transaction that is rolled back (a savepoint each), so a
/// statement the target refuses (a grant to a role it lacks) is found as
/// the cutover would find it. Returns (what would be created, the rest,
/// with the reason where the target refused).
pub async fn rehearse_create(
    tgt: &Conn,
    mut differences: Vec<Difference>,
    stage: Stage,
) -> Result<(Vec<Difference>, Vec<Difference>)> {
    differences.sort_by_key(|d| (d.stage, d.rank));
    let (mut created, mut left) = (Vec::new(), Vec::new());
    tgt.batch_execute("begin").await?;
    let result = async {
        for mut d in differences {
            let Some(sql) = d.create.clone().filter(|_| d.stage <= stage) else {
                left.push(d);
                continue;
            };
            tgt.batch_execute("savepoint rehearsal").await?;
            match tgt.batch_execute(&sql).await {
                Ok(()) => {
                    tgt.batch_execute("release rehearsal").await?;
                    created.push(d);
                }
                Err(e) => {
                    tgt.batch_execute("rollback to rehearsal").await?;
                    d.reason = Some(e.message().to_string());
                    left.push(d);
                }
            }
        }
        Ok::<_, crate::Error>(())
    }
    .await;
    let rolled_back = tgt.batch_execute("rollback").await;
    result?;
    rolled_back?;
    Ok((created, left))
}

/// Differences that must be settled before a switch: everything but what
/// the cutover itself creates.
pub fn blocking(differences: &[Difference]) -> Vec<&Difference> {
    differences.iter().filter(|d| d.stage < Stage::Cutover).collect()
}

fn diff(source: Vec<Object>, target: Vec<Object>) -> Vec<Difference> {
    let key = |o: &Object| (o.kind, o.name.clone());
    let target: BTreeMap<_, Object> = target.into_iter().map(|o| (key(&o), o)).collect();
    let source_keys: BTreeSet<_> = source.iter().map(key).collect();
    let mut out = Vec::new();
    for s in source {
        let (problem, target_def) = match target.get(&key(&s)) {
            None => ("missing", String::new()),
            Some(t) if t.definition != s.definition => ("different", t.definition.clone()),
            Some(_) => continue,
        };
        out.push(Difference {
            kind: s.kind,
            name: s.name,
            problem,
            source: s.definition,
            target: target_def,
            stage: s.stage,
            reason: None,
            create: s.create,
            rank: s.rank,
        });
    }
    // A privilege the target grants and the source does not is a hole, not
    // a detail: only PUBLIC's are reported (every new function and type
    // grants to PUBLIC); grants to named roles on the target are taken as
    // the administrator's.
    for (k, t) in target {
        if t.kind == PRIVILEGE && t.name.ends_with(" to PUBLIC") && !source_keys.contains(&k) {
            out.push(Difference {
                kind: t.kind,
                name: t.name,
                problem: "extra",
                source: String::new(),
                target: t.definition,
                stage: Stage::PreData,
                reason: None,
                create: t.revoke,
                rank: t.rank,
            });
        }
    }
    out
}

const PRIVILEGE: &str = "privilege";
pub const FORCED_ROW_SECURITY: &str = "forced row level security";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Source,
    Target,
}

/// The schemas in scope.
async fn schemas(c: &Conn, scope: &Scope) -> Result<Vec<String>> {
    let tables = scope.tables.clone().unwrap_or_default();
    let rows = c
        .query(
            SCHEMAS_IN_SCOPE,
            &[&scope.schemas, &scope.exclude, &scope.tables.is_some(), &tables],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The relations in scope: tables (with their partitions and children),
/// views, materialized views, sequences; none belonging to an extension.
async fn relations(c: &Conn, scope: &Scope, schemas: &[String]) -> Result<Vec<u32>> {
    let tables = scope.tables.clone().unwrap_or_default();
    let rows = c.query(RELATIONS_IN_SCOPE, &[&schemas, &scope.tables.is_some(), &tables]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Each kind of object with its query (see `kinds`) and the stage at
/// which it belongs on the target.
fn kinds(v: PgVersion) -> Vec<(&'static str, String, Stage)> {
    vec![
        ("schema", SCHEMAS.into(), Stage::PreData),
        ("extension", EXTENSIONS.into(), Stage::PreData),
        ("table", TABLES.into(), Stage::PreData),
        ("column", columns_sql(v), Stage::PreData),
        ("view", VIEWS.into(), Stage::PreData),
        ("materialized view", MATVIEWS.into(), Stage::PreData),
        ("sequence", SEQUENCES.into(), Stage::PreData),
        ("type", TYPES.into(), Stage::PreData),
        ("function", functions_sql(v), Stage::PreData),
        ("policy", POLICIES.into(), Stage::PreData),
        ("comment", COMMENTS.into(), Stage::PreData),
        ("setting", SETTINGS.into(), Stage::PreData),
        ("event trigger", EVENT_TRIGGERS.into(), Stage::PreData),
        ("index", INDEXES.into(), Stage::AfterData),
        ("constraint", CONSTRAINTS.into(), Stage::AfterData),
        ("replica identity", REPLICA_IDENTITY.into(), Stage::AfterData),
        ("materialized view data", MATVIEW_DATA.into(), Stage::AfterData),
        ("trigger", triggers_sql(v), Stage::Cutover),
    ]
}

/// A kind's query with its parameters typed: not every query uses both
/// ($1 the relations' oids, $2 the schemas' names).
fn kind_query(sql: &str) -> String {
    format!("select * from ({sql}) q where $1::oid[] is not null and $2::text[] is not null")
}

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries(v: PgVersion) -> Vec<NamedQuery> {
    let mut out: Vec<NamedQuery> = kinds(v)
        .into_iter()
        .map(|(kind, sql, _)| NamedQuery::new(format!("fidelity: {kind}"), kind_query(&sql)))
        .collect();
    for side in [Side::Source, Side::Target] {
        out.push(NamedQuery::new(
            format!("fidelity: statistics ({side:?} side)"),
            statistics_sql(v, side),
        ));
    }
    out.extend(static_catalog_queries());
    out.extend(kind_catalog_queries());
    out.extend(checks::catalog_queries(v));
    out
}

/// Every object in scope, read from one side.
async fn inventory(c: &Conn, scope: &Scope, side: Side) -> Result<Vec<Object>> {
    let schemas = schemas(c, scope).await?;
    let oids = relations(c, scope, &schemas).await?;
    let mut out = Vec::new();
    for (kind, sql, stage) in kinds(c.version()) {
        for r in c.query_qualified(&kind_query(&sql), &[&oids, &schemas]).await? {
            let (name, mut definition, create, rank): (String, String, Option<String>, i32) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            // Check and key constraints come after the data; foreign keys
            // at cutover. A comment comes with its object.
            let stage = match r.try_get::<_, Option<&str>>(4) {
                Ok(Some("after-data")) => Stage::AfterData,
                Ok(Some("cutover")) => Stage::Cutover,
                _ if kind == "constraint" && definition.starts_with("FOREIGN KEY") => {
                    Stage::Cutover
                }
                _ => stage,
            };
            if kind.ends_with("view") {
                definition = unqualified(&definition);
            }
            out.push(Object {
                kind,
                name,
                definition,
                stage,
                create,
                rank: rank as u8,
                revoke: None,
            });
        }
    }
    out.extend(row_security(c, &oids).await?);
    out.extend(privileges(c, &oids, &schemas).await?);
    out.extend(statistics(c, &oids, side).await?);
    Ok(out)
}

/// A definition cut to what a report line can show (a view's query runs to
/// pages); `--json` keeps them whole.
fn abbreviated(definition: &str) -> String {
    const SHOWN: usize = 120;
    let flat = definition.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(SHOWN) {
        Some((i, _)) => format!("{}…", &flat[..i]),
        None => flat,
    }
}

/// One line per difference, for reports.
pub fn describe(d: &Difference) -> String {
    let what = match d.problem {
        "missing" => format!("{} {} is missing on the target", d.kind, d.name),
        "extra" => format!("{} {} is granted on the target only", d.kind, d.name),
        _ => format!(
            "{} {} differs: source {:?}, target {:?}",
            d.kind,
            d.name,
            abbreviated(&d.source),
            abbreviated(&d.target)
        ),
    };
    match &d.reason {
        Some(r) => format!("{what} (not created: {r})"),
        None => what,
    }
}

// The catalog queries of this module, named.

const SCHEMAS_IN_SCOPE: &str = "select n.nspname::text from pg_namespace n
    where n.nspname <> all($2)
      and n.nspname not in ('pg_catalog', 'information_schema')
      and n.nspname not like 'pg\\_toast%' and n.nspname not like 'pg\\_temp\\_%'
      and n.nspname not like 'pg\\_toast\\_temp\\_%'
      and not exists (select 1 from pg_depend d
                      where d.classid = 'pg_namespace'::regclass and d.objid = n.oid
                        and d.deptype = 'e')
      and (case when $3 then n.oid in (select c.relnamespace from pg_class c
                                       where c.oid = any(select to_regclass(t)::oid
                                                         from unnest($4::text[]) t))
                when cardinality($1::text[]) > 0 then n.nspname = any($1)
                else true end)
    order by 1";

const RELATIONS_IN_SCOPE: &str = "with recursive base as (
        select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = any($1) and c.relkind in ('r', 'p', 'f')
          and (not $2 or c.oid = any(select to_regclass(t)::oid
                                     from unnest($3::text[]) t))
        union
        select i.inhrelid from pg_inherits i join base b on i.inhparent = b.oid)
    select oid from base
    union
    select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where n.nspname = any($1) and c.relkind in ('v', 'm', 'S')
      and not exists (select 1 from pg_depend d
                      where d.classid = 'pg_class'::regclass and d.objid = c.oid
                        and d.deptype in ('e', 'i'))";

fn static_catalog_queries() -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("fidelity: schemas in scope", SCHEMAS_IN_SCOPE),
        NamedQuery::new("fidelity: relations in scope", RELATIONS_IN_SCOPE),
    ]
}
