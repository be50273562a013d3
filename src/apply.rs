//! Applying captured changes to a target, one batch at a time.
//!
//! A batch is delimited by transaction snapshots, as PgQ/Londiste do: the
//! source is read in one REPEATABLE READ transaction whose snapshot `now`
//! is recorded; the batch holds every delta whose transaction is visible in
//! `now` and was not visible in the snapshot of the previous batch. A
//! transaction that was still running when the previous batch was read is
//! therefore picked up by the batch after it commits, however late: the
//! classic "sequence gap" loss cannot happen.
//!
//! Applying is state-based and idempotent: every changed key is staged on
//! the target with the source's current row (or none), streaming with COPY
//! from source to target, and the target's rows are brought to that state
//! set-based: vanished keys deleted, present ones updated or inserted. The whole batch is one
//! target transaction, which also records the batch's snapshot on the target
//! (`<schema>.applied`): the data and the progress marker commit together,
//! so a crash anywhere leaves either the old state and old marker, or both
//! new. Concurrent appliers of one sync (the daemon and a `kick`) are
//! serialised by an advisory lock on the target.
//!
//! That user triggers and foreign keys do not fire on the target is the
//! `target` module's job, done when a session opens.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use crate::capture;
use crate::catalog::{RelGroup, Sync};
use crate::decoding;
use crate::error::{Error, Result};
use crate::large_objects::{self, Pass};
use crate::pg::{
    Conn, Marked, NamedQuery, PgVersion, Sql, Tx, copy_between, copy_between_marked, qualified,
    quote_ident, quote_literal,
};
use crate::slices;

/// Advisory lock class for "one applier per sync on this target" ('pglp').
pub(crate) const LOCK_CLASS: i32 = 0x70676c70;
/// Advisory lock class for "one initial copy per sync on this target" ('pglc').
pub const COPY_LOCK_CLASS: i32 = 0x70676c63;
/// A lock of (class, sync id) taken and released by a session rather than
/// a transaction: it outlives the transactions it spans.
pub(crate) const HOLD_LOCK: &str = "select pg_advisory_lock($1, $2)";
pub(crate) const RELEASE_LOCK: &str = "select pg_advisory_unlock($1, $2)";
/// The same lock, held until the transaction ends.
pub(crate) const XACT_LOCK: &str = "select pg_advisory_xact_lock($1, $2)";

/// How one table is applied.
#[derive(Debug, Clone)]
pub struct TablePlan {
    pub display: String,
    pub(crate) table: String,
    delta: String,
    /// Quoted key columns; empty for a keyless table (whole-row deltas).
    pub(crate) keys: Vec<String>,
    /// The same unquoted, as the catalog names them.
    key_names: Vec<String>,
    /// Quoted, comma-separated; generated columns left out.
    pub(crate) columns: String,
    /// The same, one quoted name each.
    pub(crate) column_names: Vec<String>,
    /// Estimated at `relgroup add`, to decide whether to split the copy.
    pub(crate) est_rows: i64,
    /// The same in bytes (on the source's disk), for the copy's progress.
    pub(crate) est_bytes: i64,
    /// A partitioned table is read and written whole (its partitions hold
    /// its rows); any other table as itself alone, never with its
    /// inheritance children, which are tables of the relgroup of their own.
    pub(crate) partitioned: bool,
    /// For a keyless table, the snapshot its initial copy was taken in:
    /// events of transactions visible in it are in the copy already, and
    /// replaying them would duplicate rows (a resumed copy hands over at
    /// an earlier snapshot than this table's).
    pub(crate) copied_under: Option<String>,
    /// The copied columns with their base types, as the staging table of
    /// the set-based apply declares them.
    staging_columns: String,
    /// Whether the delta holds a statement's keys as arrays (see
    /// `capture::keyed_capture`).
    key_arrays: bool,
    /// A keyless table captured by the sync's slot: the same event may be
    /// in its delta twice (decoded again after a pump that did not
    /// advance the slot), and is replayed once (see [`TablePlan::events`]).
    decoded_rows: bool,
    /// Identity columns GENERATED ALWAYS (quoted): an UPDATE may not set
    /// them.
    always_identity: Vec<String>,
    /// Whether every key column compares by its bytes: then two recorded
    /// keys never find one row, and staging needs no de-duplication.
    keys_bytewise: bool,
    /// Whether each applied key's row is compared with the source's
    /// afterwards (inside a cutover's fence, where only the drained keys
    /// may be looked at, see [`Plan::compare_applied_rows`]).
    compare_applied: bool,
    /// Columns of type real or double precision (or a domain over one),
    /// and arrays of them, quoted.
    pub(crate) floats: Vec<String>,
    pub(crate) float_arrays: Vec<String>,
    /// Columns (not of the key) whose large values move in slices: bytea,
    /// text and varchar, quoted (see `slices`).
    pub(crate) sliceable: Vec<(String, slices::Kind)>,
    /// Marks, on the target, the parts of this table a verify found equal
    /// as touched by the batch (see `verify`'s incremental mode): all of
    /// them, or those whose key range holds a key staged (a table with one
    /// integer key, whose parts are key ranges).
    touch_all: String,
    touch_staged: Option<String>,
}

impl TablePlan {
    /// How column `c` (quoted) is cut when its value is large, if it may be.
    pub(crate) fn sliced(&self, c: &str) -> Option<slices::Kind> {
        self.sliceable.iter().find(|(s, _)| s == c).map(|(_, kind)| *kind)
    }

    /// Column `c` (quoted) of alias `t` as a COPY out selects it: a large
    /// value of a sliceable column empty (see `slices`).
    fn carried(&self, c: &str) -> String {
        match self.sliced(c) {
            Some(kind) => slices::carried(&format!("t.{c}"), kind),
            None => format!("t.{c}"),
        }
    }

    /// Where a keyless table's events are read: its delta, each decoded
    /// event once (the first written of those with its WAL origin; rows
    /// a trigger wrote have none and are each their own).
    fn events(&self) -> String {
        if !self.decoded_rows {
            return self.delta.clone();
        }
        let origin = "_pgleap_lsn, _pgleap_n, case when _pgleap_lsn is null then _pgleap_seq end";
        format!(
            "(select distinct on ({origin}) * from {} order by {origin}, _pgleap_seq) d",
            self.delta
        )
    }

    /// The table as it is named in FROM, DELETE and TRUNCATE.
    pub(crate) fn rel(&self) -> String {
        if self.partitioned { self.table.clone() } else { format!("only {}", self.table) }
    }

    /// ` (columns)` after a table name in COPY and INSERT; nothing for a
    /// table without copied columns (none at all, or only generated ones).
    pub(crate) fn column_list(&self) -> String {
        if self.columns.is_empty() { String::new() } else { format!(" ({})", self.columns) }
    }

    /// `copy TABLE (columns) from stdin`.
    pub(crate) fn copy_in(&self) -> String {
        format!("copy {}{} from stdin", self.table, self.column_list())
    }

    /// The distinct keys changed by the delta rows of `cond`, as a query
    /// whose columns are named after the keys.
    fn changed_keys(&self, cond: &str) -> String {
        let keys = self.keys.join(", ");
        if !self.key_arrays {
            return format!(
                "select distinct {keys} from {} where {cond} and not _pgleap_truncated",
                self.delta
            );
        }
        let arrays: Vec<String> = self.keys.iter().map(|k| format!("d.{k}")).collect();
        let unnested: Vec<String> = self.keys.iter().map(|k| format!("u.{k}")).collect();
        format!(
            "select distinct {} from {} d, unnest({}) as u({keys})
             where {cond} and not d._pgleap_truncated",
            unnested.join(", "),
            self.delta,
            arrays.join(", ")
        )
    }

    /// How many changed keys (not distinct) the delta rows in scope hold,
    /// as an aggregate over them: of the rows `filter` keeps, or all rows,
    /// where a TRUNCATE counts one.
    fn changes_count(&self, filter: Option<&str>) -> String {
        match (self.key_arrays, filter) {
            (false, Some(f)) => format!("count(*) filter (where {f})"),
            (false, None) => "count(*)".to_string(),
            (true, Some(f)) => {
                format!("coalesce(sum(cardinality({})) filter (where {f}), 0)::int8", self.keys[0])
            }
            (true, None) => {
                format!("coalesce(sum(coalesce(cardinality({}), 1)), 0)::int8", self.keys[0])
            }
        }
    }

    /// The session temp table staging this table's changed rows: named
    /// after the table and its columns, so a plan read again after a
    /// column change gets a table of the new shape.
    fn staging(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&self.table, &self.staging_columns).hash(&mut h);
        format!("pg_temp.pgleap_rows_{:016x}", h.finish())
    }
}

/// Everything needed to apply one sync's batches.
#[derive(Debug, Clone)]
pub struct Plan {
    pub sync: String,
    pub sync_id: i32,
    pub schema: String,
    pub tables: Vec<TablePlan>,
    pub sequences: Vec<String>,
    /// Whether the database's large objects are synced too.
    pub large_objects: bool,
    /// Where TRUNCATEs naming one partition are recorded, when the sync
    /// captures a partitioned table.
    partition_truncates: Option<String>,
    /// The sync's journal of changed tables, if it has one
    /// (`capture::journal`), and each table's number in it, in the order
    /// of `tables`.
    journal: Option<(String, Vec<i32>)>,
    /// The sync's slot, if it captures tables by logical decoding.
    pub decoding: Option<decoding::Stream>,
    /// Per table, the columns (names and types) when the plan was read,
    /// to compare with the target's.
    shape: Vec<String>,
    /// The same by type oid: what every batch compares with the source's,
    /// in one query that needs no search_path.
    shape_ids: Vec<String>,
    /// When every table's shape was last found unchanged.
    shape_checked: Arc<Mutex<Option<Instant>>>,
    /// Whether the next pump goes by slices of tables first: the last one
    /// would have named more than a transaction may lock (see
    /// [`Plan::pump_by_slices`]).
    pump_next_by_slices: Arc<std::sync::atomic::AtomicBool>,
    /// The slot's stream, where the daemon reads it so (see
    /// [`Plan::stream`]).
    feed: Option<Arc<decoding::Feed>>,
}

