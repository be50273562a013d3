//! What a source database holds: resolving a relgroup's selection (schemas,
//! tables, sequences) into concrete relations with their replication key and
//! size, as the server sees them now.
//!
//! A partitioned table is one unit, named by its root: its partitions are
//! never members of their own (rows move between partitions on UPDATE, and
//! the target may partition differently). A table's key is its primary key,
//! else the narrowest unique index that is valid, immediate, not partial, not
//! on expressions, and on NOT NULL columns only: the same rule as PostgreSQL's
//! own REPLICA IDENTITY USING INDEX. A table with neither is *keyless*: it
//! is replicated by whole-row images (see `capture`), unless refused.

use tokio_postgres::error::SqlState;

use crate::catalog::Relation;
use crate::error::{Error, Result};
use crate::pg::{Conn, NamedQuery, PgVersion, Sql, quote_ident};

/// Schemas never replicated: the system's and pgleap's own.
const SYSTEM_SCHEMAS: &[&str] = &["information_schema", "pgleap"];

/// What the user asked for.
#[derive(Debug, Default, Clone)]
pub struct Selection {
    pub all_tables: bool,
    pub all_sequences: bool,
    pub schemas: Vec<String>,
    pub exclude_schemas: Vec<String>,
    pub tables: Vec<String>,
    pub exclude_tables: Vec<String>,
    pub sequences: Vec<String>,
    /// Refuse tables without a usable key instead of replicating them by
    /// whole-row images.
    pub refuse_keyless: bool,
    /// Take the database's large objects too; `None`: if it has any.
    pub large_objects: Option<bool>,
}

impl Selection {
    fn is_empty(&self) -> bool {
        !self.all_tables
            && !self.all_sequences
            && self.schemas.is_empty()
            && self.tables.is_empty()
            && self.sequences.is_empty()
    }
}

/// `schema.name` as a user would type it: quoted only where needed.
pub fn display_name(schema: &str, name: &str) -> String {
    fn part(s: &str) -> String {
        let simple = s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if simple { s.to_string() } else { quote_ident(s) }
    }
    format!("{}.{}", part(schema), part(name))
}

/// Resolves a selection on the source.
pub async fn resolve(client: &Conn, sel: &Selection) -> Result<Vec<Relation>> {
    let db = client.name();
    if sel.is_empty() {
        return Err(Error::invalid(
            "nothing selected",
            "name what to replicate: --all-tables, --schema S, --table SCHEMA.NAME, \
             --all-sequences or --sequence SCHEMA.NAME",
        ));
    }
    let relations = describe(client, sel).await?;
    let keyless: Vec<String> = relations
        .iter()
        .filter(|r| r.kind != "sequence" && r.key_columns.is_empty())
        .map(|r| display_name(&r.schema, &r.name))
        .collect();
    if !keyless.is_empty() && sel.refuse_keyless {
        return Err(Error::invalid(
            format!(
                "{} table(s) in database \"{db}\" have neither a primary key nor a usable unique \
                 index: {}",
                keyless.len(),
                keyless.join(", ")
            ),
            "add a key on the source (ALTER TABLE ... ADD PRIMARY KEY (col, ...), or a unique \
             index on NOT NULL columns), leave these tables out with --exclude-table, or drop \
             --keyless refuse to replicate them by whole-row images",
        ));
    }
    if relations.is_empty() {
        return Err(Error::invalid(
            format!("the selection matches no table or sequence in database \"{db}\""),
            "check --schema/--exclude-schema, or list tables with --table SCHEMA.NAME",
        ));
    }
    Ok(relations)
}

/// The tables (schema, name) a selection matches, keyed or not.
pub async fn tables(client: &Conn, sel: &Selection) -> Result<Vec<(String, String)>> {
    Ok(describe(client, sel)
        .await?
        .into_iter()
        .filter(|r| r.kind != "sequence")
        .map(|r| (r.schema, r.name))
        .collect())
}

