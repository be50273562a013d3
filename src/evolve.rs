//! Schema changes on the source while a sync runs.
//!
//! Every batch compares the captured tables' columns with those the plan
//! was read with (`apply`). When they differ, [`follow`] looks at what
//! changed against the target:
//!
//! - columns added with no default or a literal one are added to the
//!   target the same way (existing rows get the same value on both sides:
//!   NULL or that literal), and the sync goes on with the new columns;
//! - anything else (a column dropped, renamed or retyped, an identity or
//!   computed default) is refused: the sync pauses (see `session::record`)
//!   until the target is changed the same way and `pgleap sync resume`.
//!
//! Partitions created on the source under a captured partitioned table are
//! created on the target from the source's bounds, and their rows copied,
//! when a batch needs them ([`create_partitions`]). Tables created later in
//! a schema a relgroup took whole are only reported ([`not_captured`]):
//! capturing them is a new relgroup's job.

use std::collections::BTreeMap;

use crate::apply::Plan;
use crate::capture;
use crate::catalog::RelGroup;
use crate::error::{Error, Result};
use crate::pg::{Conn, NamedQuery, PgVersion, Sql, copy_between, quote_ident};

/// A column of the source as the target must get it.
struct Column {
    name: String,
    /// Its type, qualified (`format_type`).
    ty: String,
    /// `type [collate c] [default d] [not null]`, qualified.
    definition: String,
    /// Why it cannot be added by pgleap, if it cannot.
    unsafe_because: Option<String>,
}

/// A default that gives every existing row the same value on both servers:
/// a literal, possibly cast.
const LITERAL_DEFAULT: &str =
    r#"^(('([^']|'')*')|(-?[0-9]+(\.[0-9]+)?)|true|false|NULL)(::[a-zA-Z0-9_ ."\[\](),]+)?$"#;

/// A source table's columns ($1) as the schema-change check compares
/// them; $2 is [`LITERAL_DEFAULT`].
fn source_columns_sql(v: PgVersion) -> String {
    let generated = if v.has_generated_columns() { "a.attgenerated <> ''" } else { "false" };
    format!(
        "select a.attname::text, format_type(a.atttypid, a.atttypmod),
                        concat_ws(' ', format_type(a.atttypid, a.atttypmod),
                          case when a.attcollation <> t.typcollation
                               then 'collate ' || (select quote_ident(n.nspname) || '.' ||
                                                          quote_ident(l.collname)
                                                   from pg_collation l join pg_namespace n
                                                     on n.oid = l.collnamespace
                                                   where l.oid = a.attcollation) end,
                          'default ' || pg_get_expr(d.adbin, d.adrelid),
                          case when a.attnotnull then 'not null' end),
                        case when a.attidentity <> '' then 'an identity column'
                             when {generated} then 'a generated column'
                             when d.adbin is not null
                                  and pg_get_expr(d.adbin, d.adrelid) !~ $2
                               then 'its default is not a literal (rows would differ)'
                        end
                 from pg_attribute a
                 join pg_type t on t.oid = a.atttypid
                 left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
                 where a.attrelid = $1::text::regclass and a.attnum > 0 and not a.attisdropped
                 order by a.attnum"
    )
}

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries(v: PgVersion) -> Vec<NamedQuery> {
    let mut out = vec![NamedQuery::new("evolve: source columns", source_columns_sql(v))];
    out.extend(static_catalog_queries());
    out
}

async fn source_columns(src: &Conn, table: &str) -> Result<Vec<Column>> {
    let rows = src
        .query_qualified(&source_columns_sql(src.version()), &[&table, &LITERAL_DEFAULT])
        .await?;
    let columns = rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            ty: r.get(1),
            definition: r.get(2),
            unsafe_because: r.get(3),
        })
        .collect();
    Ok(columns)
}

/// The columns of `table` on one side: (name, type).
async fn columns_of(tgt: &Conn, table: &str) -> Result<Vec<(String, String)>> {
    let rows = tgt.query_qualified(COLUMNS_OF, &[&table]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Per table (quoted, qualified), its copied columns (quoted): what a
/// sync applies, recorded on the target so that a change made while no
/// pgleap process watched is still noticed.
pub type Columns = BTreeMap<String, Vec<String>>;

/// The plan's columns, as [`Columns`].
pub fn columns(plan: &Plan) -> Columns {
    plan.tables.iter().map(|t| (t.table.clone(), t.column_names.clone())).collect()
}

/// The columns recorded on the target for the plan's sync (tables never
/// recorded are left out).
pub async fn recorded(tgt: &Conn, plan: &Plan) -> Result<Columns> {
    let rows = tgt
        .query(
            &format!(
                "select table_name, columns from {}.columns where sync = $1",
                quote_ident(&plan.schema)
            ),
            &[&plan.sync],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let names = serde_json::from_str(r.get::<_, &str>(1)).ok()?;
            Some((r.get::<_, String>(0), names))
        })
        .collect())
}