/// How long batches may check only the tables they apply (see
/// [`Plan::check_shape`]).
const FULL_SHAPE_CHECK: Duration = Duration::from_secs(10);

/// How a column is described in a shape: by type name (fully qualified,
/// read under an empty search_path) to compare servers, by type oid to
/// compare one server with itself.
const BY_NAME: &str = "format_type(a.atttypid, a.atttypmod)";
const BY_OID: &str = "a.atttypid::text || '(' || a.atttypmod::text || ')'";

/// Each table's copied columns, names and types, as one line (by name:
/// COPY names its columns, so their order does not matter).
const SHAPE: &str = "select (select coalesce(string_agg(
                 a.attname || ' ' || {type}, ', ' order by a.attname), '')
             from pg_attribute a
             where a.attrelid = t.name::regclass and a.attnum > 0 and not a.attisdropped
               {not_generated})
     from unnest($1::text[]) with ordinality t(name, n) order by t.n";

/// For each table named in $1 (quoted, qualified): whether it exists, its
/// copied columns, how a staging table declares them (by base types), its
/// identity columns GENERATED ALWAYS (which refuse an UPDATE), and its
/// columns whose equality is equality of their bytes: integers, oid, uuid,
/// bool, dates and timestamps, bytea, and text or varchar under a
/// deterministic collation (two different values of such a key never find
/// the same row), and its float columns and float arrays (whose text form
/// differs between 11 and 12 for the same value, see `verify`).
fn plan_columns_sql(v: PgVersion) -> String {
    // A join, not a subquery per column: under an aggregate's FILTER the
    // subquery made the whole query take 1.4 s for 2,000 tables (read on
    // every connect and by status).
    let (deterministic, collations) = if v.has_nondeterministic_collations() {
        ("coalesce(l.collisdeterministic, true)", "left join pg_collation l on l.oid = b.coll")
    } else {
        ("true", "")
    };
    format!(
        "with recursive t as (
             select n, to_regclass(name) as rel from unnest($1::text[])
                 with ordinality u(name, n)),
         cols as (
             select t.n, a.attnum, a.attname, a.atttypid as typ, a.atttypmod as typmod,
                    a.attidentity = 'a' as always, a.attcollation as coll
             from t join pg_attribute a on a.attrelid = t.rel
             where a.attnum > 0 and not a.attisdropped {not_generated}),
         base as (
             select n, attnum, attname, typ, typmod, always, coll from cols
             union all
             select b.n, b.attnum, b.attname, ty.typbasetype, ty.typtypmod, b.always,
                    b.coll
             from base b join pg_type ty on ty.oid = b.typ
             where ty.typtype = 'd')
         select t.rel is not null,
                coalesce(array_agg(b.attname::text order by b.attnum)
                         filter (where b.n is not null), '{{}}'),
                coalesce(string_agg(quote_ident(b.attname) || ' ' ||
                                    format_type(b.typ, b.typmod), ', '
                                    order by b.attnum), ''),
                coalesce(array_agg(b.attname::text order by b.attnum)
                         filter (where b.always), '{{}}'),
                coalesce(array_agg(b.attname::text order by b.attnum)
                         filter (where b.typ in (20, 21, 23, 26, 2950, 16, 1082, 1114, 1184, 17)
                                    or (b.typ in (25, 1043) and {deterministic})), '{{}}'),
                coalesce(array_agg(b.attname::text order by b.attnum)
                         filter (where b.typ in (700, 701)), '{{}}'),
                coalesce(array_agg(b.attname::text order by b.attnum)
                         filter (where b.typ in (1021, 1022)), '{{}}'),
                coalesce(array_agg(b.attname::text order by b.attnum)
                         filter (where b.typ = 17), '{{}}'),
                coalesce(array_agg(b.attname::text order by b.attnum)
                         filter (where b.typ in (25, 1043)), '{{}}'),
                coalesce(array_agg(b.attname::text order by b.attnum)
                         filter (where b.typ in (20, 21, 23)), '{{}}')
         from t
         left join (base b join pg_type ty on ty.oid = b.typ and ty.typtype <> 'd' {collations})
           on b.n = t.n
         group by t.n, t.rel order by t.n",
        not_generated = crate::pg::not_generated(v)
    )
}

/// The statements marking a table's verified parts touched by a batch
/// (see [`TablePlan::touch_all`]): every part, and where the table has one
/// integer key (`staged`: the key, quoted, and the batch's staging table),
/// the parts whose range meets the range of
/// the staged keys. A range from the least to the greatest key marks
/// exactly for a batch of one row or of rows appended at the end, and at
/// worst every part between: never fewer than were touched.
fn touch_sql(
    schema: &str,
    sync: &str,
    table: &str,
    staged: Option<(&str, &str)>,
) -> (String, Option<String>) {
    let parts = format!("{}.verified_parts", quote_ident(schema));
    let this = format!(
        "v.sync = {} and v.table_name = {} and not v.touched",
        quote_literal(sync),
        quote_literal(table)
    );
    let all = format!("update {parts} v set touched = true where {this}");
    let staged = staged.map(|(k, staging)| {
        format!(
            "update {parts} v set touched = true
             from (select min(s.{k})::int8 lo, max(s.{k})::int8 hi from {staging} s) b
             where {this} and (v.lo is null or v.lo <= b.hi) and (v.hi is null or b.lo < v.hi)"
        )
    });
    (all, staged)
}

fn shape_sql(v: PgVersion, types: &str) -> String {
    SHAPE.replace("{not_generated}", crate::pg::not_generated(v)).replace("{type}", types)
}

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries(v: PgVersion) -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("apply: the plan's columns", plan_columns_sql(v)),
        NamedQuery::new("apply: tables' shapes by type name", shape_sql(v, BY_NAME)),
        NamedQuery::new("apply: tables' shapes by type oid", shape_sql(v, BY_OID)),
        NamedQuery::new("apply: a table's estimated rows", RELTUPLES),
        NamedQuery::new("apply: whether a table may be truncated", TRUNCATABLE),
    ]
}

/// What one batch did.
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    /// Rows written: inserted, or updated in place.
    pub inserts: u64,
    pub deletes: u64,
    pub truncates: u64,
    /// What the batch's large-object pass did, if it ran one.
    pub large_objects: Option<large_objects::PassStats>,
    /// The source snapshot the target now reflects.
    pub snapshot: String,
    pub millis: i64,
    /// The tables (indexes into the plan) whose deltas held changes for
    /// this batch: what a later [`Purge::Changed`] looks at.
    pub changed: Vec<usize>,
}

/// Which deltas a batch's bookkeeping purges of what every target has
/// applied. A DELETE on each of 10,000 deltas costs the source about a
/// second (docs/BENCHMARKS.md), so most purges look only at the deltas
/// that changed since the last one, and a full one now and then takes what
/// other sessions or an interrupted batch left. Purging any delta is safe
/// (only what every target applied goes); narrowing only leaves rows for
/// later.
#[derive(Debug, Clone)]
pub enum Purge {
    No,
    /// These tables' deltas (indexes into the plan; an index a plan read
    /// again no longer has is skipped), and those of the batch itself.
    Changed(BTreeSet<usize>),
    All,
}

impl Plan {
    /// From now on, every keyed row a batch applies is compared, in the
    /// batch's transaction, with the source's row it was staged from, and
    /// a difference fails the batch. The cutover asks for it inside its
    /// fence: a trigger, rule or policy on the target that changes rows as
    /// pgleap writes them shows there, at a cost that grows with the
    /// drained keys, not with the tables.
    pub fn compare_applied_rows(&mut self) {
        for t in &mut self.tables {
            t.compare_applied = true;
        }
    }

