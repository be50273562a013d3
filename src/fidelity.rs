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

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::error::Result;
use crate::pg::{Conn, Sql, quote_ident};

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
    /// A sync's tables (quoted, qualified) and their schemas, without
    /// pgleap's own schema.
    pub fn of_tables(tables: Vec<String>, pgleap_schema: &str) -> Scope {
        Scope { schemas: Vec::new(), tables: Some(tables), exclude: vec![pgleap_schema.into()] }
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

/// Differences that must be settled before a switch: everything but what
/// the cutover itself creates.
pub fn blocking(differences: &[Difference]) -> Vec<&Difference> {
    differences.iter().filter(|d| d.stage < Stage::Cutover).collect()
}

/// Roles named by the source's privileges, policies and settings that the
/// target lacks.
pub async fn missing_roles(src: &Conn, tgt: &Conn, scope: &Scope) -> Result<Vec<String>> {
    let oids = relations(src, scope).await?;
    let schemas = schemas(src, scope).await?;
    let rows = src
        .query(
            "select distinct r.rolname::text from pg_roles r
             where r.rolname <> current_user and (
               exists (select 1 from pg_class c, aclexplode(c.relacl) a
                       where c.oid = any($1) and a.grantee = r.oid)
               or exists (select 1 from pg_attribute t, aclexplode(t.attacl) a
                          where t.attrelid = any($1) and a.grantee = r.oid)
               or exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace,
                                 aclexplode(p.proacl) a
                          where n.nspname = any($2) and a.grantee = r.oid)
               or exists (select 1 from pg_namespace n, aclexplode(n.nspacl) a
                          where n.nspname = any($2) and a.grantee = r.oid)
               or exists (select 1 from pg_policy p where p.polrelid = any($1)
                          and r.oid = any(p.polroles))
               or exists (select 1 from pg_default_acl d, aclexplode(d.defaclacl) a
                          where a.grantee = r.oid or d.defaclrole = r.oid)
               or exists (select 1 from pg_db_role_setting s
                          where s.setrole = r.oid and s.setdatabase =
                                (select oid from pg_database where datname = current_database())))
             order by 1",
            &[&oids, &schemas],
        )
        .await?;
    let wanted: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let present: Vec<String> = tgt
        .query("select rolname::text from pg_roles where rolname = any($1)", &[&wanted])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(wanted.into_iter().filter(|r| !present.contains(r)).collect())
}