/// Records the plan's columns on the target.
pub async fn record(tgt: &Conn, plan: &Plan) -> Result<()> {
    let s = quote_ident(&plan.schema);
    for (table, names) in columns(plan) {
        let names = serde_json::to_string(&names).expect("strings serialize");
        tgt.execute(
            &format!(
                "insert into {s}.columns (sync, table_name, columns) values ($1, $2, $3)
                 on conflict (sync, table_name) do update set columns = excluded.columns"
            ),
            &[&plan.sync, &table, &names],
        )
        .await?;
    }
    Ok(())
}

/// Follows a change of the captured tables' columns since `before` (the
/// columns applied until now): adds to the target the columns that can be
/// added safely and returns what it did; refuses (`SchemaChanged`, naming
/// each table and change) when anything else changed. Nothing is changed
/// on the target unless every change can be followed.
pub async fn follow(
    src: &Conn,
    tgt: &mut Conn,
    plan: &Plan,
    before: &Columns,
) -> Result<Vec<String>> {
    let mut additions = Vec::new();
    let mut refused = Vec::new();
    for t in &plan.tables {
        let now = source_columns(src, &t.table).await?;
        let theirs = columns_of(tgt, &t.table).await?;
        let mut changes = Vec::new();
        for old in before.get(&t.table).unwrap_or(&t.column_names) {
            if !now.iter().any(|c| quote_ident(&c.name) == *old) {
                changes.push(format!("column {old} was dropped or renamed"));
            }
        }
        for c in &now {
            match theirs.iter().find(|(n, _)| *n == c.name) {
                Some((_, their_type)) if *their_type != c.ty => changes.push(format!(
                    "column {} is {their_type} on the target, {} on the source",
                    quote_ident(&c.name),
                    c.ty
                )),
                Some(_) => {}
                None => match &c.unsafe_because {
                    Some(why) => changes.push(format!(
                        "column {} was added ({}), which pgleap cannot add: {why}",
                        quote_ident(&c.name),
                        c.definition
                    )),
                    None => additions.push(format!(
                        "alter table {} add column if not exists {} {}",
                        t.table,
                        quote_ident(&c.name),
                        c.definition
                    )),
                },
            }
        }
        if !changes.is_empty() {
            refused.push(format!("{}: {}", t.display, changes.join(", ")));
        }
    }
    if !refused.is_empty() {
        return Err(Error::SchemaChanged { sync: plan.sync.clone(), tables: refused });
    }
    if !additions.is_empty() {
        // IF NOT EXISTS: the daemon and a kick may follow the same change
        // at once.
        let tx = tgt.transaction().await?;
        for sql in &additions {
            tx.batch_execute(sql).await?;
        }
        tx.commit().await?;
        for sql in &additions {
            tracing::warn!(sync = plan.sync, "schema change followed on the target: {sql}");
        }
    }
    Ok(additions)
}

/// Columns the target's tables have and the source's do not (a column
/// dropped or renamed on the source), as `table.column`.
pub async fn extra_columns(src: &Conn, tgt: &Conn, plan: &Plan) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for t in &plan.tables {
        let ours = columns_of(src, &t.table).await?;
        for (name, _) in columns_of(tgt, &t.table).await? {
            if !ours.iter().any(|(n, _)| *n == name) {
                out.push(format!("{}.{}", t.display, quote_ident(&name)));
            }
        }
    }
    Ok(out)
}

/// A partition of one of the plan's partitioned tables.
struct Partition {
    name: String,
    parent: String,
    /// `FOR VALUES ...` (and `PARTITION BY ...` for a partitioned one).
    bound: String,
    leaf: bool,
    /// The plan's table it belongs to, as the plan names it.
    root: String,
}

/// Partitions (at any depth) of the plan's partitioned tables, parents
/// first.
async fn partitions(c: &impl Sql, plan: &Plan) -> Result<Vec<Partition>> {
    let roots: Vec<&str> =
        plan.tables.iter().filter(|t| t.partitioned).map(|t| t.table.as_str()).collect();
    if roots.is_empty() {
        return Ok(Vec::new());
    }
    let rows = c.query_qualified(PARTITIONS, &[&roots]).await?;
    Ok(rows
        .iter()
        .map(|r| Partition {
            name: r.get(0),
            parent: r.get(1),
            bound: r.get(2),
            leaf: r.get(3),
            root: r.get(4),
        })
        .collect())
}

/// Partitions of the plan's partitioned tables that the source has and the
/// target lacks, and those the target has that are no longer partitions on
/// the source (detached): one line each, for status.
pub async fn missing_partitions(src: &Conn, tgt: &Conn, plan: &Plan) -> Result<Vec<String>> {
    let ours = partitions(src, plan).await?;
    let theirs = partitions(tgt, plan).await?;
    let mut out = Vec::new();
    for p in &ours {
        if !theirs.iter().any(|t| t.name == p.name) {
            out.push(format!("partition {} of {} is missing on the target", p.name, p.parent));
        }
    }
    for p in &theirs {
        if !ours.iter().any(|o| o.name == p.name) {
            out.push(format!(
                "partition {} of {} is no longer one on the source",
                p.name, p.parent
            ));
        }
    }
    Ok(out)
}