    /// Reads the installed capture of `sync` on its source.
    pub async fn load(src: &Conn, sync: &Sync, relgroup: &RelGroup) -> Result<Plan> {
        let schema = &sync.capture_schema;
        let source_db = src.name();
        let Some((sync_id, captured)) = capture::captured(src, schema, &sync.name).await? else {
            return Err(Error::invalid(
                format!(
                    "capture for sync \"{}\" is not installed in database \"{source_db}\"",
                    sync.name
                ),
                format!("remove and add the sync again (pgleap sync remove {})", sync.name),
            ));
        };
        // One query for every table (plans are read on each connect and by
        // status every few seconds): whether it still exists, its copied
        // columns, and how the staging table of the set-based apply
        // declares them: by their base types (a domain with NOT NULL or a
        // check would refuse a vanished row's NULLs), read under an empty
        // search_path, so qualified.
        let names: Vec<String> = captured.iter().map(|c| qualified(&c.schema, &c.name)).collect();
        let rows = src.query_qualified(&plan_columns_sql(src.version()), &[&names]).await?;
        let gone: Vec<String> = captured
            .iter()
            .zip(&rows)
            .filter(|(_, r)| !r.get::<_, bool>(0))
            .map(|(c, _)| {
                format!(
                    "{}: the table was dropped or renamed",
                    crate::inventory::display_name(&c.schema, &c.name)
                )
            })
            .collect();
        if !gone.is_empty() {
            return Err(Error::SchemaChanged { sync: sync.name.clone(), tables: gone });
        }
        let mut tables = Vec::new();
        let numbers: Vec<i32> = captured.iter().map(|c| c.n).collect();
        for (c, row) in captured.into_iter().zip(&rows) {
            let table = qualified(&c.schema, &c.name);
            let (names, staging_columns): (Vec<String>, String) = (row.get(1), row.get(2));
            let always: Vec<String> = row.get(3);
            let bytewise: Vec<String> = row.get(4);
            let quoted = |names: Vec<String>| names.iter().map(|n| quote_ident(n)).collect();
            let column_names: Vec<String> = quoted(names);
            let columns = column_names.join(", ");
            let keys: Vec<String> = c.key_columns.iter().map(|k| quote_ident(k)).collect();
            let sliceable: Vec<(String, slices::Kind)> =
                [(7, slices::Kind::Bytes), (8, slices::Kind::Text)]
                    .into_iter()
                    .flat_map(|(i, kind)| {
                        quoted(row.get(i)).into_iter().map(move |c: String| (c, kind))
                    })
                    .filter(|(c, _)| !keys.contains(c))
                    .collect();
            let member = relgroup.members.iter().find(|m| m.schema == c.schema && m.name == c.name);
            let est_rows = member.map_or(0, |m| m.est_rows);
            let est_bytes = member.map_or(0, |m| m.est_bytes);
            let partitioned = member.is_some_and(|m| m.kind == "partitioned table");
            let integers: Vec<String> = row.get(9);
            let int_key = matches!(&c.key_columns[..], [k] if integers.contains(k));
            tables.push(TablePlan {
                column_names,
                display: crate::inventory::display_name(&c.schema, &c.name),
                est_rows,
                est_bytes,
                delta: qualified(schema, &c.delta),
                keys,
                key_names: c.key_columns.clone(),
                table,
                columns,
                copied_under: None,
                partitioned,
                staging_columns,
                key_arrays: c.key_arrays,
                decoded_rows: false,
                always_identity: quoted(always),
                keys_bytewise: c.key_columns.iter().all(|k| bytewise.contains(k)),
                compare_applied: false,
                floats: quoted(row.get(5)),
                float_arrays: quoted(row.get(6)),
                sliceable,
                touch_all: String::new(),
                touch_staged: None,
            });
            let t = tables.last_mut().expect("just pushed");
            let staging = t.staging();
            let staged = int_key.then(|| (t.keys[0].as_str(), staging.as_str()));
            (t.touch_all, t.touch_staged) = touch_sql(schema, &sync.name, &t.table, staged);
        }
        let sequences = relgroup
            .members
            .iter()
            .filter(|m| m.kind == "sequence")
            .map(|m| qualified(&m.schema, &m.name))
            .collect();
        let truncates = capture::partition_truncates(schema, sync_id);
        let partition_truncates = src.relation_exists(&truncates).await?.then_some(truncates);
        let journal = capture::journal(schema, sync_id);
        let journal = src.relation_exists(&journal).await?.then_some((journal, numbers));
        let names: Vec<String> = tables.iter().map(|t| t.table.clone()).collect();
        let decoding = decoding::load(src, schema, &sync.name, sync_id, &names).await?;
        for &i in decoding.iter().flat_map(|d| d.tables.values()) {
            tables[i].decoded_rows = tables[i].keys.is_empty();
        }
        let mut plan = Plan {
            decoding,
            sync: sync.name.clone(),
            sync_id,
            schema: schema.clone(),
            tables,
            sequences,
            large_objects: relgroup.large_objects,
            partition_truncates,
            journal,
            shape: Vec::new(),
            shape_ids: Vec::new(),
            shape_checked: Arc::default(),
            pump_next_by_slices: Arc::default(),
            feed: None,
        };
        let all = plan.every_table();
        plan.shape = plan.shape_on(src, BY_NAME, &all).await?;
        plan.shape_ids = plan.shape_on(src, BY_OID, &all).await?;
        *plan.shape_checked.lock().unwrap() = Some(Instant::now());
        Ok(plan)
    }

    /// Reads, from the target, the snapshots the keyless tables' initial
    /// copies were taken in (see [`TablePlan::copied_under`]).
    pub async fn note_copies(&mut self, tgt: &Conn) -> Result<()> {
        let units = format!("{}.copy_units", quote_ident(&self.schema));
        if !tgt.relation_exists(&units).await? {
            return Ok(());
        }
        let rows = tgt
            .query(
                &format!(
                    "select table_name, snapshot from {units}
                     where sync = $1 and done and snapshot is not null"
                ),
                &[&self.sync],
            )
            .await?;
        for t in self.tables.iter_mut().filter(|t| t.keys.is_empty()) {
            t.copied_under = rows.iter().find(|r| r.get::<_, &str>(0) == t.table).map(|r| r.get(1));
        }
        Ok(())
    }

    /// Writes into the deltas, inside `stx`, what the sync's slot decoded
    /// since it last advanced (nothing without decoding; see
    /// [`decoding::pump`], whose conditions `stx` meets when it comes from
    /// [`source_snapshot`]). Returns where to advance the slot once `stx`
    /// committed ([`Plan::end_pump`]).
    async fn pump_in(&self, stx: &Tx<'_>, only: Option<&[usize]>) -> Result<Option<String>> {
        let Some(stream) = &self.decoding else {
            return Ok(None);
        };
        let decoded: std::collections::HashSet<usize> = match only {
            Some(slice) => slice.iter().copied().collect(),
            None => stream.tables.values().copied().collect(),
        };
        let sinks: Vec<Option<decoding::Sink>> = (0..self.tables.len())
            .map(|i| {
                let t = &self.tables[i];
                decoded.contains(&i).then(|| decoding::Sink {
                    table: &t.display,
                    delta: &t.delta,
                    keys: &t.key_names,
                    arrays: t.key_arrays,
                    journal: self.journal.as_ref().map(|(j, numbers)| (j.as_str(), numbers[i])),
                })
            })
            .collect();
        // Slices each read the slot again, through the SQL functions.
        let feed = if only.is_some() { None } else { self.feed.as_deref() };
        let pumped = decoding::pump(stx, self.sync_id, stream, &sinks, feed).await;
        if let Err(Error::PumpTooWide { .. }) = &pumped {
            self.pump_next_by_slices.store(true, Ordering::Relaxed);
        }
        pumped
    }

    /// Writes what the slot holds into the deltas a slice of tables at a
    /// time, each slice in a transaction of its own that decodes the slot
    /// again and writes only its tables' changes, then moves the slot past
    /// what every slice read (the earliest end). The caller holds the pump
    /// lock. A change written twice (a slice that read further) is
    /// harmless: keys are applied as state, a keyless row once by where it
    /// was decoded. For the changes of hours without a daemon, naming more
    /// tables than one transaction may lock: one pump over them all would
    /// fail with "out of shared memory" at every retry.
    async fn pump_by_slices(&self, src: &mut Conn) -> Result<()> {
        let Some(stream) = &self.decoding else {
            return Ok(());
        };
        let tables: Vec<usize> =
            stream.tables.values().copied().collect::<BTreeSet<_>>().into_iter().collect();
        if let Some(feed) = &self.feed {
            feed.close().await;
        }
        let slices = tables.chunks(src.tables_per_transaction());
        tracing::info!(
            sync = self.sync,
            slices = slices.len(),
            "pumping the slot by slices of tables"
        );
        let mut read_to: Option<String> = None;
        for (n, slice) in slices.enumerate() {
            let tx = src.writable_snapshot().await?;
            let last = self.pump_in(&tx, Some(slice)).await?;
            tx.commit().await?;
            read_to = match (n, last, read_to) {
                (0, last, _) => last,
                (_, Some(last), Some(to)) => Some(decoding::earlier(&last, &to).to_string()),
                // A sync whose slot went with its cutover.
                _ => None,
            };
        }
        if let Some(to) = read_to {
            decoding::advance(src, stream, &to).await?;
        }
        Ok(())
    }

    /// Ends what [`source_snapshot`] began on `src`: moves the sync's slot
    /// past what its pump read if `to` (the pump's transaction committed),
    /// and lets the next pump go (see [`decoding::unlock`]).
    pub async fn end_pump(&self, src: &impl Sql, to: Option<String>) -> Result<()> {
        let Some(stream) = &self.decoding else {
            return Ok(());
        };
        // A pump that read the stream is confirmed on the stream; the slot
        // is not free for the SQL functions' advance.
        let to = match (&self.feed, to) {
            (Some(feed), Some(to)) if feed.confirm(&to).await => None,
            (_, to) => to,
        };
        decoding::unlock(src, stream, self.sync_id, to.as_deref()).await
    }

    /// Whether the plan reads its slot through a stream ([`Plan::stream`]).
    pub fn streams(&self) -> bool {
        self.feed.is_some()
    }

    /// Reads the slot through the replication protocol from now on, where
    /// the source allows it (see [`decoding::Feed`]): for the daemon, whose
    /// pumps follow one another for as long as it runs.
    pub async fn stream(&mut self, src: &Conn) -> Result<()> {
        if let Some(stream) = &self.decoding {
            self.feed = decoding::Feed::shared(src, stream).await?;
        }
        Ok(())
    }

    /// A pump in a transaction of its own: afterwards every transaction
    /// committed before it is in the deltas, as triggers would have put it
    /// there. Returns the pump's snapshot (every transaction it sees is
    /// in the deltas), if the sync decodes.
    pub async fn pump(&self, src: &mut Conn) -> Result<Option<String>> {
        if self.decoding.is_none() {
            return Ok(None);
        }
        // Once more if it was too wide: then it goes by slices first.
        match self.pump_once(src).await {
            Err(Error::PumpTooWide { .. }) => {
                decoding::release(src, self.sync_id).await?;
                self.pump_once(src).await
            }
            other => other,
        }
    }

    async fn pump_once(&self, src: &mut Conn) -> Result<Option<String>> {
        let (tx, to) = source_snapshot(src, self).await?;
        let seen: String = tx.query_one("select txid_current_snapshot()::text", &[]).await?.get(0);
        tx.commit().await?;
        self.end_pump(src, to).await?;
        Ok(Some(seen))
    }