/// Tables whose row security applies to this role (forced on a table it
/// owns, and the role does not bypass row security): pgleap could not read
/// them whole. Its sessions run with `row_security = off`, so reading one
/// fails instead of returning fewer rows.
pub async fn forced_row_security(c: &Conn) -> Result<Vec<String>> {
    let rows = c
        .query_qualified(
            "select c.oid::regclass::text from pg_class c
             join pg_namespace n on n.oid = c.relnamespace
             where c.relrowsecurity and c.relforcerowsecurity and c.relkind in ('r', 'p')
               and n.nspname not in ('pg_catalog', 'information_schema')
               and not exists (select 1 from pg_roles r where r.rolname = current_user
                               and (r.rolsuper or r.rolbypassrls))
             order by 1",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Functions in a language only a superuser may create functions in (C,
/// untrusted procedural languages): pg_restore of the schema would fail on
/// them as a table owner. One line each, with the language.
pub async fn untrusted_functions(c: &Conn, scope: &Scope) -> Result<Vec<String>> {
    let schemas = schemas(c, scope).await?;
    let rows = c
        .query_qualified(
            "select p.oid::regprocedure::text || ' (language ' || l.lanname || ')'
             from pg_proc p join pg_namespace n on n.oid = p.pronamespace
             join pg_language l on l.oid = p.prolang
             where n.nspname = any($1) and not l.lanpltrusted
               and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass
                               and d.objid = p.oid and d.deptype = 'e')
             order by 1",
            &[&schemas],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The command that creates a role the target lacks: without a password
/// (pgleap cannot read one), NOLOGIN unless `login`.
pub fn create_role_sql(role: &str, login: bool) -> String {
    format!("CREATE ROLE {} {}", quote_ident(role), if login { "LOGIN" } else { "NOLOGIN" })
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

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Source,
    Target,
}

/// The schemas in scope.
async fn schemas(c: &Conn, scope: &Scope) -> Result<Vec<String>> {
    let tables = scope.tables.clone().unwrap_or_default();
    let rows = c
        .query(
            "select n.nspname::text from pg_namespace n
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
             order by 1",
            &[&scope.schemas, &scope.exclude, &scope.tables.is_some(), &tables],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The relations in scope: tables (with their partitions and children),
/// views, materialized views, sequences; none belonging to an extension.
async fn relations(c: &Conn, scope: &Scope) -> Result<Vec<u32>> {
    let schemas = schemas(c, scope).await?;
    let tables = scope.tables.clone().unwrap_or_default();
    let rows = c
        .query(
            "with recursive base as (
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
                                 and d.deptype in ('e', 'i'))",
            &[&schemas, &scope.tables.is_some(), &tables],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Every object in scope, read from one side.
async fn inventory(c: &Conn, scope: &Scope, side: Side) -> Result<Vec<Object>> {
    let oids = relations(c, scope).await?;
    let schemas = schemas(c, scope).await?;
    let major = c.version().major();
    let mut out = Vec::new();
    let kinds: [(&str, String, Stage); 18] = [
        ("schema", SCHEMAS.into(), Stage::PreData),
        ("extension", EXTENSIONS.into(), Stage::PreData),
        ("table", TABLES.into(), Stage::PreData),
        ("column", columns_sql(major), Stage::PreData),
        ("view", VIEWS.into(), Stage::PreData),
        ("materialized view", MATVIEWS.into(), Stage::PreData),
        ("sequence", SEQUENCES.into(), Stage::PreData),
        ("type", TYPES.into(), Stage::PreData),
        ("function", functions_sql(major), Stage::PreData),
        ("policy", POLICIES.into(), Stage::PreData),
        ("comment", COMMENTS.into(), Stage::PreData),
        ("setting", SETTINGS.into(), Stage::PreData),
        ("event trigger", EVENT_TRIGGERS.into(), Stage::PreData),
        ("index", INDEXES.into(), Stage::AfterData),
        ("constraint", CONSTRAINTS.into(), Stage::AfterData),
        ("replica identity", REPLICA_IDENTITY.into(), Stage::AfterData),
        ("materialized view data", MATVIEW_DATA.into(), Stage::AfterData),
        ("trigger", triggers_sql(major), Stage::Cutover),
    ];
    for (kind, sql, stage) in kinds {
        // Typed here: not every query uses both parameters.
        let sql = format!(
            "select * from ({sql}) q where $1::oid[] is not null and $2::text[] is not null"
        );
        for r in c.query_qualified(&sql, &[&oids, &schemas]).await? {
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

// Each query returns (name, definition, create, rank), over the relations
// in scope ($1, oids) and the schemas in scope ($2, names). `create` is
// null for what pgleap leaves to pg_dump (pre-data objects) or to `target`
// (foreign keys and triggers).

const SCHEMAS: &str = "
    select quote_ident(nspname), '', null::text, 0 from pg_namespace where nspname = any($2)";

const EXTENSIONS: &str = "
    select quote_ident(extname), '', null::text, 0 from pg_extension where extname <> 'plpgsql'";

/// Tables: kind, persistence, partitioning (10 and later, as every
/// supported source), inheritance, storage options.
const TABLES: &str = "
    select c.oid::regclass::text,
            concat_ws(' ',
              case c.relkind when 'p' then 'partitioned by ' || pg_get_partkeydef(c.oid)
                             when 'f' then 'foreign' end,
              case c.relpersistence when 'u' then 'unlogged' end,
              case when c.relispartition
                   then 'partition of ' || (select i.inhparent::regclass::text from pg_inherits i
                                            where i.inhrelid = c.oid)
                        || ' ' || pg_get_expr(c.relpartbound, c.oid)
                   else 'inherits ' || (select string_agg(i.inhparent::regclass::text, ', '
                                                          order by i.inhseqno)
                                        from pg_inherits i where i.inhrelid = c.oid) end,
              'with ' || (select string_agg(o, ', ' order by o) from unnest(c.reloptions) o)),
            null::text, 0
     from pg_class c where c.oid = any($1) and c.relkind in ('r', 'p', 'f')";

/// A replica identity other than the default: FULL and NOTHING come with
/// pg_dump's pre-data, USING INDEX needs the index, so after the data.
const REPLICA_IDENTITY: &str = "
    select c.oid::regclass::text, r.identity,
           'alter table ' || c.oid::regclass::text || ' replica identity ' || r.identity, 4
    from pg_class c,
         lateral (select case c.relreplident when 'f' then 'full' when 'n' then 'nothing'
                    when 'i' then 'using index ' ||
                      (select quote_ident(ic.relname) from pg_index i
                       join pg_class ic on ic.oid = i.indexrelid
                       where i.indrelid = c.oid and i.indisreplident) end) r(identity)
    where c.oid = any($1) and c.relkind in ('r', 'p') and c.relreplident <> 'd'";

fn columns_sql(major: u32) -> String {
    let generated = if major >= 12 { "a.attgenerated" } else { "''" };
    format!(
        "select a.attrelid::regclass::text || '.' || quote_ident(a.attname),
                concat_ws(' ', format_type(a.atttypid, a.atttypmod),
                  case when a.attcollation <> t.typcollation
                       then 'collate ' || (select quote_ident(n.nspname) || '.' ||
                                                  quote_ident(l.collname)
                                           from pg_collation l
                                           join pg_namespace n on n.oid = l.collnamespace
                                           where l.oid = a.attcollation) end,
                  case when a.attnotnull then 'not null' end,
                  case a.attidentity when 'a' then 'generated always as identity'
                                     when 'd' then 'generated by default as identity' end,
                  case when {generated} = 's' then 'generated always as '
                       else 'default ' end || pg_get_expr(d.adbin, d.adrelid),
                  case when coalesce(a.attstattarget, -1) >= 0
                       then 'statistics ' || a.attstattarget end),
                null::text, 0
         from pg_attribute a
         join pg_class c on c.oid = a.attrelid
         join pg_type t on t.oid = a.atttypid
         left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
         where a.attrelid = any($1) and c.relkind in ('r', 'p', 'f')
           and a.attnum > 0 and not a.attisdropped"
    )
}

const VIEWS: &str = "
    select c.oid::regclass::text,
           concat_ws(' ', 'with ' || array_to_string(c.reloptions, ', '),
                     pg_get_viewdef(c.oid)),
           null::text, 0
    from pg_class c where c.oid = any($1) and c.relkind = 'v'";

const MATVIEWS: &str = "
    select c.oid::regclass::text, pg_get_viewdef(c.oid), null::text, 0
    from pg_class c where c.oid = any($1) and c.relkind = 'm'";

/// Populated the way the source's is; refreshed after the indexes (rank),
/// materialized views built on others after those (oid order).
const MATVIEW_DATA: &str = "
    select c.oid::regclass::text, 'populated',
           'refresh materialized view ' || c.oid::regclass::text, 8
    from pg_class c where c.oid = any($1) and c.relkind = 'm' and c.relispopulated
    order by c.oid";

const SEQUENCES: &str = "
    select c.oid::regclass::text,
           concat_ws(' ', format_type(s.seqtypid, null), 'start', s.seqstart,
                     'increment', s.seqincrement, 'minvalue', s.seqmin, 'maxvalue', s.seqmax,
                     'cache', s.seqcache, case when s.seqcycle then 'cycle' end,
                     'owned by ' || (select d.refobjid::regclass::text || '.' ||
                                            quote_ident(a.attname)
                                     from pg_depend d join pg_attribute a
                                       on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
                                     where d.classid = 'pg_class'::regclass
                                       and d.objid = c.oid and d.deptype = 'a'
                                       and d.refclassid = 'pg_class'::regclass)),
           null::text, 0
    from pg_class c join pg_sequence s on s.seqrelid = c.oid
    where c.oid = any($1) and c.relkind = 'S'";

const TYPES: &str = "
    select t.oid::regtype::text,
           case t.typtype
             when 'e' then 'enum ' || (select string_agg(quote_literal(e.enumlabel), ', '
                                                         order by e.enumsortorder)
                                       from pg_enum e where e.enumtypid = t.oid)
             when 'd' then concat_ws(' ', 'domain', format_type(t.typbasetype, t.typtypmod),
                                     case when t.typnotnull then 'not null' end,
                                     'default ' || t.typdefault,
                                     (select string_agg(pg_get_constraintdef(k.oid), ' '
                                                        order by k.conname)
                                      from pg_constraint k where k.contypid = t.oid))
             when 'c' then 'composite ' || (select string_agg(quote_ident(a.attname) || ' ' ||
                                                              format_type(a.atttypid, a.atttypmod),
                                                              ', ' order by a.attnum)
                                            from pg_attribute a where a.attrelid = t.typrelid
                                              and a.attnum > 0 and not a.attisdropped)
             when 'r' then 'range of ' || (select format_type(r.rngsubtype, null)
                                           from pg_range r where r.rngtypid = t.oid)
           end,
           null::text, 0
    from pg_type t join pg_namespace n on n.oid = t.typnamespace
    where n.nspname = any($2) and t.typtype in ('e', 'd', 'c', 'r')
      and (t.typtype <> 'c' or (select c.relkind from pg_class c where c.oid = t.typrelid) = 'c')
      and not exists (select 1 from pg_depend d where d.classid = 'pg_type'::regclass
                      and d.objid = t.oid and d.deptype = 'e')";

fn functions_sql(major: u32) -> String {
    // prokind: 11 and later; SQL-standard bodies (prosqlbody): 14 and later.
    let kind = if major >= 11 {
        "p.prokind::text"
    } else {
        "case when p.proisagg then 'a' when p.proiswindow then 'w' else 'f' end"
    };
    let body = if major >= 14 {
        "case when p.prosqlbody is not null then pg_get_functiondef(p.oid) else p.prosrc end"
    } else {
        "p.prosrc"
    };
    format!(
        "select p.oid::regprocedure::text,
                concat_ws(' ', {kind}, 'returns', pg_get_function_result(p.oid),
                          'language', l.lanname, p.provolatile, p.proparallel,
                          case when p.proisstrict then 'strict' end,
                          case when p.prosecdef then 'security definer' end,
                          case when p.proleakproof then 'leakproof' end,
                          'set ' || array_to_string(p.proconfig, ', '),
                          'body md5 ' || md5({body})),
                null::text, 0
         from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         join pg_language l on l.oid = p.prolang
         where n.nspname = any($2)
           and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass
                           and d.objid = p.oid and d.deptype = 'e')"
    )
}

/// Policies: roles and expressions as `pg_policies` deparses them.
const POLICIES: &str = "
    select quote_ident(p.policyname) || ' on ' || c.oid::regclass::text,
           concat_ws(' ', p.permissive, 'for', p.cmd, 'to',
                     (select string_agg(case when r = 'public' then 'PUBLIC'
                                             else quote_ident(r) end, ', ' order by r)
                      from unnest(p.roles) r),
                     'using (' || p.qual || ')', 'with check (' || p.with_check || ')'),
           concat_ws(' ', 'create policy', quote_ident(p.policyname), 'on',
                     c.oid::regclass::text, 'as', p.permissive, 'for', p.cmd, 'to',
                     (select string_agg(case when r = 'public' then 'PUBLIC'
                                             else quote_ident(r) end, ', ' order by r)
                      from unnest(p.roles) r),
                     'using (' || p.qual || ')', 'with check (' || p.with_check || ')'),
           1
    from pg_policies p
    join pg_namespace n on n.nspname = p.schemaname
    join pg_class c on c.relnamespace = n.oid and c.relname = p.tablename
    where c.oid = any($1)";

/// Comments on every object in scope, with the statement that sets them
/// (the object's identity as the server writes it).
const COMMENTS: &str = "
    select o.type || ' ' || o.identity, d.description,
           case when o.type in ('table', 'view', 'materialized view', 'sequence', 'index',
                                'foreign table', 'function', 'procedure', 'aggregate', 'type',
                                'domain', 'schema', 'trigger', 'policy', 'rule')
                  then 'comment on ' || o.type || ' ' || o.identity
                when o.type = 'table column' then 'comment on column ' || o.identity
                when o.type = 'table constraint' then 'comment on constraint ' || o.identity
                when o.type = 'domain constraint'
                  then 'comment on constraint ' || replace(o.identity, ' on ', ' on domain ')
           end || ' is ' || quote_literal(d.description),
           7,
           case when o.type = 'index' then 'after-data'
                when o.type = 'trigger' then 'cutover'
                when o.type = 'table constraint' then
                  (select case k.contype when 'f' then 'cutover' else 'after-data' end
                   from pg_constraint k where k.oid = d.objoid)
           end
    from pg_description d, pg_identify_object(d.classoid, d.objoid, d.objsubid) o
    where (o.schema = any($2) or (o.type = 'schema' and o.identity = any(
                                  select quote_ident(s) from unnest($2::text[]) s)))
      and (d.classoid <> 'pg_class'::regclass or d.objoid = any($1)
           or d.objoid in (select i.indexrelid from pg_index i where i.indrelid = any($1)))
      and not exists (select 1 from pg_depend e where e.classid = d.classoid
                      and e.objid = d.objoid and e.deptype = 'e')";

/// Settings of the database and of roles in it. `default_transaction_read_only`
/// is left out: it is what `cutover --terminate` sets on the old server.
/// A value is set in the session first and stored `FROM CURRENT`, so it is
/// parsed exactly as the server parses the setting (lists included).
const SETTINGS: &str = "
    with s as (
      select r.rolname, split_part(cfg, '=', 1) as name,
             substr(cfg, length(split_part(cfg, '=', 1)) + 2) as value
      from pg_db_role_setting x
      left join pg_roles r on r.oid = x.setrole,
      unnest(x.setconfig) cfg
      where x.setdatabase = (select oid from pg_database where datname = current_database()))
    select case when rolname is null then 'database ' || name
                else 'role ' || quote_ident(rolname) || ' ' || name end,
           value,
           format('do $pgleap$ begin perform set_config(%L, %L, false); '
                  'execute format(%L, current_database()); '
                  'execute %L; end $pgleap$',
                  name, value,
                  case when rolname is null then 'alter database %I set ' ||
                                                 quote_ident(name) || ' from current'
                       else 'alter role ' || replace(quote_ident(rolname), '%', '%%') ||
                            ' in database %I set ' || quote_ident(name) || ' from current' end,
                  'reset ' || quote_ident(name)),
           9
    from s where name <> 'default_transaction_read_only'";

/// Event triggers of the database (pg_dump puts them in its post-data
/// section, which schema copy does not restore). Creating one needs a
/// superuser: for a table owner it is named, with the server's refusal.
const EVENT_TRIGGERS: &str = "
    select quote_ident(e.evtname),
           concat_ws(' ', 'on', e.evtevent, 'tags', array_to_string(e.evttags, ', '),
                     'execute', e.evtfoid::regprocedure::text, 'enabled', e.evtenabled),
           format('create event trigger %I on %I%s execute procedure %s()', e.evtname,
                  e.evtevent,
                  case when e.evttags is not null
                       then ' when tag in (' || (select string_agg(quote_literal(t), ', ')
                                                 from unnest(e.evttags) t) || ')'
                       else '' end,
                  e.evtfoid::regproc::text),
           2
    from pg_event_trigger e
    where not exists (select 1 from pg_depend d where d.classid = 'pg_event_trigger'::regclass
                      and d.objid = e.oid and d.deptype = 'e')";

/// Indexes of tables at every level, partitions first so that the parent's
/// index attaches them (created plainly it cascades to partitions that
/// lack one). Constraint indexes come with their constraint.
const INDEXES: &str = "
    select i.indexrelid::regclass::text,
           replace(pg_get_indexdef(i.indexrelid), ' ON ONLY ', ' ON '),
           case when not exists (select 1 from pg_constraint k
                                 where k.conindid = i.indexrelid and k.conrelid = i.indrelid
                                   and k.contype in ('p', 'u', 'x'))
                then replace(pg_get_indexdef(i.indexrelid), ' ON ONLY ', ' ON ') end,
           case when c.relispartition then 2 else 3 end
    from pg_index i join pg_class c on c.oid = i.indrelid
    where i.indrelid = any($1)";

/// Constraints defined on the table itself (those a partition inherits come
/// with its parent's). Not-null constraints (18) are the columns'.
const CONSTRAINTS: &str = "
    select quote_ident(k.conname) || ' on ' || k.conrelid::regclass::text,
           pg_get_constraintdef(k.oid),
           case when k.contype <> 'f' and k.conislocal
                     and not exists (select 1 from pg_inherits i join pg_constraint p
                                       on p.conrelid = i.inhparent and p.conname = k.conname
                                     where i.inhrelid = k.conrelid and k.contype <> 'c')
                then 'alter table ' || k.conrelid::regclass::text || ' add constraint ' ||
                     quote_ident(k.conname) || ' ' || pg_get_constraintdef(k.oid) end,
           case when c.relispartition then 2 else 3 end
    from pg_constraint k join pg_class c on c.oid = k.conrelid
    where k.conrelid = any($1) and k.contype in ('c', 'f', 'p', 'u', 'x')";

fn triggers_sql(major: u32) -> String {
    // 13 and later mark the triggers a partition inherits with tgparentid;
    // earlier majors mark them internal.
    let own = if major >= 13 { "and t.tgparentid = 0" } else { "" };
    format!(
        "select quote_ident(t.tgname) || ' on ' || t.tgrelid::regclass::text,
                pg_get_triggerdef(t.oid) ||
                  case t.tgenabled when 'D' then ' (disabled)' when 'R' then ' (replica)'
                                   when 'A' then ' (always)' else '' end,
                null::text, 0
         from pg_trigger t
         where t.tgrelid = any($1) and not t.tgisinternal and t.tgname not like 'pgleap\\_%' {own}"
    )
}

/// Row security: enabled before the data (the owner is not subject to it),
/// forced at cutover (forced, it would filter pgleap's own writes).
async fn row_security(c: &Conn, oids: &[u32]) -> Result<Vec<Object>> {
    let rows = c
        .query_qualified(
            "select c.oid::regclass::text, c.relrowsecurity, c.relforcerowsecurity
             from pg_class c where c.oid = any($1)
               and (c.relrowsecurity or c.relforcerowsecurity)",
            &[&oids],
        )
        .await?;
    let mut out = Vec::new();
    for r in rows {
        let (table, enabled, forced): (String, bool, bool) = (r.get(0), r.get(1), r.get(2));
        for (on, kind, stage, verb) in [
            (enabled, "row level security", Stage::PreData, "enable"),
            (forced, FORCED_ROW_SECURITY, Stage::Cutover, "force"),
        ] {
            if on {
                out.push(Object {
                    kind,
                    create: Some(format!("alter table {table} {verb} row level security")),
                    name: table.clone(),
                    definition: "on".into(),
                    stage,
                    rank: 1,
                    revoke: None,
                });
            }
        }
    }
    Ok(out)
}

/// Privileges granted to others than the owner, one object per privilege:
/// on relations, columns, functions, schemas and types in scope, and
/// default privileges. Defaults count as granted (a new function is
/// executable by PUBLIC unless revoked).
async fn privileges(c: &Conn, oids: &[u32], schemas: &[String]) -> Result<Vec<Object>> {
    let rows = c
        .query_qualified(
            "select 'table', c.oid::regclass::text, a.grantee, a.privilege_type, a.is_grantable,
                    case c.relkind when 'S' then 'sequence' else 'table' end, null::text
             from pg_class c, aclexplode(coalesce(c.relacl, acldefault(
                 (case c.relkind when 'S' then 's' else 'r' end)::\"char\", c.relowner))) a
             where c.oid = any($1) and a.grantee <> c.relowner
             union all
             select 'column', t.attrelid::regclass::text || '.' || quote_ident(t.attname),
                    a.grantee, a.privilege_type, a.is_grantable, 'table',
                    quote_ident(t.attname)
             from pg_attribute t join pg_class c on c.oid = t.attrelid, aclexplode(t.attacl) a
             where t.attrelid = any($1) and a.grantee <> c.relowner and not t.attisdropped
             union all
             select 'function', p.oid::regprocedure::text, a.grantee, a.privilege_type,
                    a.is_grantable, 'function', null
             from pg_proc p join pg_namespace n on n.oid = p.pronamespace,
                  aclexplode(coalesce(p.proacl, acldefault('f'::\"char\", p.proowner))) a
             where n.nspname = any($2) and a.grantee <> p.proowner
               and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass
                               and d.objid = p.oid and d.deptype = 'e')
             union all
             select 'schema', quote_ident(n.nspname), a.grantee, a.privilege_type,
                    a.is_grantable, 'schema', null
             from pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n'::\"char\", n.nspowner))) a
             where n.nspname = any($2) and a.grantee <> n.nspowner
             union all
             select 'type', t.oid::regtype::text, a.grantee, a.privilege_type, a.is_grantable,
                    'type', null
             from pg_type t join pg_namespace n on n.oid = t.typnamespace,
                  aclexplode(coalesce(t.typacl, acldefault('T'::\"char\", t.typowner))) a
             where n.nspname = any($2) and t.typtype in ('e', 'd', 'r')
               and a.grantee <> t.typowner
             union all
             select 'default', concat_ws(' ', 'for role ' || quote_ident(r.rolname),
                                         'in schema ' || quote_ident(n.nspname), 'on',
                                         case d.defaclobjtype when 'r' then 'tables'
                                           when 'S' then 'sequences' when 'f' then 'functions'
                                           when 'T' then 'types' when 'n' then 'schemas' end),
                    a.grantee, a.privilege_type, a.is_grantable, '', null
             from pg_default_acl d join pg_roles r on r.oid = d.defaclrole
             left join pg_namespace n on n.oid = d.defaclnamespace,
                  aclexplode(d.defaclacl) a
             where a.grantee <> d.defaclrole
               and (n.nspname is null or n.nspname = any($2))",
            &[&oids, &schemas],
        )
        .await?;
    let mut grantees: BTreeMap<u32, String> = BTreeMap::new();
    for r in c.query("select oid, rolname::text from pg_roles", &[]).await? {
        grantees.insert(r.get(0), quote_ident(r.get::<_, &str>(1)));
    }
    let mut out = Vec::new();
    for r in rows {
        let (what, object, grantee, privilege, grantable, class, column): (
            &str,
            String,
            u32,
            String,
            bool,
            &str,
            Option<String>,
        ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6));
        let to = if grantee == 0 {
            "PUBLIC".to_string()
        } else {
            grantees.get(&grantee).cloned().unwrap_or_else(|| grantee.to_string())
        };
        let option = if grantable { " with grant option" } else { "" };
        let target = match (what, &column) {
            ("column", Some(col)) => {
                let table = object.strip_suffix(&format!(".{col}")).unwrap_or(&object);
                format!("{privilege} ({col}) on table {table}")
            }
            ("default", _) => String::new(),
            _ => format!("{privilege} on {class} {object}"),
        };
        let (name, create, revoke) = if what == "default" {
            let (on, tail) = object.rsplit_once(" on ").unwrap_or(("", &object));
            (
                format!("default {object}: {privilege} to {to}"),
                format!(
                    "alter default privileges {on} grant {privilege} on {tail} to {to}{option}"
                ),
                format!("alter default privileges {on} revoke {privilege} on {tail} from {to}"),
            )
        } else {
            (
                format!("{target} to {to}"),
                format!("grant {target} to {to}{option}"),
                format!("revoke {target} from {to}"),
            )
        };
        out.push(Object {
            kind: PRIVILEGE,
            name,
            definition: if grantable { "with grant option".into() } else { String::new() },
            stage: Stage::PreData,
            create: Some(create),
            revoke: Some(revoke),
            rank: 6,
        });
    }
    Ok(out)
}

/// Tables and materialized views with statistics. The source's are all
/// expected (whether the source has analyzed them or not); on the target a
/// table counts once analyzed.
async fn statistics(c: &Conn, oids: &[u32], side: Side) -> Result<Vec<Object>> {
    let analyzed = if side == Side::Source {
        "true".to_string()
    } else {
        let reltuples = if c.version().major() >= 14 { "or c.reltuples >= 0" } else { "" };
        format!(
            "(pg_stat_get_last_analyze_time(c.oid) is not null
              or pg_stat_get_last_autoanalyze_time(c.oid) is not null {reltuples}
              or exists (select 1 from pg_stats s join pg_namespace n on n.nspname = s.schemaname
                         where n.oid = c.relnamespace and s.tablename = c.relname))"
        )
    };
    let rows = c
        .query_qualified(
            &format!(
                "select c.oid::regclass::text from pg_class c
                 where c.oid = any($1) and (c.relkind = 'r' or (c.relkind = 'm' and c.relispopulated))
                   and {analyzed}"
            ),
            &[&oids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let table: String = r.get(0);
            Object {
                kind: "statistics",
                create: Some(format!("analyze {table}")),
                name: table,
                definition: "analyzed".into(),
                stage: Stage::AfterData,
                rank: 10,
                revoke: None,
            }
        })
        .collect())
}

/// A view's definition without the qualifiers of names (`t.col`,
/// `public.t`): 16 and later leave out what earlier majors wrote when a
/// query reads one relation. Literals are kept as they are.
fn unqualified(def: &str) -> String {
    let chars: Vec<char> = def.chars().collect();
    let mut out = String::with_capacity(def.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            // A literal, to its closing quote ('' inside is two quotes).
            let start = i;
            i += 1;
            while i < chars.len() {
                if chars[i] == '\'' && chars.get(i + 1) == Some(&'\'') {
                    i += 2;
                } else if chars[i] == '\'' {
                    i += 1;
                    break;
                } else {
                    i += 1;
                }
            }
            out.extend(&chars[start..i]);
            continue;
        }
        let start = i;
        if c == '"' {
            i += 1;
            while i < chars.len() && !(chars[i] == '"' && chars.get(i + 1) != Some(&'"')) {
                i += if chars[i] == '"' { 2 } else { 1 };
            }
            i = (i + 1).min(chars.len());
        } else if c.is_alphabetic() || c == '_' {
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$')
            {
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
            continue;
        }
        let next = chars.get(i + 1).copied().unwrap_or(' ');
        if chars.get(i) == Some(&'.') && (next == '"' || next.is_alphabetic() || next == '_') {
            i += 1;
        } else {
            out.extend(&chars[start..i]);
        }
    }
    out
}

/// One line per difference, for reports.
pub fn describe(d: &Difference) -> String {
    let what = match d.problem {
        "missing" => format!("{} {} is missing on the target", d.kind, d.name),
        "extra" => format!("{} {} is granted on the target only", d.kind, d.name),
        _ => format!("{} {} differs: source {:?}, target {:?}", d.kind, d.name, d.source, d.target),
    };
    match &d.reason {
        Some(r) => format!("{what} (not created: {r})"),
        None => what,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn view_definitions_compare_without_qualifiers() {
        assert_eq!(
            super::unqualified(
                "SELECT t.id, \"My T\".\"x.y\" FROM public.t WHERE (t.s = 'a.b'::text) AND 1.5 > 1"
            ),
            "SELECT id, \"x.y\" FROM t WHERE (s = 'a.b'::text) AND 1.5 > 1"
        );
    }
}