/// Every relation a selection matches, with its key and size; no judgement.
async fn describe(client: &Conn, sel: &Selection) -> Result<Vec<Relation>> {
    let db = client.name();
    for schema in sel.schemas.iter().chain(&sel.exclude_schemas) {
        let found = client.query_opt(NAMESPACE_EXISTS, &[schema]).await?;
        if found.is_none() {
            return Err(Error::invalid(
                format!("schema \"{schema}\" does not exist in database \"{db}\""),
                "check the name; schema names are case-sensitive as given",
            ));
        }
    }

    let mut oids: Vec<u32> = Vec::new();
    let scope_kinds = |tables: bool, sequences: bool| {
        let mut k = Vec::new();
        if tables {
            k.extend(["r", "p"]);
        }
        if sequences {
            k.push("S");
        }
        k
    };
    let whole_tables = sel.all_tables || !sel.schemas.is_empty();
    let kinds = scope_kinds(whole_tables, sel.all_sequences);
    if !kinds.is_empty() {
        let schemas: Option<Vec<String>> = (!sel.schemas.is_empty()).then(|| sel.schemas.clone());
        let excluded: Vec<String> = SYSTEM_SCHEMAS
            .iter()
            .map(|s| s.to_string())
            .chain(sel.exclude_schemas.iter().cloned())
            .collect();
        let rows =
            client.query(&selection_sql(client.version()), &[&kinds, &excluded, &schemas]).await?;
        oids.extend(rows.iter().map(|r| r.get::<_, u32>(0)));
    }
    for name in &sel.tables {
        oids.push(lookup(client, name, Wanted::Table).await?);
    }
    for name in &sel.sequences {
        oids.push(lookup(client, name, Wanted::Sequence).await?);
    }
    for name in &sel.exclude_tables {
        let oid = lookup(client, name, Wanted::Table).await?;
        oids.retain(|o| *o != oid);
    }
    oids.sort_unstable();
    oids.dedup();
    relations(client, &oids).await
}

/// The relations of kinds $1 outside schemas $2 (and inside $3 if not
/// null), not of an extension; partitions through their partitioned table,
/// except on 10, where each partition is replicated on its own.
fn selection_sql(v: PgVersion) -> String {
    let partitions =
        if v.has_partitioned_row_triggers() { "not c.relispartition" } else { "c.relkind <> 'p'" };
    format!(
        "select c.oid
         from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where c.relkind::text = any($1::text[])
           and {partitions}
           and n.nspname !~ '^pg_'
           and n.nspname <> all($2::text[])
           and ($3::text[] is null or n.nspname = any($3::text[]))
           and not exists (select 1 from pg_depend d
                           where d.classid = 'pg_class'::regclass
                             and d.objid = c.oid and d.deptype = 'e')"
    )
}

fn relations_sql(v: PgVersion) -> String {
    let nkeys = if v.has_include_columns() { "indnkeyatts" } else { "indnatts" };
    RELATIONS.replace("{nkeys}", nkeys)
}

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries(v: PgVersion) -> Vec<NamedQuery> {
    let mut out = vec![
        NamedQuery::new("inventory: relations", relations_sql(v)),
        NamedQuery::new("inventory: a selection", selection_sql(v)),
    ];
    out.extend(static_catalog_queries());
    out
}

/// The relations of these oids, with their keys and sizes.
async fn relations(client: &Conn, oids: &[u32]) -> Result<Vec<Relation>> {
    // Key columns apart from INCLUDE columns: PostgreSQL 11 and later.
    let rows = client.query(&relations_sql(client.version()), &[&oids]).await?;
    Ok(rows
        .iter()
        .map(|r| Relation {
            schema: r.get(0),
            name: r.get(1),
            kind: match r.get::<_, &str>(2) {
                "p" => "partitioned table",
                "S" => "sequence",
                _ => "table",
            }
            .to_string(),
            key_columns: r.get(3),
            est_bytes: r.get(4),
            est_rows: r.get(5),
        })
        .collect())
}

/// Each relation with its key (primary key, else the narrowest usable
/// unique index) and size; a partitioned table's size is its partitions'
/// (walked through pg_inherits, which every supported major has).
const RELATIONS: &str = "select n.nspname::text, c.relname::text, c.relkind::text,
                    coalesce((select array_agg(a.attname::text order by k.ord)
                              from unnest(i.indkey::int2[]) with ordinality k(attnum, ord)
                              join pg_attribute a on a.attrelid = c.oid and a.attnum = k.attnum
                              where k.ord <= i.{nkeys}), '{}'::text[]),
                    (case when c.relkind = 'p'
                          then (with recursive tree(relid) as (
                                    select c.oid
                                    union all
                                    select h.inhrelid from pg_inherits h
                                    join tree on h.inhparent = tree.relid)
                                select coalesce(sum(pg_total_relation_size(relid)), 0) from tree)
                          else pg_total_relation_size(c.oid) end)::int8,
                    (case when c.relkind = 'p'
                          then (with recursive tree(relid) as (
                                    select c.oid
                                    union all
                                    select h.inhrelid from pg_inherits h
                                    join tree on h.inhparent = tree.relid)
                                select coalesce(sum(greatest(pc.reltuples, 0)), 0) from tree
                                join pg_class pc on pc.oid = tree.relid where pc.relkind <> 'p')
                          when c.relkind = 'S' then 0
                          else greatest(c.reltuples, 0) end)::int8
             from pg_class c
             join pg_namespace n on n.oid = c.relnamespace
             left join lateral (
                 select i.indkey, i.{nkeys}
                 from pg_index i
                 where i.indrelid = c.oid and i.indisunique and i.indisvalid
                   and (i.indisprimary
                        or (i.indimmediate and i.indpred is null and i.indexprs is null
                            and not exists (
                                select 1 from unnest(i.indkey::int2[]) k(attnum)
                                left join pg_attribute a
                                       on a.attrelid = c.oid and a.attnum = k.attnum
                                where a.attnum is null or not a.attnotnull)))
                 order by i.indisprimary desc, i.{nkeys}, i.indexrelid
                 limit 1) i on c.relkind <> 'S'
             where c.oid = any($1::oid[])
             order by c.relkind = 'S', n.nspname, c.relname";