    /// The indexes of every table of the plan.
    fn every_table(&self) -> Vec<usize> {
        (0..self.tables.len()).collect()
    }

    /// The shapes of the tables `only` (indexes into the plan), in order.
    async fn shape_on(&self, c: &impl Sql, types: &str, only: &[usize]) -> Result<Vec<String>> {
        if only.is_empty() {
            return Ok(Vec::new());
        }
        let tables: Vec<&str> = only.iter().map(|&i| self.tables[i].table.as_str()).collect();
        let sql = shape_sql(c.version(), types);
        let rows = match types {
            BY_OID => c.query(&sql, &[&tables]).await?,
            _ => c.query_qualified(&sql, &[&tables]).await?,
        };
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Refuses a target whose tables lack some of the source's columns
    /// (names and types): the sync was set up with them, so the source's
    /// schema changed since, and rows applied now would lose the change.
    /// Extra columns on the target are fine.
    pub async fn check_target(&self, tgt: &Conn) -> Result<()> {
        let theirs = self.shape_on(tgt, BY_NAME, &self.every_table()).await?;
        let mut changed = Vec::new();
        for (t, (ours, theirs)) in self.tables.iter().zip(self.shape.iter().zip(&theirs)) {
            let have: Vec<&str> = theirs.split(", ").collect();
            let lacking: Vec<&str> =
                ours.split(", ").filter(|c| !c.is_empty() && !have.contains(c)).collect();
            if !lacking.is_empty() {
                changed.push(format!("{} (the target lacks: {})", t.display, lacking.join(", ")));
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        Err(Error::SchemaChanged { sync: self.sync.clone(), tables: changed })
    }

    /// Refuses to apply rows to tables whose columns changed on the source
    /// since the plan was read: the rows would silently lose the change.
    /// With `applied` (indexes of the tables a batch applies), only those
    /// are looked at, unless every table's check is [`FULL_SHAPE_CHECK`]
    /// old: a line per table costs a 10,000-table batch 100-150 ms, and a
    /// table the batch does not write cannot lose anything in it (a column
    /// added to a table nobody writes is followed within that time).
    pub(crate) async fn check_shape(&self, stx: &Tx<'_>, applied: Option<&[usize]>) -> Result<()> {
        let last_full = *self.shape_checked.lock().unwrap();
        let only: Vec<usize> = match applied {
            Some(applied) if last_full.is_some_and(|t| t.elapsed() < FULL_SHAPE_CHECK) => {
                applied.to_vec()
            }
            _ => self.every_table(),
        };
        let full = only.len() == self.tables.len();
        let now_ids = self.shape_on(stx, BY_OID, &only).await?;
        if only.iter().zip(&now_ids).all(|(&i, now)| self.shape_ids[i] == *now) {
            if full {
                *self.shape_checked.lock().unwrap() = Some(Instant::now());
            }
            return Ok(());
        }
        // Changed: the type names, for the message.
        let now = self.shape_on(stx, BY_NAME, &only).await?;
        let changed: Vec<String> = only
            .iter()
            .zip(&now)
            .map(|(&i, now)| (&self.tables[i], now, &self.shape[i]))
            .filter(|(_, now, then)| now != then)
            .map(|(t, now, then)| format!("{} (was: {then}; now: {now})", t.display))
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        Err(Error::SchemaChanged { sync: self.sync.clone(), tables: changed })
    }

    /// The SQL condition selecting deltas not yet applied after `prev`.
    pub(crate) fn pending(prev: Option<&str>) -> String {
        match prev {
            Some(p) => {
                let p = quote_literal(p);
                format!(
                    "_pgleap_txid >= txid_snapshot_xmin({p}::txid_snapshot) \
                     and not txid_visible_in_snapshot(_pgleap_txid, {p}::txid_snapshot)"
                )
            }
            None => "true".into(),
        }
    }

    /// [`Plan::pending`] after the snapshot in the session setting
    /// `pgleap.after` (see [`Plan::changed_tables`]), for the statements
    /// naming every delta, kept prepared ([`Sql::query_prepared`]). Not a
    /// parameter: the server plans a statement with parameters again at
    /// every run while its custom plans look cheaper than a generic one
    /// (measured: 26 ms of planning per 500 deltas per poll, every poll); a
    /// statement without any is planned once per connection.
    const PENDING_AFTER: &str = "_pgleap_txid >= \
         txid_snapshot_xmin(current_setting('pgleap.after')::txid_snapshot) \
         and not txid_visible_in_snapshot(_pgleap_txid, \
                                          current_setting('pgleap.after')::txid_snapshot)";

    /// Whether the source has deltas the snapshot last given to
    /// [`set_after`] on `src` did not see. Cheap: one index probe per table,
    /// in statements planned once.
    pub async fn has_changes(&self, src: &Conn) -> Result<bool> {
        Ok(self.changed_tables(src, true).await?.iter().any(|&c| c))
    }

    /// Per delta of the plan (its tables', then the partition TRUNCATEs'),
    /// whether it holds deltas the snapshot given to [`set_after`] on `c`
    /// did not see, as `c` sees them: one `exists` probe per delta, by
    /// slices of [`Sql::tables_per_statement`]. With `first`, stops after
    /// the first slice that has one (the rest reads false).
    async fn changed_tables(&self, c: &impl Sql, first: bool) -> Result<Vec<bool>> {
        let deltas: Vec<&String> =
            self.tables.iter().map(|t| &t.delta).chain(&self.partition_truncates).collect();
        let mut changed = vec![false; deltas.len()];
        if deltas.is_empty() {
            return Ok(changed);
        }
        let cond = Self::PENDING_AFTER;
        if let Some((journal, numbers)) = &self.journal {
            // The journal's entries are written with the deltas, so the
            // snapshot that sees one sees the other: the tables it names
            // are exactly those with something pending.
            let sql = format!(
                "select coalesce(array_agg(distinct n), '{{}}') from {journal} where {cond}"
            );
            let found: Vec<i32> = c.query_prepared(&sql, &[]).await?[0].get(0);
            let last = changed.len() - 1;
            for n in found {
                match numbers.iter().position(|&m| m == n) {
                    Some(i) => changed[i] = true,
                    // A TRUNCATE naming a partition.
                    None if n == 0 && self.partition_truncates.is_some() => changed[last] = true,
                    // Not one of the plan's (never written so): every
                    // table is looked at, as without a journal.
                    None => changed.fill(true),
                }
            }
            return Ok(changed);
        }
        let slice = c.tables_per_statement();
        for (n, chunk) in deltas.chunks(slice).enumerate() {
            let probes: Vec<String> = chunk
                .iter()
                .map(|delta| format!("exists (select 1 from {delta} where {cond})"))
                .collect();
            let sql = format!("select array[{}]", probes.join(", "));
            let found: Vec<bool> = c.query_prepared(&sql, &[]).await?[0].get(0);
            let any = found.iter().any(|&f| f);
            changed[n * slice..][..found.len()].copy_from_slice(&found);
            if first && any {
                break;
            }
        }
        Ok(changed)
    }

    /// The tables (indexes into `tables`) a batch in `c`'s snapshot, after
    /// the one given to [`set_after`], may have anything to apply to: those
    /// its journal names; without a journal, every table, or those whose
    /// delta a probe finds pending when the plan takes more than one
    /// statement to count (a count costs 0.2 ms a table, 2 s a batch at
    /// 10,000; a probe much less) but fewer tables than one transaction may
    /// name (the probes' locks last until `c`'s transaction ends).
    pub(crate) async fn candidates(&self, c: &impl Sql) -> Result<Vec<usize>> {
        let n = self.tables.len();
        if self.journal.is_none()
            && (n <= c.tables_per_statement() || n > c.tables_per_transaction())
        {
            return Ok((0..n).collect());
        }
        let changed = self.changed_tables(c, false).await?;
        Ok((0..n).filter(|&i| changed[i]).collect())
    }
}

/// A snapshot in which no transaction is visible: applying "after" it
/// means applying every delta since capture started.
pub const FROM_THE_START: &str = "1:1:";

/// What a target records as applied for a sync whose tables are to be
/// copied again ([`mark_recopy`]): no batch applies until that copy ran.
pub const RECOPY: &str = "recopy";

/// Marks the sync's tables on the target to be copied again, whatever its
/// `onetimecopy`: its record of applied changes and of copied parts
/// replaced, in one transaction under the applier lock, so that no batch
/// applies after this but the copy (see `Session::ensure_initial_copy`).
/// For a sync whose capture lost changes (a lost slot).
pub async fn mark_recopy(tgt: &mut Conn, plan: &Plan) -> Result<()> {
    let s = quote_ident(&plan.schema);
    let tx = tgt.transaction().await?;
    tx.execute(XACT_LOCK, &[&LOCK_CLASS, &plan.sync_id]).await?;
    if tx.relation_exists(&format!("{s}.copy_units")).await? {
        tx.execute(&format!("delete from {s}.copy_units where sync = $1"), &[&plan.sync]).await?;
    }
    set_applied_snapshot(&tx, plan, RECOPY).await?;
    tx.commit().await?;
    Ok(())
}

/// Records where change apply continues from: after an initial copy, or
/// in a batch's target transaction, the snapshot it brought the target to.
/// (The relgroup's sequences travel outside batches: see
/// [`crate::sequences`].)
pub async fn set_applied_snapshot(tgt: &impl Sql, plan: &Plan, snapshot: &str) -> Result<()> {
    tgt.execute(
        &format!(
            "insert into {}.applied (sync, snapshot) values ($1, $2)
             on conflict (sync) do update set snapshot = excluded.snapshot, applied_at = now()",
            quote_ident(&plan.schema)
        ),
        &[&plan.sync, &snapshot],
    )
    .await?;
    Ok(())
}

/// The snapshot last applied on a target, if any.
pub async fn applied_snapshot(tgt: &Conn, plan: &Plan) -> Result<Option<String>> {
    let row = tgt
        .query_opt(
            &format!("select snapshot from {}.applied where sync = $1", quote_ident(&plan.schema)),
            &[&plan.sync],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Applies one batch: everything the source committed since the target's
/// last batch, as of one source snapshot.
/// With `lo`, the batch also runs a large-object pass of that kind; with
/// `purge`, it purges the deltas every target has applied; with
/// `catch_up_at`, a batch that large is not applied (`None`: see
/// [`crate::backlog`]).
pub async fn apply_batch(
    src: &mut Conn,
    tgt: &mut Conn,
    plan: &Plan,
    lo: Option<Pass>,
    purge: Purge,
    catch_up_at: Option<i64>,
) -> Result<Option<BatchStats>> {
    let started = Instant::now();
    let target_name = tgt.name().to_string();
    let (stx, ttx, decoded) = begin_batch(src, tgt, plan).await?;
    let Some(mut stats) = apply_within(&stx, &ttx, plan, catch_up_at).await? else {
        ttx.rollback().await?;
        stx.rollback().await?;
        plan.end_pump(src, None).await?;
        return Ok(None);
    };
    if let Some(mode) = lo.filter(|_| plan.large_objects) {
        let pass = large_objects::pass(&stx, &ttx, &plan.schema, &plan.sync, mode).await?;
        stats.large_objects = Some(pass);
    }
    ttx.commit().await?;
    stx.commit().await?;
    plan.end_pump(src, decoded).await?;

    let purge = match purge {
        Purge::Changed(mut tables) => {
            tables.extend(&stats.changed);
            Purge::Changed(tables)
        }
        other => other,
    };
    record_consumer(src, plan, &target_name, &stats.snapshot, &purge).await?;
    stats.millis = started.elapsed().as_millis() as i64;
    Ok(Some(stats))
}

/// Records on the source that `target` has applied `snapshot`, and purges
/// the deltas every target has applied, those `purge` names.
pub(crate) async fn record_consumer(
    src: &mut Conn,
    plan: &Plan,
    target_name: &str,
    snapshot: &str,
    purge: &Purge,
) -> Result<()> {
    let s = quote_ident(&plan.schema);
    // Not atomic with the target, and need not be: the target's marker is
    // the truth; this one only decides what may be purged (and what status
    // calls pending), and a stale value purges less. So it is written
    // without waiting for the WAL flush, and with the purge, when due, in
    // the same source transaction: bookkeeping costs the source one
    // commit per batch, not one per table.
    // The purge goes by slices of deltas, a transaction each: one naming
    // every delta of thousands would hold more locks than the server
    // has (see `Sql::tables_per_transaction`).
    let update = format!(
        "update {s}.consumer set snapshot = {}, updated_at = now()
         where sync_id = {} and target = {};",
        quote_literal(snapshot),
        plan.sync_id,
        quote_literal(target_name)
    );
    let deletes = purge_sql(plan, purge);
    let mut slices = deletes.chunks(src.tables_per_statement()).map(|c| c.concat());
    let mut next = Some(update + &slices.next().unwrap_or_default());
    while let Some(work) = next {
        let tx = src.transaction().await?;
        tx.batch_execute(&format!("set local synchronous_commit = off; {work}")).await?;
        tx.commit().await?;
        next = slices.next();
    }
    Ok(())
}

/// Opens a batch: the target transaction, holding the sync's applier lock,
/// and the source's transaction whose snapshot bounds it (see
/// [`source_snapshot`]), and where to advance the sync's slot once that
/// committed.
pub async fn begin_batch<'a>(
    src: &'a mut Conn,
    tgt: &'a mut Conn,
    plan: &Plan,
) -> Result<(Tx<'a>, Tx<'a>, Option<String>)> {
    let ttx = tgt.transaction().await?;
    ttx.execute(XACT_LOCK, &[&LOCK_CLASS, &plan.sync_id]).await?;
    let (stx, decoded) = source_snapshot(src, plan).await?;
    Ok((stx, ttx, decoded))
}

/// The source's REPEATABLE READ transaction of a batch (or a verify):
/// read-only; where the sync decodes, one that first writes what the slot
/// decoded into the deltas (see [`decoding::pump`]), so that its snapshot
/// sees every change it sees in the deltas too. Returns where to advance
/// the slot once it committed ([`Plan::end_pump`]).
pub async fn source_snapshot<'a>(
    src: &'a mut Conn,
    plan: &Plan,
) -> Result<(Tx<'a>, Option<String>)> {
    let Some(stream) = &plan.decoding else {
        return Ok((src.snapshot().await?, None));
    };
    // On error the lock stays with the session, which then goes (see
    // `decoding::unlock`).
    decoding::lock(src, plan.sync_id).await?;
    if !plan.streams() {
        decoding::nudge(src, stream).await;
    }
    if plan.pump_next_by_slices.swap(false, Ordering::Relaxed)
        && let Err(e) = plan.pump_by_slices(src).await
    {
        plan.pump_next_by_slices.store(true, Ordering::Relaxed);
        return Err(e);
    }
    let stx = src.writable_snapshot().await?;
    let to = plan.pump_in(&stx, None).await?;
    Ok((stx, to))
}

/// Brings the target, inside `ttx`, to the state of the source in `stx`'s
/// snapshot, and records that snapshot as applied (in `ttx` too). With
/// `catch_up_at`, a batch of that many changed keys or more is left to
/// [`crate::backlog`]: nothing is written and `None` returned.
pub async fn apply_within(
    stx: &Tx<'_>,
    ttx: &Tx<'_>,
    plan: &Plan,
    catch_up_at: Option<i64>,
) -> Result<Option<BatchStats>> {
    let s = quote_ident(&plan.schema);
    let mut stats = BatchStats::default();
    let prev: Option<String> = ttx
        .query_opt(&format!("select snapshot from {s}.applied where sync = $1"), &[&plan.sync])
        .await?
        .map(|r| r.get(0));
    if prev.as_deref() == Some(RECOPY) {
        return Err(Error::invalid(
            format!(
                "sync \"{}\": the target is to be copied again (its capture lost changes) \
                 before any batch applies",
                plan.sync
            ),
            format!(
                "the daemon copies it at its next round, or pgleap kick {} --wait does",
                plan.sync
            ),
        ));
    }
    stats.snapshot = set_after(stx, prev.as_deref()).await?;
    let cond = Plan::pending(prev.as_deref());
    let named = plan.candidates(stx).await?;
    // A transaction naming more tables than the servers' lock tables can
    // spare would fail, again at every retry: table by table instead.
    let limit = stx.tables_per_transaction().min(ttx.tables_per_transaction());
    if catch_up_at.is_some() && named.len() > limit && plan.partition_truncates.is_none() {
        return Ok(None);
    }
    let counts = pending_counts(stx, plan, &named).await?;
    stats.changed =
        counts.iter().enumerate().filter(|(_, c)| c.0 > 0 || c.1).map(|(i, _)| i).collect();
    plan.check_shape(stx, Some(&stats.changed)).await?;

    if let Some(truncates) = &plan.partition_truncates {
        let truncated = truncate_partitions(stx, ttx, truncates, &cond).await?;
        stats.truncates += truncated;
        // A partition emptied: every part of the partitioned tables.
        for t in plan.tables.iter().filter(|t| t.partitioned && truncated > 0) {
            touch(ttx, t, false).await?;
        }
    }
    if catch_up_at.is_some_and(|n| keyed_changes(plan, &counts) >= n)
        && plan.partition_truncates.is_none()
    {
        return Ok(None);
    }
    for (t, (changes, truncated)) in plan.tables.iter().zip(counts) {
        apply_table(stx, ttx, t, &cond, changes, truncated, &mut stats).await?;
    }
    set_applied_snapshot(ttx, plan, &stats.snapshot).await?;
    Ok(Some(stats))
}

/// The changed keys of a batch's keyed tables, from [`pending_counts`].
pub(crate) fn keyed_changes(plan: &Plan, counts: &[(i64, bool)]) -> i64 {
    plan.tables.iter().zip(counts).filter(|(t, _)| !t.keys.is_empty()).map(|(_, c)| c.0).sum()
}

/// Brings one table, inside `ttx`, to the state of the source in `stx`'s
/// snapshot: the changes of `cond` on its delta, of which `changes` keys
/// (or events), and whether one was a TRUNCATE, as [`pending_counts`] says.
pub(crate) async fn apply_table(
    stx: &Tx<'_>,
    ttx: &Tx<'_>,
    t: &TablePlan,
    cond: &str,
    changes: i64,
    truncated: bool,
    stats: &mut BatchStats,
) -> Result<()> {
    if changes == 0 && !truncated {
        return Ok(());
    }
    if t.keys.is_empty() {
        apply_keyless(stx, ttx, t, cond, stats).await?;
        return touch(ttx, t, false).await;
    }
    let step = Instant::now();
    if truncated {
        ttx.batch_execute(&format!("truncate {}", t.rel())).await?;
        stats.truncates += 1;
    }
    let reload = !truncated && reload_pays(ttx, t, changes).await?;
    if changes >= LARGE_BACKLOG {
        // A catch-up can take minutes in one table: say so as it starts.
        let how = if reload { "reloading the table whole" } else { "key by key" };
        tracing::info!(table = t.display, changes, how, "applying a large backlog");
    }
    let (inserts, deletes) = if reload {
        ttx.batch_execute(&format!("truncate {}", t.rel())).await?;
        let (rows, _) = copy_table_rows(stx, ttx, t, "true", &t.copy_in(), &|_| {}).await?;
        // TRUNCATE forgot the table's statistics: the new server must not
        // plan blind, and the next backlog needs the row count.
        ttx.batch_execute(&format!("analyze {}", t.table)).await?;
        (rows, 0)
    } else {
        apply_keyed(stx, ttx, t, cond, changes, truncated).await?
    };
    stats.inserts += inserts;
    stats.deletes += deletes;
    if truncated || reload || inserts + deletes > 0 {
        touch(ttx, t, !truncated && !reload).await?;
    }
    let ms = step.elapsed().as_millis() as u64;
    if changes >= LARGE_BACKLOG {
        tracing::info!(table = t.display, changes, inserts, deletes, ms, "applied");
    } else {
        tracing::debug!(table = t.display, changes, inserts, deletes, ms, "applied");
    }
    Ok(())
}

/// Marks the parts of `t` a verify found equal as touched by this batch
/// (inside it: a batch that rolls back touched nothing): those its staged
/// keys fall in when `staged` (the keys just applied are in its staging
/// table), else every part.
async fn touch(ttx: &Tx<'_>, t: &TablePlan, staged: bool) -> Result<()> {
    let sql = match &t.touch_staged {
        Some(sql) if staged => sql,
        _ => &t.touch_all,
    };
    ttx.query_prepared(sql, &[]).await?;
    Ok(())
}

/// A table's backlog from this many changed keys is logged as it starts
/// and ends (at info; smaller ones at debug).
const LARGE_BACKLOG: i64 = RELOAD_MIN_CHANGES;

/// Fewer changed keys than this are always applied key by key.
const RELOAD_MIN_CHANGES: i64 = 100_000;

/// Whether a keyed table's backlog is better applied by emptying the table
/// on the target and copying it whole from the batch's snapshot: when the
/// changed keys reach half the rows the target holds. Updating a row in
/// place costs about five times what COPY costs per row (docs/BENCHMARKS.md),
/// so past about a quarter of the rows updated reading the whole table is
/// cheaper; an updated row counts once since #27 (twice, its old and new
/// key, in deltas of syncs installed before), so the reload now waits for
/// half the rows updated: later than it could, never wrongly. Only
/// where TRUNCATE is allowed (see [`truncatable`]) and the target's row
/// count is known (analyzed).
async fn reload_pays(ttx: &Tx<'_>, t: &TablePlan, changes: i64) -> Result<bool> {
    if changes < RELOAD_MIN_CHANGES {
        return Ok(false);
    }
    let rows: f32 = ttx.query_one(RELTUPLES, &[&t.table]).await?.get(0);
    Ok(rows > 0.0 && changes as f32 >= rows / 2.0 && truncatable(ttx, t).await?)
}

/// Whether the role may empty `t` on the target with TRUNCATE: it has the
/// privilege, and no foreign key references the table (a superuser target
/// keeps its foreign keys during the sync, and TRUNCATE would refuse).
pub(crate) async fn truncatable(c: &impl Sql, t: &TablePlan) -> Result<bool> {
    let row = c.query_one(TRUNCATABLE, &[&t.table]).await?;
    Ok(row.get::<_, Option<bool>>(0).unwrap_or(false))
}

/// Empties on the target the partitions TRUNCATEd by name on the source in
/// the batch (those the target has); the batch's changes, applied after,
/// bring back what was written to them since. Returns how many.
async fn truncate_partitions(
    stx: &Tx<'_>,
    ttx: &Tx<'_>,
    truncates: &str,
    cond: &str,
) -> Result<u64> {
    let rows = stx
        .query(&format!("select distinct schema_name, rel_name from {truncates} where {cond}"), &[])
        .await?;
    let mut done = 0;
    for r in &rows {
        let partition = qualified(r.get(0), r.get(1));
        if ttx.relation_exists(&partition).await? {
            ttx.batch_execute(&format!("truncate {partition}")).await?;
            done += 1;
        }
    }
    Ok(done)
}

/// Makes `prev` (none: [`FROM_THE_START`]) the snapshot the statements over
/// every delta on `c` compare with (see [`Plan::PENDING_AFTER`]), and
/// returns `c`'s current snapshot: one round trip for both, as a poll and a
/// batch need both.
pub(crate) async fn set_after(c: &impl Sql, prev: Option<&str>) -> Result<String> {
    let row = c
        .query_one(
            "select txid_current_snapshot()::text, set_config('pgleap.after', $1, false)",
            &[&prev.unwrap_or(FROM_THE_START)],
        )
        .await?;
    Ok(row.get(0))
}

/// Per table of the plan, in order: the changes pending after the snapshot
/// given to [`set_after`] on `stx`, and whether one was a TRUNCATE; only
/// the tables `among` names are counted (see [`Plan::candidates`]), the
/// others read none.
pub(crate) async fn pending_counts(
    stx: &Tx<'_>,
    plan: &Plan,
    among: &[usize],
) -> Result<Vec<(i64, bool)>> {
    let mut counts = vec![(0, false); plan.tables.len()];
    let slice = stx.tables_per_statement();
    // Every table in one statement: the same statement every batch,
    // planned once.
    let same_every_time = among.len() == plan.tables.len() && among.len() <= slice;
    let cond = Plan::PENDING_AFTER;
    let parts: Vec<String> = among
        .iter()
        .map(|&i| {
            let t = &plan.tables[i];
            format!(
                "select {i} as i, {} as n,
                        coalesce(bool_or(_pgleap_truncated), false) as truncated
                 from {} where {}",
                t.changes_count(Some("not _pgleap_truncated")),
                t.delta,
                keyless_cond(t, cond)
            )
        })
        .collect();
    for chunk in parts.chunks(slice) {
        let sql = format!("select i, n, truncated from ({}) x", chunk.join(" union all "));
        let rows = match same_every_time {
            true => stx.query_prepared(&sql, &[]).await?,
            false => stx.query(&sql, &[]).await?,
        };
        for r in rows {
            counts[r.get::<_, i32>(0) as usize] = (r.get(1), r.get(2));
        }
    }
    Ok(counts)
}

/// A keyless table's pending events: those of `cond`, less those its
/// initial copy already holds (see [`TablePlan::copied_under`]). Keyed
/// tables: `cond` itself.
fn keyless_cond(t: &TablePlan, cond: &str) -> String {
    match &t.copied_under {
        Some(copy) if t.keys.is_empty() => format!(
            "{cond} and not txid_visible_in_snapshot(_pgleap_txid, {}::txid_snapshot)",
            quote_literal(copy)
        ),
        _ => cond.to_string(),
    }
}

/// Brings a keyed table's changed keys (`cond` on its delta) to the
/// source's state, set-based: one COPY stages each changed key with the
/// source's row, or none if it is gone, into a session temp table; then
/// one DELETE of the vanished keys, one UPDATE of those the target has,
/// one INSERT of the others. Unchanged indexes and HOT updates do the rest
/// (delete-and-reinsert of every changed row made each insert check its
/// key against the row just deleted). A key change that collides with
/// another unique index mid-statement (two rows swapping a value) falls
/// back to delete-and-insert of every changed key. Returns (rows written,
/// rows deleted).
async fn apply_keyed(
    stx: &Tx<'_>,
    ttx: &Tx<'_>,
    t: &TablePlan,
    cond: &str,
    changes: i64,
    truncated: bool,
) -> Result<(u64, u64)> {
    if stage(stx, ttx, t, cond, changes).await? == 0 {
        return Ok((0, 0));
    }
    let written = write_staged(ttx, t, truncated).await?;
    if t.compare_applied {
        compare_staged(ttx, t).await?;
    }
    Ok(written)
}

/// Writes the staged rows of `t` over the target's: see [`apply_keyed`].
async fn write_staged(ttx: &Tx<'_>, t: &TablePlan, truncated: bool) -> Result<(u64, u64)> {
    let staging = t.staging();
    let on = |a: &str, b: &str| key_match(t, a, b);
    let cols = &t.columns;
    let rel = t.rel();
    // OVERRIDING SYSTEM VALUE: an identity column GENERATED ALWAYS takes
    // the source's values, as COPY would.
    let insert = format!(
        "insert into {table}{list} overriding system value select {cols} from {staging} s
         where s._pgleap_present and not exists (select 1 from {rel} t where {on})",
        table = t.table,
        list = t.column_list(),
        on = on("t", "s"),
    );
    if truncated {
        return Ok((insert_new(ttx, &insert).await?, 0));
    }
    let deleted = ttx
        .execute(
            &format!(
                "delete from {rel} t using {staging} s where {} and not s._pgleap_present",
                on("t", "s")
            ),
            &[],
        )
        .await?;
    // Every column is set, the key columns too (their exact values; the
    // match is by their type's equality), but for identity columns
    // GENERATED ALWAYS in the key, which refuse an UPDATE and cannot
    // differ from their match but by their type's equality of integers.
    let others: Vec<String> = t
        .column_names
        .iter()
        .filter(|c| !(t.keys.contains(c) && t.always_identity.contains(c)))
        .map(|c| format!("{c} = s.{c}"))
        .collect();
    ttx.batch_execute("savepoint pgleap_upsert").await?;
    let upsert = async {
        let mut written = 0;
        if !others.is_empty() {
            written += ttx
                .execute(
                    &format!(
                        "update {rel} t set {} from {staging} s where {} and s._pgleap_present",
                        others.join(", "),
                        on("t", "s")
                    ),
                    &[],
                )
                .await?;
        }
        written += insert_new(ttx, &insert).await?;
        Ok::<_, crate::pg::PgError>(written)
    }
    .await;
    match upsert {
        Ok(written) => Ok((written, deleted)),
        // Another unique index collided mid-statement, or an identity
        // column GENERATED ALWAYS outside the key refuses an UPDATE.
        Err(e)
            if e.sqlstate() == Some(&SqlState::UNIQUE_VIOLATION)
                || e.sqlstate() == Some(&SqlState::GENERATED_ALWAYS) =>
        {
            ttx.batch_execute("rollback to savepoint pgleap_upsert").await?;
            let removed = ttx
                .execute(
                    &format!("delete from {rel} t using {staging} s where {}", on("t", "s")),
                    &[],
                )
                .await?;
            Ok((insert_new(ttx, &insert).await?, deleted + removed))
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs `insert`, the staged rows the target lacks (an anti-join with the
/// table it writes), without a sequential scan of that table. A table the
/// target last analyzed empty (empty at the initial copy) is planned as
/// an inner sequential scan per staged row, and that scan grows with every
/// row the statement inserts (invisible to it, but read): quadratic, and
/// 200,000 new rows in one batch had not finished after 200 s. Its key's
/// index answers each probe in a few pages whatever the table holds.
///
/// A plan without sequential scans is costed past every JIT threshold
/// (a scan refused costs 10^10), and compiling it took 50-230 ms where
/// inserting one row takes well under one: JIT is off for it too.
async fn insert_new(ttx: &Tx<'_>, insert: &str) -> std::result::Result<u64, crate::pg::PgError> {
    let (off, on) = if ttx.version().has_jit() {
        (
            "set local enable_seqscan = off; set local jit = off",
            "set local enable_seqscan to default; set local jit to default",
        )
    } else {
        ("set local enable_seqscan = off", "set local enable_seqscan to default")
    };
    ttx.batch_execute(off).await?;
    let inserted = ttx.execute(insert, &[]).await?;
    ttx.batch_execute(on).await?;
    Ok(inserted)
}

/// Fails if a staged key's row on the target is not, as text, the
/// source's row it was staged from (or, for a vanished key, is still
/// there), naming the first such key.
async fn compare_staged(ttx: &Tx<'_>, t: &TablePlan) -> Result<()> {
    let row = |p: &str| {
        let cols: Vec<String> = t
            .column_names
            .iter()
            .map(|c| match t.sliced(c) {
                Some(_) => slices::comparable(&format!("{p}.{c}")),
                None => format!("{p}.{c}"),
            })
            .collect();
        format!("row({})::text", cols.join(", "))
    };
    let key: Vec<String> = t.keys.iter().map(|k| format!("s.{k}::text")).collect();
    let sql = format!(
        "select concat_ws(',', {key}) from {staging} s
         where case when s._pgleap_present
                    then not exists (select 1 from {rel} t where {on} and {t_row} = {s_row})
                    else exists (select 1 from {rel} t where {on}) end
         limit 1",
        key = key.join(", "),
        staging = t.staging(),
        rel = t.rel(),
        on = key_match(t, "t", "s"),
        t_row = row("t"),
        s_row = row("s"),
    );
    if let Some(r) = ttx.query_opt(&sql, &[]).await? {
        let key: String = r.get(0);
        return Err(Error::invalid(
            format!(
                "{}: the row of key ({key}) on the target differs from the source's right after \
                 pgleap wrote it",
                t.display
            ),
            "a trigger, rule or policy on the target changes rows as they are written: disable \
             it until the cutover is done (pgleap verify names every differing row)",
        ));
    }
    Ok(())
}

/// `a.k = b.k and ...` over the table's key columns.
fn key_match(t: &TablePlan, a: &str, b: &str) -> String {
    t.keys.iter().map(|k| format!("{a}.{k} = {b}.{k}")).collect::<Vec<_>>().join(" and ")
}

/// Stages a keyed table's changed keys (`cond` on its delta) on the
/// target, each with the source's current row or, for a vanished row, its
/// key alone; returns how many.
async fn stage(stx: &Tx<'_>, ttx: &Tx<'_>, t: &TablePlan, cond: &str, changes: i64) -> Result<u64> {
    let staging = t.staging();
    // The delta tables have no statistics (they churn too fast to keep
    // any), so the planner guesses 200 changed keys and looks each up by
    // index: for a backlog that is a large share of the table, one hash
    // join over a scan of it is many times faster.
    let hash_join = changes > 10_000 && changes.saturating_mul(50) > t.est_rows;
    let t0 = Instant::now();
    create_staging(ttx, t).await?;
    // Every column from the source's row, its key too: a key compares by
    // its type's equality (citext ignores case, numeric scale, float -0)
    // but is carried by its exact value. A vanished row has only its key,
    // from the delta. Several recorded keys equal to one row's (its old and
    // new key differing only in case) stage that row once.
    let first = &t.keys[0];
    let select: Vec<String> = t
        .column_names
        .iter()
        .map(|c| {
            if t.keys.contains(c) {
                format!("case when t.{first} is not null then t.{c} else k.{c} end")
            } else {
                t.carried(c)
            }
        })
        .chain(std::iter::once(slices::mark(&t.sliceable, "t")))
        .collect();
    if hash_join {
        stx.batch_execute("set local enable_nestloop = off").await?;
    }
    // The marks are read from the stream: no query of the staging table
    // for them (a round trip per table and batch).
    let (staged, _, marks) = copy_between_marked(
        stx,
        &format!(
            "copy (select {distinct} t.{first} is not null, {select}
                   from ({keys}) k
                   left join {table} t on {on}) to stdout",
            distinct = if t.keys_bytewise {
                ""
            } else {
                "distinct on (t.tableoid, t.ctid, case when t.ctid is null then row(k.*)::text end)"
            },
            select = select.join(", "),
            keys = t.changed_keys(cond),
            table = t.rel(),
            on = key_match(t, "t", "k"),
        ),
        ttx,
        &staging_copy_in(t),
        &|_| {},
        Marked::Forwarded,
    )
    .await?;
    slices::fill(stx, ttx, &t.sliceable, &t.rel(), &staging, &marks).await?;
    if hash_join {
        stx.batch_execute("set local enable_nestloop = on").await?;
    }
    tracing::debug!(table = t.display, staged, ms = t0.elapsed().as_millis() as u64, "staged");
    if staged > 1000 {
        // Without statistics the planner takes the temp table for tiny and
        // joins with index lookups per key.
        ttx.batch_execute(&format!("analyze {staging}")).await?;
    }
    Ok(staged)
}

/// Creates `t`'s staging table in this session, if it has none, and
/// empties it: whether the row is present, the columns with their base
/// types, and the mark of a row whose large values follow in slices.
///
/// Emptied here, not ON COMMIT DELETE ROWS: the server empties every such
/// table of the session at each commit of a transaction that used any
/// temp table, so a daemon that had applied changes to 10,000 tables paid
/// 10,000 truncations at every batch's commit (seen as an initial copy of
/// 10,000 tables crawling at its commits). The rows of a table's last
/// batch stay until its next one. A session keeps a bounded number of
/// them (see [`Sql::keep_temp_table`]): the others are dropped between
/// its transactions, not all at once as it ends.
async fn create_staging(ttx: &Tx<'_>, t: &TablePlan) -> Result<()> {
    ttx.batch_execute(&format!(
        "set local client_min_messages = warning;
         create temp table if not exists {staging} (
             _pgleap_present bool{sep}{defs}, {mark} text);
         truncate {staging}",
        staging = t.staging(),
        sep = if t.columns.is_empty() { "" } else { ", " },
        defs = t.staging_columns,
        mark = slices::MARK,
    ))
    .await?;
    ttx.keep_temp_table(&t.staging());
    Ok(())
}

/// The COPY filling `t`'s staging table.
fn staging_copy_in(t: &TablePlan) -> String {
    let sep = if t.columns.is_empty() { "" } else { ", " };
    format!("copy {} (_pgleap_present{sep}{}, {}) from stdin", t.staging(), t.columns, slices::MARK)
}

/// Copies the rows of `t` under `predicate` (columns unqualified, or of
/// alias `t`) to the target by `copy_in`: those without a large value in
/// one COPY, which also names the others (their values empty, the row's
/// mark last, not forwarded: no second scan, and no staging table unless
/// there is one); then those through the staging table, their large
/// values in slices. Returns (rows, bytes of the COPY streams).
pub(crate) async fn copy_table_rows(
    stx: &Tx<'_>,
    ttx: &Tx<'_>,
    t: &TablePlan,
    predicate: &str,
    copy_in: &str,
    on_bytes: &dyn Fn(u64),
) -> Result<(u64, u64)> {
    if t.sliceable.is_empty() {
        let out =
            format!("copy (select {} from {} t where {predicate}) to stdout", t.columns, t.rel());
        return Ok(copy_between(stx, &out, ttx, copy_in, on_bytes).await?);
    }
    let out = format!(
        "copy (select {}, {} from {} t where {predicate}) to stdout",
        carried_columns(t),
        slices::mark(&t.sliceable, "t"),
        t.rel(),
    );
    let (rows, bytes, marks) =
        copy_between_marked(stx, &out, ttx, copy_in, on_bytes, Marked::Dropped).await?;
    if marks.is_empty() {
        return Ok((rows, bytes));
    }
    let (large_rows, large_bytes) = copy_large_rows(stx, ttx, t, &marks).await?;
    on_bytes(large_bytes);
    Ok((rows + large_rows, bytes + large_bytes))
}

/// `t`'s columns as a COPY out selects them (alias `t`, see
/// [`TablePlan::carried`]).
fn carried_columns(t: &TablePlan) -> String {
    t.column_names.iter().map(|c| t.carried(c)).collect::<Vec<_>>().join(", ")
}

/// The rows of `t` that `marks` name (see [`slices::mark`]): through the
/// staging table, where their large values are filled in slices, then
/// inserted. Returns (rows, bytes of their COPY stream).
async fn copy_large_rows(
    stx: &Tx<'_>,
    ttx: &Tx<'_>,
    t: &TablePlan,
    marks: &[String],
) -> Result<(u64, u64)> {
    create_staging(ttx, t).await?;
    let ctids: Vec<&str> = marks.iter().filter_map(|m| m.split_once(':')).map(|(_, c)| c).collect();
    // A TID scan finds the rows; the mark, tableoid included, picks them
    // (a partitioned table's partitions share ctids).
    let out = format!(
        "copy (select true, {}, {mark} from {} t
               where t.ctid = any({}::tid[]) and {mark} = any({}::text[])) to stdout",
        carried_columns(t),
        t.rel(),
        quote_literal(&format!(
            "{{{}}}",
            ctids.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(",")
        )),
        quote_literal(&format!(
            "{{{}}}",
            marks.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(",")
        )),
        mark = slices::mark(&t.sliceable, "t"),
    );
    let (rows, bytes) = copy_between(stx, &out, ttx, &staging_copy_in(t), &|_| {}).await?;
    let staging = t.staging();
    slices::fill(stx, ttx, &t.sliceable, &t.rel(), &staging, marks).await?;
    ttx.execute(
        &format!(
            "insert into {}{} overriding system value select {} from {staging}",
            t.table,
            t.column_list(),
            t.columns
        ),
        &[],
    )
    .await?;
    ttx.batch_execute(&format!("truncate {staging}")).await?;
    Ok((rows, bytes))
}

/// Replays a keyless table's row images in the order they happened: after
/// the batch's last TRUNCATE, inserts and deletes of one matching row each
/// (rows compared as text, NULLs equal; `tableoid` and `ctid` pick exactly
/// one of several identical rows). An insert-only stream is one COPY.
async fn apply_keyless(
    stx: &Tx<'_>,
    ttx: &Tx<'_>,
    t: &TablePlan,
    cond: &str,
    stats: &mut BatchStats,
) -> Result<()> {
    let cond = keyless_cond(t, cond);
    let last_truncate: Option<i64> = stx
        .query_one(
            &format!(
                "select max(_pgleap_seq) filter (where _pgleap_truncated) from {} where {cond}",
                t.events()
            ),
            &[],
        )
        .await?
        .get(0);
    if last_truncate.is_some() {
        ttx.batch_execute(&format!("truncate {}", t.rel())).await?;
        stats.truncates += 1;
    }
    let events = format!(
        "{cond} and not _pgleap_truncated and _pgleap_seq > {}",
        last_truncate.unwrap_or(0)
    );
    let row = stx
        .query_one(
            &format!(
                "select count(*) filter (where _pgleap_op = 'I'), count(*) filter (where _pgleap_op = 'D')
                 from {} where {events}",
                t.events()
            ),
            &[],
        )
        .await?;
    let (inserts, deletes): (i64, i64) = (row.get(0), row.get(1));
    if inserts + deletes == 0 {
        return Ok(());
    }
    let cols = &t.columns;
    if deletes == 0 {
        stats.inserts += copy_rows(
            stx,
            &format!(
                "copy (select {cols} from {} where {events} order by _pgleap_seq) to stdout",
                t.events()
            ),
            ttx,
            &t.copy_in(),
        )
        .await?;
        return Ok(());
    }
    replay(stx, ttx, t, &events).await?;
    stats.inserts += inserts as u64;
    stats.deletes += deletes as u64;
    Ok(())
}

/// Replays a keyless table's events (`events`: their condition on the
/// delta table) in order: each insert, and each delete of exactly one
/// matching row, by one server-side loop over the events COPYed to a temp
/// table.
async fn replay(stx: &Tx<'_>, ttx: &Tx<'_>, t: &TablePlan, events: &str) -> Result<()> {
    let cols = &t.columns;
    // The event columns, then the table's (which may be none).
    let with_cols = |events: &str| {
        if cols.is_empty() { events.to_string() } else { format!("{events}, {cols}") }
    };
    ttx.batch_execute(&format!(
        "drop table if exists pg_temp.pgleap_events;
         create temp table pgleap_events on commit drop as
             select {} from {} limit 0",
        with_cols("null::int8 as _pgleap_seq, null::\"char\" as _pgleap_op"),
        t.rel()
    ))
    .await?;
    copy_rows(
        stx,
        &format!(
            "copy (select {} from {} where {events}) to stdout",
            with_cols("_pgleap_seq, _pgleap_op"),
            t.events()
        ),
        ttx,
        &format!(
            "copy pg_temp.pgleap_events ({}) from stdin",
            with_cols("_pgleap_seq, _pgleap_op")
        ),
    )
    .await?;
    let insert = if cols.is_empty() {
        format!("insert into {} default values", t.table)
    } else {
        let values: Vec<String> = t.column_names.iter().map(|c| format!("r.{c}")).collect();
        format!("insert into {} ({cols}) values ({})", t.table, values.join(", "))
    };
    let matches: Vec<String> = t
        .column_names
        .iter()
        .map(|c| format!("x.{c}::text is not distinct from r.{c}::text"))
        .chain(std::iter::once("true".to_string()))
        .collect();
    ttx.batch_execute(&format!(
        "do $pgleap$
         declare r record;
         begin
             for r in select * from pg_temp.pgleap_events order by _pgleap_seq loop
                 if r._pgleap_op = 'I' then
                     {insert};
                 else
                     delete from {table}
                     where (tableoid, ctid) = (select x.tableoid, x.ctid from {table} x
                                               where {matches} limit 1);
                 end if;
             end loop;
         end $pgleap$",
        table = t.rel(),
        matches = matches.join(" and "),
    ))
    .await?;
    Ok(())
}

/// The deletes of the deltas every target has applied: those visible in
/// every consumer's snapshot (a batch applies exactly what its snapshot
/// sees). Not "below every snapshot's xmin": a long transaction anywhere
/// on the source (a pg_dump, a report) holds xmin back, and the deltas
/// would pile up for as long as it runs. The xmax bound lets the BRIN
/// index skip the newer ranges. Nothing goes while a target has applied
/// nothing (its snapshot is NULL).
fn purge_sql(plan: &Plan, purge: &Purge) -> Vec<String> {
    let s = quote_ident(&plan.schema);
    let id = plan.sync_id;
    let tables: Vec<&TablePlan> = match purge {
        Purge::No => return Vec::new(),
        Purge::All => plan.tables.iter().collect(),
        Purge::Changed(changed) => changed.iter().filter_map(|&i| plan.tables.get(i)).collect(),
    };
    tables
        .into_iter()
        .map(|t| &t.delta)
        .chain(&plan.partition_truncates)
        .chain(plan.journal.as_ref().map(|(journal, _)| journal))
        .map(|delta| {
            format!(
                "delete from {delta} d
                 where d._pgleap_txid < (select min(txid_snapshot_xmax(snapshot::txid_snapshot))
                                         from {s}.consumer where sync_id = {id})
                   and not exists (
                       select 1 from {s}.consumer c
                       where c.sync_id = {id}
                         and (c.snapshot is null
                              or not txid_visible_in_snapshot(d._pgleap_txid,
                                                              c.snapshot::txid_snapshot)));\n"
            )
        })
        .collect()
}

/// Streams a COPY out of the source's batch transaction into the target's;
/// returns the rows written.
async fn copy_rows(stx: &Tx<'_>, copy_out: &str, ttx: &Tx<'_>, copy_in: &str) -> Result<u64> {
    Ok(copy_between(stx, copy_out, ttx, copy_in, &|_| {}).await?.0)
}

/// Whether everything visible in snapshot `kick` is visible in `applied`
/// too, i.e. the target has every transaction committed before the kick.
pub async fn covers(src: &Conn, applied: &str, kick: &str) -> Result<bool> {
    let row = src
        .query_one(
            "select txid_snapshot_xmax($1::text::txid_snapshot) >= txid_snapshot_xmax($2::text::txid_snapshot)
                and not exists (
                    select 1 from txid_snapshot_xip($1::text::txid_snapshot) x
                    where x < txid_snapshot_xmax($2::text::txid_snapshot)
                      and txid_visible_in_snapshot(x, $2::text::txid_snapshot))",
            &[&applied, &kick],
        )
        .await?;
    Ok(row.get(0))
}

/// Changes waiting on the source for a target, and the age in seconds of
/// the oldest of them.
pub async fn pending(src: &Conn, plan: &Plan, target: &str) -> Result<(i64, f64)> {
    if plan.tables.is_empty() {
        return Ok((0, 0.0));
    }
    let s = quote_ident(&plan.schema);
    let snapshot = format!(
        "(select snapshot from {s}.consumer where sync_id = {} and target = {})::txid_snapshot",
        plan.sync_id,
        quote_literal(target)
    );
    let parts: Vec<String> = plan
        .tables
        .iter()
        .map(|t| {
            format!(
                "select {} n, min(_pgleap_at) oldest from {} d
                 where not coalesce(txid_visible_in_snapshot(d._pgleap_txid, {snapshot}), false)",
                t.changes_count(None),
                t.delta
            )
        })
        .collect();
    let (mut pending, mut lag) = (0i64, 0f64);
    for chunk in parts.chunks(src.tables_per_statement()) {
        let sql = format!(
            "select coalesce(sum(n), 0)::int8,
                    coalesce(extract(epoch from now() - min(oldest)), 0)::float8
             from ({}) x",
            chunk.join(" union all ")
        );
        let rows = src.query_prepared(&sql, &[]).await?;
        let row = &rows[0];
        pending += row.get::<_, i64>(0);
        lag = lag.max(row.get(1));
    }
    Ok((pending, lag))
}

// The catalog queries of this module, named.

const RELTUPLES: &str = "select reltuples from pg_class where oid = $1::text::regclass";

const TRUNCATABLE: &str = "select has_table_privilege(c.oid, 'TRUNCATE')
           and not exists (select 1 from pg_constraint
                           where confrelid = c.oid and contype = 'f')
    from pg_class c where c.oid = $1::text::regclass";