/// Creates on the target the partitions the source has under the plan's
/// partitioned tables and the target lacks, and copies their rows (a table
/// attached with rows brings rows no trigger saw). Changes to those rows
/// after the copy are in the deltas, applied by key on top, so a keyed
/// table ends exact; a keyless one gets the partition only (its replay
/// would duplicate copied rows). Returns the partitions created.
pub async fn create_partitions(src: &mut Conn, tgt: &mut Conn, plan: &Plan) -> Result<Vec<String>> {
    let theirs = partitions(tgt, plan).await?;
    let mut created = Vec::new();
    for Partition { name, parent, bound, leaf, root } in partitions(src, plan).await? {
        if theirs.iter().any(|t| t.name == name) || tgt.relation_exists(&name).await? {
            continue;
        }
        let root = plan.tables.iter().find(|t| t.table == root);
        let tx = tgt.transaction().await?;
        tx.batch_execute(&format!("create table {name} partition of {parent} {bound}")).await?;
        if leaf && let Some(root) = root.filter(|r| !r.keys.is_empty()) {
            let cols = &root.columns;
            let out = format!("copy (select {cols} from only {name}) to stdout");
            let into = format!("copy {name} ({cols}) from stdin");
            copy_between(&*src, &out, &tx, &into, &|_| {}).await?;
        }
        tx.commit().await?;
        tracing::warn!(sync = plan.sync, "new partition {name} of {parent} created on the target");
        // Its own TRUNCATEs on the source, from now on (see capture).
        if let Err(e) =
            capture::capture_partition_truncates(src, &plan.schema, plan.sync_id, &name).await
        {
            tracing::error!(
                sync = plan.sync,
                "TRUNCATE naming partition {name} is not captured on the source: {e}"
            );
        }
        created.push(name);
    }
    Ok(created)
}

/// Tables in the schemas a relgroup took whole that it does not carry
/// (created since), one line each, for status. Partitions and inheritance
/// children of members are carried with them.
pub async fn not_captured(
    src: &Conn,
    relgroup: &RelGroup,
    pgleap_schema: &str,
) -> Result<Vec<String>> {
    if relgroup.whole_schemas.is_empty() {
        return Ok(Vec::new());
    }
    let members: Vec<String> = relgroup
        .members
        .iter()
        .filter(|m| m.kind != "sequence")
        .map(|m| crate::pg::qualified(&m.schema, &m.name))
        .collect();
    let all = relgroup.whole_schemas.iter().any(|s| s == "*");
    let rows = src
        .query_qualified(NOT_CAPTURED, &[&members, &all, &relgroup.whole_schemas, &pgleap_schema])
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let table: String = r.get(0);
            format!("table {table} is not captured (created after relgroup {})", relgroup.name)
        })
        .collect())
}

// The catalog queries of this module, named.

const COLUMNS_OF: &str =
    "select a.attname::text, format_type(a.atttypid, a.atttypmod) from pg_attribute a
    where a.attrelid = $1::text::regclass and a.attnum > 0 and not a.attisdropped";

const PARTITIONS: &str = "with recursive tree(oid, parent, depth, root) as (
        select i.inhrelid, i.inhparent, 1, r.name from pg_inherits i
        join unnest($1::text[]) r(name) on i.inhparent = r.name::regclass
        union all
        select i.inhrelid, i.inhparent, tree.depth + 1, tree.root
        from pg_inherits i join tree on i.inhparent = tree.oid)
    select tree.oid::regclass::text, tree.parent::regclass::text,
           pg_get_expr(c.relpartbound, c.oid) ||
             case when c.relkind = 'p' then ' partition by ' || pg_get_partkeydef(c.oid)
                  else '' end,
           c.relkind = 'r', tree.root
    from tree join pg_class c on c.oid = tree.oid
    where c.relispartition
    order by tree.depth, 1";

const NOT_CAPTURED: &str = "with recursive carried(oid) as (
        select to_regclass(m)::oid from unnest($1::text[]) m
        union
        select i.inhrelid from pg_inherits i join carried on i.inhparent = carried.oid)
    select c.oid::regclass::text from pg_class c
    join pg_namespace n on n.oid = c.relnamespace
    where c.relkind in ('r', 'p') and not c.relispartition
      and ($2 or n.nspname = any($3))
      and n.nspname not in ('pg_catalog', 'information_schema') and n.nspname <> $4
      and n.nspname not like 'pg\\_toast%' and n.nspname not like 'pg\\_temp%'
      and c.oid not in (select oid from carried where oid is not null)
      and not exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass
                      and d.objid = c.oid and d.deptype = 'e')
    order by 1";

fn static_catalog_queries() -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("evolve: a table's columns", COLUMNS_OF),
        NamedQuery::new("evolve: partitions of partitioned tables", PARTITIONS),
        NamedQuery::new("evolve: tables not captured", NOT_CAPTURED),
    ]
}