#[derive(Clone, Copy, PartialEq)]
enum Wanted {
    Table,
    Sequence,
}

/// Whether partitions are replicated one by one instead of through their
/// partitioned table: on PostgreSQL 10, which has no row triggers (nor
/// keys) on partitioned tables.
fn partitions_one_by_one(client: &Conn) -> bool {
    !client.version().has_partitioned_row_triggers()
}

/// Resolves a name as the server would (`to_regclass`-style: quoting, case
/// folding, search_path), and checks what kind of relation it is.
async fn lookup(client: &Conn, name: &str, wanted: Wanted) -> Result<u32> {
    let db = client.name();
    let row = match client.query_one(LOOKUP, &[&name]).await {
        Ok(row) => row,
        Err(e) => {
            let code = e.sqlstate();
            if code == Some(&SqlState::UNDEFINED_TABLE)
                || code == Some(&SqlState::INVALID_SCHEMA_NAME)
                || code == Some(&SqlState::INVALID_NAME)
            {
                return Err(Error::invalid(
                    format!("relation {name} does not exist in database \"{db}\""),
                    "write it as SCHEMA.NAME; quote mixed-case or unusual names as in SQL \
                     (--table '\"My Schema\".\"My Table\"')",
                ));
            }
            return Err(e.into());
        }
    };
    let oid: u32 = row.get(0);
    let kind: &str = row.get(1);
    let is_partition: bool = row.get(2);
    match (wanted, kind) {
        // PostgreSQL 10 puts no row trigger on a partitioned table: its
        // partitions are replicated as the tables they are.
        (Wanted::Table, "p") if partitions_one_by_one(client) => Err(Error::invalid(
            format!("{name} is a partitioned table of PostgreSQL 10"),
            "PostgreSQL 10 cannot capture through a partitioned table: name its partitions with \
             --table (--all-tables and --schema take them by themselves)",
        )),
        (Wanted::Table, "r") if is_partition && partitions_one_by_one(client) => Ok(oid),
        (Wanted::Table, "r" | "p") if is_partition => Err(Error::invalid(
            format!("{name} is a partition of {}", row.get::<_, String>(3)),
            format!(
                "pgleap replicates a partitioned table as a whole: use --table {}",
                row.get::<_, String>(3)
            ),
        )),
        (Wanted::Table, "r" | "p") | (Wanted::Sequence, "S") => Ok(oid),
        (Wanted::Table, "S") => {
            Err(Error::invalid(format!("{name} is a sequence"), format!("use --sequence {name}")))
        }
        _ => Err(Error::invalid(
            format!(
                "{name} is not a {} (relkind {kind})",
                if wanted == Wanted::Table { "table" } else { "sequence" }
            ),
            "pgleap replicates tables and sequences only; views are part of the schema copy",
        )),
    }
}

// The catalog queries of this module, named.

const NAMESPACE_EXISTS: &str = "select 1 from pg_namespace where nspname = $1";

const LOOKUP: &str = "select c.oid, c.relkind::text, c.relispartition,
           case when c.relispartition
                then (with recursive up(relid) as (
                          select c.oid
                          union all
                          select h.inhparent from pg_inherits h
                          join up on h.inhrelid = up.relid)
                      select u.relid::regclass::text from up u
                      join pg_class pc on pc.oid = u.relid
                      where not pc.relispartition limit 1) end
    from pg_class c where c.oid = $1::text::regclass";

fn static_catalog_queries() -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("inventory: schema exists", NAMESPACE_EXISTS),
        NamedQuery::new("inventory: a relation by name", LOOKUP),
    ]
}
