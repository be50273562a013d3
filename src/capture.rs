//! Change capture on the source: which keys changed, recorded by triggers.
//!
//! Capture is state-based (Bucardo's model): a delta row says *which key*
//! changed, in which transaction, never what the row looked like. The apply
//! step later reads the key's current row. Everything lives in one schema
//! (`pgleap` unless the sync says otherwise):
//!
//! - `syncs`: one row per installed sync; its id prefixes every object name.
//! - `relations`: per sync, each captured table and its delta table.
//! - `consumer`: per sync and target, the source snapshot last applied
//!   there; deltas visible in every target's snapshot are purged.
//! - `d<sync>_<n>`: the delta table of one table: `_pgleap_txid` (of the
//!   writing transaction), `_pgleap_at`, `_pgleap_truncated`, and the key
//!   columns with their own names and types (no text round trip for keys),
//!   as arrays where a statement trigger records a statement's keys in a
//!   few rows (see `keyed_capture`). The prefix keeps the bookkeeping
//!   columns clear of key names like `txid`.
//!
//! Triggers are statement-level with transition tables (one per event, as
//! PostgreSQL requires), so a statement that touches a million rows runs the
//! trigger once and inserts its keys with one set-based INSERT, as a few
//! rows of arrays. An UPDATE records the new keys, and a row trigger records
//! the old key of a row whose key changed (a primary-key change is a delete
//! of the old key and an insert of the new). TRUNCATE records a marker row.
//!
//! Trigger functions are SECURITY DEFINER (owned by the role that installed
//! them, the table owner) with a fixed search_path, so application roles need
//! no privilege on the capture schema. No NOTIFY is sent: a NOTIFY takes a
//! cluster-wide lock at commit and would serialise the source's writers; the
//! daemon polls instead (see `daemon`).
//!
//! Every table is installed in its own short transaction under a
//! `lock_timeout`, retried with backoff, so a busy source never queues behind
//! pgleap for long; if any table fails, everything installed is removed.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::catalog::Relation;
use crate::decoding::{self, Method};
use crate::error::{Error, Result};
use crate::pg::{Conn, NamedQuery, PgError, PgVersion, Sql, qualified, quote_ident, quote_literal};

/// How long one DDL statement may wait for a table lock.
const LOCK_TIMEOUT: &str = "2s";
/// How many times a table's installation is tried before giving up.
const LOCK_ATTEMPTS: u32 = 8;

/// Names of the objects of one captured table.
#[derive(Debug, Clone)]
pub struct Captured {
    /// Its number in the sync (`relations.n`), the one its journal entries
    /// carry.
    pub n: i32,
    pub schema: String,
    pub name: String,
    pub delta: String,
    pub key_columns: Vec<String>,
    /// Whether the delta holds each statement's keys as arrays (see
    /// `keyed_capture`); deltas of row triggers, of keys whose type has no
    /// array type, and of syncs installed before arrays hold one key a row.
    pub key_arrays: bool,
}

/// Every trigger name a sync may create on a table: the statement
/// triggers of keyed tables and their row trigger for key changes, the row
/// trigger of keyless ones, and TRUNCATE.
fn trigger_names(sync_id: i32) -> [(String, &'static str); 8] {
    [
        (format!("pgleap_{sync_id}_ins"), "insert"),
        (format!("pgleap_{sync_id}_upd"), "update"),
        (format!("pgleap_{sync_id}_okey"), "key change"),
        (format!("pgleap_{sync_id}_del"), "delete"),
        (format!("pgleap_{sync_id}_row"), "row"),
        (format!("pgleap_{sync_id}_trunc"), "truncate"),
        (fence_trigger(sync_id), "fence"),
        (format!("pgleap_{sync_id}_ptrunc"), "partition truncate"),
    ]
}

/// Where a sync records TRUNCATEs naming one partition of a captured
/// partitioned table (a delta table: removed with the others).
pub fn partition_truncates(schema: &str, sync_id: i32) -> String {
    qualified(schema, &format!("d{sync_id}_partitions"))
}

/// A sync of more tables than this keeps a journal of the tables each
/// transaction changed: the daemon's poll and a batch read which tables
/// changed from it in one statement, instead of probing every delta (about
/// 12 µs a delta, 0.1 s a poll at 10,000 tables: #28, docs/BENCHMARKS.md).
/// Below it, probing costs less than what the journal adds to every
/// captured statement (one more small insert), so smaller syncs have none.
pub const JOURNAL_ABOVE: usize = 500;

/// The journal of a sync of more than [`JOURNAL_ABOVE`] tables: a row
/// (`n` of `relations`, 0 for a partition's TRUNCATE) per captured
/// statement, or row, or table and transaction (see [`journal_note`]),
/// written in the transaction that wrote the delta, so visible in exactly
/// the snapshots that see the delta.
pub fn journal(schema: &str, sync_id: i32) -> String {
    qualified(schema, &format!("d{sync_id}_journal"))
}

/// What a capture function writes to the journal, if the sync has one:
/// at every call (a statement, or a row), or with `once_per_transaction`
/// at the first row a transaction changes in the table (row triggers that
/// a bulk statement fires per row), remembered in a transaction-local
/// setting that reverts with a rolled-back subtransaction, as the insert
/// does.
fn journal_note(journal: Option<&str>, sync_id: i32, n: i32, once_per_transaction: bool) -> String {
    let Some(journal) = journal else {
        return String::new();
    };
    let insert = format!("insert into {journal} (_pgleap_txid, n) values (txid_current(), {n});");
    if !once_per_transaction {
        return insert;
    }
    let setting = quote_literal(&format!("pgleap.j{sync_id}_{n}"));
    format!(
        "if current_setting({setting}, true) is distinct from txid_current()::text then
             {insert}
             perform set_config({setting}, txid_current()::text, true);
         end if;"
    )
}

/// TRUNCATE naming one partition fires that partition's statement
/// triggers only, and PostgreSQL clones none from the parent: `partition`
/// gets one that records its name, and apply empties that partition on
/// the target before the batch's changes (which, state-based, then bring
/// back what was written to it after). Idempotent.
pub async fn capture_partition_truncates(
    client: &mut Conn,
    schema: &str,
    sync_id: i32,
    partition: &str,
) -> Result<()> {
    let delta = partition_truncates(schema, sync_id);
    let function = qualified(schema, &format!("f{sync_id}_ptrunc"));
    let trigger = format!("pgleap_{sync_id}_ptrunc");
    let exists: bool = client.query_one(TRIGGER_EXISTS, &[&partition, &trigger]).await?.get(0);
    if exists {
        return Ok(());
    }
    let journal = journal(schema, sync_id);
    let journaled = client.relation_exists(&journal).await?.then_some(journal.as_str());
    let note = journal_note(journaled, sync_id, 0, false);
    let ddl = format!(
        "create table if not exists {delta} (
                 _pgleap_txid int8 not null,
                 schema_name text not null,
                 rel_name text not null);
             create or replace function {function}() returns trigger
             language plpgsql security definer set search_path = pg_catalog, pg_temp as $pgleap$
             begin
                 insert into {delta} (_pgleap_txid, schema_name, rel_name)
                 values (txid_current(), tg_table_schema, tg_table_name);
                 {note}
                 return null;
             end $pgleap$;
             create trigger {} after truncate on {partition}
                 for each statement execute procedure {function}();",
        quote_ident(&trigger)
    );
    let what = format!("capturing TRUNCATE of partition {partition}");
    with_lock_retries(client, &what, &ddl).await
}

/// The trigger that refuses writes on the source after cutover.
pub fn fence_trigger(sync_id: i32) -> String {
    format!("pgleap_{sync_id}_fence")
}

/// The name (unqualified) of the function the fence triggers call.
pub fn fence_function(sync_id: i32) -> String {
    format!("f{sync_id}_fence")
}

/// Whether the source carries this sync's fence: a cutover is inside its
/// fence, or went past its switch point (or undid it only in part).
pub async fn fenced(src: &impl Sql, schema: &str, sync_id: i32) -> Result<bool> {
    let function = qualified(schema, &fence_function(sync_id));
    let row = src.query_one("select to_regproc($1) is not null", &[&function]).await?;
    Ok(row.get(0))
}

/// Installs capture for a sync on its source. On error nothing is left.
/// Which triggers capture a keyed table outside an inheritance tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Statement triggers with transition tables: a statement's keys in a
    /// few delta rows, however many rows it changed.
    Statement,
    /// Row triggers: one delta row per changed row (two when an UPDATE
    /// changes the key), no transition table; what a one-row statement
    /// costs least with.
    Row,
}

pub async fn install(
    client: &mut Conn,
    schema: &str,
    sync: &str,
    relations: &[Relation],
    targets: &[String],
    level: Level,
    method: Method,
) -> Result<i32> {
    let s = quote_ident(schema);
    let db = client.name().to_string();
    let unavailable = match method {
        Method::Triggers => None,
        _ => Some(decoding::unavailable(client).await?),
    };
    let decode = match (method, unavailable.flatten()) {
        (Method::Triggers, _) | (Method::Auto, Some(_)) => false,
        (_, None) => true,
        (Method::Decoding, Some(why)) => {
            return Err(Error::invalid(
                format!("database \"{db}\" cannot be captured by logical decoding: {why}"),
                "fix that, or add the sync with --capture triggers (or auto)",
            ));
        }
    };
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "create schema if not exists {s};
         create table if not exists {s}.syncs (
             id serial primary key,
             name text not null unique,
             installed_at timestamptz not null default now());
         create table if not exists {s}.relations (
             sync_id int not null references {s}.syncs(id),
             n int not null,
             schema_name text not null,
             rel_name text not null,
             delta_table text not null,
             key_columns text[] not null,
             primary key (sync_id, n));
         create table if not exists {s}.consumer (
             sync_id int not null references {s}.syncs(id),
             target text not null,
             snapshot text,
             updated_at timestamptz,
             primary key (sync_id, target));"
    ))
    .await
    .map_err(|e| {
        if e.sqlstate() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            Error::invalid(
                format!("database \"{db}\": cannot create schema {schema}: {}", e.message()),
                "pgleap needs CREATE on the source database (GRANT CREATE ON DATABASE ... TO ...)",
            )
        } else {
            e.into()
        }
    })?;
    let existing = tx
        .query_opt(
            &format!(
                "select y.installed_at::text,
                        (select max(c.updated_at) from {s}.consumer c where c.sync_id = y.id)::text,
                        coalesce((select max(c.updated_at) from {s}.consumer c
                                  where c.sync_id = y.id) > now() - interval '10 minutes', false)
                 from {s}.syncs y where y.name = $1"
            ),
            &[&sync],
        )
        .await?;
    if let Some(row) = existing {
        let (installed, applied, active): (String, Option<String>, bool) =
            (row.get(0), row.get(1), row.get(2));
        let applied = applied.map_or("never applied".into(), |t| format!("last applied {t}"));
        // Another catalog's live migration must not be torn down on a hint.
        return Err(if active {
            Error::invalid(
                format!(
                    "database \"{db}\" already has an active sync named \"{sync}\" (installed \
                     {installed}, {applied}), added by another pgleap catalog or this one"
                ),
                "give this sync another name; do not tear the other one down while it runs",
            )
        } else {
            Error::invalid(
                format!(
                    "database \"{db}\" already has capture for a sync named \"{sync}\" \
                     (installed {installed}, {applied}): leftovers of an earlier run"
                ),
                format!(
                    "if no pgleap catalog still uses it, pgleap teardown {sync} from the catalog \
                     that added it removes it; or give this sync another name"
                ),
            )
        });
    }
    let sync_id: i32 = tx
        .query_one(&format!("insert into {s}.syncs (name) values ($1) returning id"), &[&sync])
        .await?
        .get(0);
    for target in targets {
        tx.execute(
            &format!("insert into {s}.consumer (sync_id, target) values ($1, $2)"),
            &[&sync_id, target],
        )
        .await?;
    }
    let tables: Vec<&Relation> = relations.iter().filter(|r| r.kind != "sequence").collect();
    let journal = (tables.len() > JOURNAL_ABOVE).then(|| journal(schema, sync_id));
    if let Some(journal) = &journal {
        tx.batch_execute(&format!(
            "create table {journal} (_pgleap_txid int8 not null, n int not null);
             create index on {journal} using brin (_pgleap_txid);"
        ))
        .await?;
    }
    tx.commit().await?;

    let mut decoded = Vec::new();
    for (i, rel) in tables.into_iter().enumerate() {
        let n = i as i32 + 1;
        let table = Table { sync_id, n, rel, level, journal: journal.as_deref(), decode };
        match install_table(client, schema, &table).await {
            Ok(true) => decoded.push(qualified(&rel.schema, &rel.name)),
            Ok(false) => {}
            Err(e) => return Err(undo(client, schema, sync, e).await),
        }
    }
    if !decoded.is_empty()
        && let Err(e) = decoding::start(client, schema, sync_id, &decoded).await
    {
        return Err(undo(client, schema, sync, e).await);
    }
    Ok(sync_id)
}

/// Removes what a failed install made; returns its error.
async fn undo(client: &mut Conn, schema: &str, sync: &str, e: Error) -> Error {
    // Best effort: the original error is the one worth reporting.
    if let Err(cleanup) = remove(client, schema, sync, false).await {
        tracing::warn!("cleanup after failed install: {cleanup}");
    }
    e
}

/// One table to install capture on.
struct Table<'a> {
    sync_id: i32,
    n: i32,
    rel: &'a Relation,
    level: Level,
    journal: Option<&'a str>,
    /// Whether the sync decodes the tables decoding can capture.
    decode: bool,
}

/// Installs one table's capture; returns whether the sync's slot is to
/// capture it (only its delta table is made then).
async fn install_table(client: &mut Conn, schema: &str, t: &Table<'_>) -> Result<bool> {
    let Table { sync_id, n, rel, level, journal, decode } = *t;
    let s = quote_ident(schema);
    let table = qualified(&rel.schema, &rel.name);
    let delta_name = format!("d{sync_id}_{n}");
    let delta = qualified(schema, &delta_name);
    let function = qualified(schema, &format!("f{sync_id}_{n}"));
    let columns = client.query(&columns_sql(client.version()), &[&table]).await?;
    // Keys are recorded as arrays, one row per statement, where every key
    // column's type has an array type (a domain's has none before 11).
    let arrays = columns.iter().all(|r| {
        let name: String = r.get(0);
        r.get::<_, bool>(2) || !rel.key_columns.contains(&name)
    });
    let columns: Vec<(String, String)> = columns.iter().map(|r| (r.get(0), r.get(1))).collect();
    // A statement naming an inheritance parent changes its children's rows
    // too, but fires statement triggers of the parent only (with the
    // children's rows in its transition tables): each table of an
    // inheritance tree captures its own rows with row triggers, which fire
    // on the table that holds the row. So does a partition captured by
    // itself (PostgreSQL 10 sources, whose partitioned tables take no row
    // trigger). A partitioned table too: a statement may name one of its
    // partitions, which fires no statement trigger of the parent, while
    // the parent's row triggers are cloned to every partition, present and
    // future (PostgreSQL 11 and later).
    let inherited: bool = client.query_one(IN_INHERITANCE_OR_PARTITIONS, &[&table]).await?.get(0);
    let rows = inherited || level == Level::Row;
    // Row triggers a table needs (keyless, in a tree) may fire for bulk
    // statements: one entry per transaction (a bulk UPDATE +5 % against
    // +28 % for an entry per row). Row triggers asked for one-row
    // statements: an entry per row, cheaper for one row (+18 µs a TPC-B
    // transaction against +31: docs/BENCHMARKS.md).
    let once = inherited || rel.key_columns.is_empty();
    let note = journal_note(journal, sync_id, n, once);
    let capture = Capture { table: &table, delta: &delta, function: &function, sync_id, note };
    let decoded =
        decode && !inherited && decoding::decodable(client, &table, &rel.key_columns).await?;
    let keyless = rel.key_columns.is_empty();
    let mut ddl = match (keyless, rows) {
        _ if decoded && keyless => keyless_delta(&delta, &columns, true),
        _ if decoded => keyed_delta(&delta, &rel.key_columns, &columns, arrays),
        (true, _) => keyless_delta(&delta, &columns, false) + &keyless_capture(&capture, &columns),
        (false, false) => {
            keyed_delta(&delta, &rel.key_columns, &columns, arrays)
                + &keyed_capture(&capture, &rel.key_columns, &columns, arrays)
        }
        (false, true) => keyed_row_capture(&capture, &rel.key_columns, &columns),
    };
    let key_array: Vec<String> = rel.key_columns.iter().map(|k| quote_literal(k)).collect();
    ddl.push_str(&format!(
        "insert into {s}.relations (sync_id, n, schema_name, rel_name, delta_table, key_columns)
         values ({sync_id}, {n}, {}, {}, {}, array[{}]::text[]);",
        quote_literal(&rel.schema),
        quote_literal(&rel.name),
        quote_literal(&delta_name),
        key_array.join(", "),
    ));
    let what = format!("installing capture on {table}");
    with_lock_retries(client, &what, &ddl).await?;
    if rel.kind == "partitioned table" {
        let partitions = client.query_qualified(PARTITION_TREE, &[&table]).await?;
        for p in &partitions {
            capture_partition_truncates(client, schema, sync_id, p.get(0)).await?;
        }
    }
    Ok(decoded)
}

/// Captures by triggers, from now on, the tables of a sync that its slot
/// captured (those of its tables without a capture function), into
/// the deltas they have: what a sync whose slot was lost falls back to
/// (see `Session`). Statement triggers, whatever `--trigger-level` the
/// sync was added with: the deltas' shape is the statement capture's.
/// Table by table, each in its own transaction; a rerun after an
/// interruption does the tables left. Returns how many it did.
pub async fn fall_back_to_triggers(client: &mut Conn, schema: &str, sync_id: i32) -> Result<usize> {
    let s = quote_ident(schema);
    let rows = client
        .query(
            &format!(
                "select n, schema_name, rel_name, delta_table, key_columns
                 from {s}.relations
                 where sync_id = $1
                   and to_regproc(format('%I.%I', $2::text, format('f%s_%s', sync_id, n))) is null
                 order by n"
            ),
            &[&sync_id, &schema],
        )
        .await?;
    let journal = journal(schema, sync_id);
    let journal = client.relation_exists(&journal).await?.then_some(journal);
    for r in &rows {
        let (n, table_schema, name, delta, keys): (i32, String, String, String, Vec<String>) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let table = qualified(&table_schema, &name);
        let columns = client.query(&columns_sql(client.version()), &[&table]).await?;
        // As `install_table` chose when it made the delta.
        let arrays = columns.iter().all(|r| r.get::<_, bool>(2) || !keys.contains(&r.get(0)));
        let columns: Vec<(String, String)> = columns.iter().map(|r| (r.get(0), r.get(1))).collect();
        let capture = Capture {
            table: &table,
            delta: &qualified(schema, &delta),
            function: &qualified(schema, &format!("f{sync_id}_{n}")),
            sync_id,
            note: journal_note(journal.as_deref(), sync_id, n, false),
        };
        let ddl = match keys.is_empty() {
            true => keyless_capture(&capture, &columns),
            false => keyed_capture(&capture, &keys, &columns, arrays),
        };
        with_lock_retries(client, &format!("capturing {table} by triggers"), &ddl).await?;
    }
    Ok(rows.len())
}

/// What every capture function of a table is built from.
struct Capture<'a> {
    table: &'a str,
    delta: &'a str,
    function: &'a str,
    sync_id: i32,
    /// Its journal entry (empty without a journal).
    note: String,
}

/// The delta table of a keyed table: the key columns with their own types,
/// or arrays of them (`arrays`: the keys of one statement in one row).
fn keyed_delta(
    delta: &str,
    key_columns: &[String],
    columns: &[(String, String)],
    arrays: bool,
) -> String {
    let key_defs: Vec<String> = key_columns
        .iter()
        .map(|k| {
            let ty = columns.iter().find(|(n, _)| n == k).map_or("text", |(_, t)| t.as_str());
            format!("{} {ty}{}", quote_ident(k), if arrays { "[]" } else { "" })
        })
        .collect();
    format!(
        "create table {delta} (
             _pgleap_txid int8 not null,
             _pgleap_at timestamptz not null default now(),
             _pgleap_truncated bool not null default false,
             {});
         create index on {delta} using brin (_pgleap_txid);\n",
        key_defs.join(", ")
    )
}

/// Row-level capture of a keyed table (in an inheritance tree, or asked
/// for): the new key of each inserted or updated row, the old key of each
/// deleted row and of an updated row whose key changed, into the delta of
/// the table that holds it.
fn keyed_row_capture(c: &Capture, key_columns: &[String], columns: &[(String, String)]) -> String {
    let Capture { table, delta, function, sync_id, note } = c;
    let keys: Vec<String> = key_columns.iter().map(|k| quote_ident(k)).collect();
    let image =
        |rec: &str| keys.iter().map(|k| format!("{rec}.{k}")).collect::<Vec<_>>().join(", ");
    let [_, _, _, _, (row_trigger, _), (trunc_trigger, _), _, _] = trigger_names(*sync_id);
    format!(
        "{table_ddl}
         create function {function}() returns trigger
         language plpgsql security definer set search_path = pg_catalog, pg_temp as $pgleap$
         #variable_conflict use_column
         begin
             {note}
             if tg_op = 'TRUNCATE' then
                 insert into {delta} (_pgleap_txid, _pgleap_truncated) values (txid_current(), true);
                 return null;
             end if;
             if tg_op = 'DELETE'
                or (tg_op = 'UPDATE' and row({old}) is distinct from row({new})) then
                 insert into {delta} (_pgleap_txid, {list}) values (txid_current(), {old});
             end if;
             if tg_op in ('UPDATE', 'INSERT') then
                 insert into {delta} (_pgleap_txid, {list}) values (txid_current(), {new});
             end if;
             return null;
         end $pgleap$;
         create trigger {row} after insert or update or delete on {table}
             for each row execute procedure {function}();
         create trigger {trunc} after truncate on {table}
             for each statement execute procedure {function}();\n",
        table_ddl = keyed_delta(delta, key_columns, columns, false),
        list = keys.join(", "),
        old = image("old"),
        new = image("new"),
        row = quote_ident(&row_trigger),
        trunc = quote_ident(&trunc_trigger),
    )
}

/// Statement-level capture of a keyed table: the keys of the changed rows.
/// With `arrays`, one delta row holds a statement's keys as arrays (one
/// per key column), split into at most 64 rows by a hash of the key so
/// that no array nears PostgreSQL's 1 GB limit however many rows the
/// statement changed: a bulk statement writes a few rows instead of one
/// per key (measured: docs/BENCHMARKS.md).
///
/// An UPDATE's statement trigger keeps only the new rows (no old
/// transition table: a bulk UPDATE no longer stores every old row in a
/// tuplestore, measured 1.27x -> 1.16x of the UPDATE without capture).
/// The old key matters only when a key changed (then it is a delete of the
/// old key on the target): a row trigger whose WHEN compares the old and
/// new key records it. The WHEN sees the row as written, after any BEFORE
/// trigger, so a key changed by such a trigger is recorded too (which an
/// `UPDATE OF` column list would miss); a WHEN that is false queues
/// nothing. Keys compare with their type's equality, the one apply matches
/// target rows with.
fn keyed_capture(
    c: &Capture,
    key_columns: &[String],
    columns: &[(String, String)],
    arrays: bool,
) -> String {
    let Capture { table, delta, function, sync_id, note } = c;
    let key_list: String =
        key_columns.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ");
    let keys_of = |transition: &str| {
        if !arrays {
            return format!("select pgleap_txid_, {key_list} from {transition}");
        }
        let aggregates: Vec<String> =
            key_columns.iter().map(|k| format!("array_agg({})", quote_ident(k))).collect();
        format!(
            "select pgleap_txid_, {} from {transition} group by {}",
            aggregates.join(", "),
            chunk_of(key_columns, columns)
        )
    };
    let mut ddl = format!(
        "create function {function}() returns trigger
         language plpgsql security definer set search_path = pg_catalog, pg_temp as $pgleap$
         #variable_conflict use_column
         declare
             pgleap_txid_ int8 := txid_current();
         begin
             {note}
             if tg_level = 'ROW' then
                 insert into {delta} (_pgleap_txid, {key_list}) values (pgleap_txid_, {old_key});
             elsif tg_op = 'INSERT' then
                 insert into {delta} (_pgleap_txid, {key_list}) {new};
             elsif tg_op = 'UPDATE' then
                 insert into {delta} (_pgleap_txid, {key_list}) {new};
             elsif tg_op = 'DELETE' then
                 insert into {delta} (_pgleap_txid, {key_list}) {old};
             else
                 insert into {delta} (_pgleap_txid, _pgleap_truncated) values (pgleap_txid_, true);
             end if;
             return null;
         end $pgleap$;\n",
        new = keys_of("pgleap_new"),
        old = keys_of("pgleap_old"),
        old_key = key_columns
            .iter()
            .map(|k| {
                let k = quote_ident(k);
                if arrays { format!("array[old.{k}]") } else { format!("old.{k}") }
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    let row_of = |rec: &str| {
        let keys: Vec<String> =
            key_columns.iter().map(|k| format!("{rec}.{}", quote_ident(k))).collect();
        format!("row({})", keys.join(", "))
    };
    for (trigger, event) in trigger_names(*sync_id) {
        let referencing = match event {
            "insert" => "referencing new table as pgleap_new",
            "update" => "referencing new table as pgleap_new",
            "delete" => "referencing old table as pgleap_old",
            "truncate" => "",
            "key change" => {
                ddl.push_str(&format!(
                    "create trigger {} after update on {table} for each row
                     when ({} is distinct from {}) execute procedure {function}();\n",
                    quote_ident(&trigger),
                    row_of("old"),
                    row_of("new")
                ));
                continue;
            }
            _ => continue,
        };
        ddl.push_str(&format!(
            "create trigger {} after {event} on {table} {referencing}
             for each statement execute procedure {function}();\n",
            quote_ident(&trigger)
        ));
    }
    ddl
}

/// Which of (at most) 64 delta rows a key of one statement goes to: the
/// key itself modulo 64 for a single integer key (no hashing), else a hash
/// of its text form.
fn chunk_of(key_columns: &[String], columns: &[(String, String)]) -> String {
    let integer = |k: &String| {
        columns
            .iter()
            .any(|(n, t)| n == k && matches!(t.as_str(), "smallint" | "integer" | "bigint"))
    };
    match key_columns {
        [k] if integer(k) => format!("{} % 64", quote_ident(k)),
        [k] => format!("hashtext({}::text) & 63", quote_ident(k)),
        _ => {
            let keys: Vec<String> = key_columns.iter().map(|k| quote_ident(k)).collect();
            format!("hashtext(row({})::text) & 63", keys.join(", "))
        }
    }
}

/// Row-level capture of a keyless table: whole row images, in event order.
/// An UPDATE is a delete of the old image and an insert of the new one;
/// `_pgleap_seq` orders events as they happened, which for two changes to
/// the same row is their commit order (the second waited for the first).
fn keyless_capture(c: &Capture, columns: &[(String, String)]) -> String {
    let Capture { table, delta, function, sync_id, note } = c;
    // Each part starts with its comma: a table may have no copied column
    // at all (none, or only generated ones), and its rows still count.
    let names: Vec<String> = columns.iter().map(|(n, _)| quote_ident(n)).collect();
    let list: String = names.iter().map(|n| format!(", {n}")).collect();
    let image = |rec: &str| names.iter().map(|n| format!(", {rec}.{n}")).collect::<String>();
    let [_, _, _, _, (row_trigger, _), (trunc_trigger, _), _, _] = trigger_names(*sync_id);
    format!(
        "create function {function}() returns trigger
         language plpgsql security definer set search_path = pg_catalog, pg_temp as $pgleap$
         #variable_conflict use_column
         begin
             {note}
             if tg_op = 'TRUNCATE' then
                 insert into {delta} (_pgleap_txid, _pgleap_truncated, _pgleap_op)
                 values (txid_current(), true, 'T');
                 return null;
             end if;
             if tg_op in ('UPDATE', 'DELETE') then
                 insert into {delta} (_pgleap_txid, _pgleap_op{list})
                 values (txid_current(), 'D'{old});
             end if;
             if tg_op in ('UPDATE', 'INSERT') then
                 insert into {delta} (_pgleap_txid, _pgleap_op{list})
                 values (txid_current(), 'I'{new});
             end if;
             return null;
         end $pgleap$;
         create trigger {row} after insert or update or delete on {table}
             for each row execute procedure {function}();
         create trigger {trunc} after truncate on {table}
             for each statement execute procedure {function}();\n",
        old = image("old"),
        new = image("new"),
        row = quote_ident(&row_trigger),
        trunc = quote_ident(&trunc_trigger),
    )
}

/// The delta of a keyless table: its row images, in event order. Where
/// the slot captures it (`decoded`), each event also carries where it
/// came from in the WAL (its transaction's commit position and its rank
/// in the transaction), the same however often it is decoded: apply
/// replays each event once (see `TablePlan::events`).
fn keyless_delta(delta: &str, columns: &[(String, String)], decoded: bool) -> String {
    let defs: String = columns.iter().map(|(n, t)| format!(", {} {t}", quote_ident(n))).collect();
    let origin = if decoded { ", _pgleap_lsn pg_lsn, _pgleap_n int" } else { "" };
    format!(
        "create table {delta} (
             _pgleap_txid int8 not null,
             _pgleap_at timestamptz not null default now(),
             _pgleap_truncated bool not null default false,
             _pgleap_seq bigserial,
             _pgleap_op \"char\" not null{origin}{defs});
         create index on {delta} using brin (_pgleap_txid);\n"
    )
}

/// Runs DDL in a transaction under a short lock_timeout, retrying with
/// backoff while the lock is not granted.
pub(crate) async fn with_lock_retries(client: &mut Conn, what: &str, ddl: &str) -> Result<()> {
    let db = client.name().to_string();
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=LOCK_ATTEMPTS {
        let tx = client.transaction().await?;
        let result = async {
            tx.batch_execute(&format!("set local lock_timeout = '{LOCK_TIMEOUT}'")).await?;
            tx.batch_execute(ddl).await?;
            tx.commit().await
        }
        .await;
        // Taking several tables' locks in one transaction can deadlock with
        // application transactions locking them in another order; the
        // server breaks the deadlock by failing one side, and this side
        // just tries again.
        let contended = |e: &PgError| {
            e.sqlstate() == Some(&SqlState::LOCK_NOT_AVAILABLE)
                || e.sqlstate() == Some(&SqlState::T_R_DEADLOCK_DETECTED)
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if contended(&e) && attempt < LOCK_ATTEMPTS => {
                tracing::info!("{what}: lock not granted (attempt {attempt}), retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) if contended(&e) => {
                return Err(Error::invalid(
                    format!("database \"{db}\": {what}: the table stayed locked by other sessions"),
                    "retry when long transactions on the table have ended \
                     (see pg_stat_activity and pg_locks)",
                ));
            }
            Err(e) if e.sqlstate() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                return Err(Error::invalid(
                    format!("database \"{db}\": {what}: {}", e.message()),
                    "run pgleap as the owner of the tables (or a member of the owning role)",
                ));
            }
            Err(e) => return Err(e.context(what).into()),
        }
    }
    unreachable!("the last attempt returns")
}

/// Whether the database defaults to read-only transactions (a cutover's
/// `--terminate` left it so).
pub async fn read_only_default(db: &Conn) -> Result<bool> {
    Ok(db.query_one(READ_ONLY_DEFAULT, &[]).await?.get(0))
}

/// Undoes `--terminate`'s read-only default, where it is set.
pub async fn reset_read_only(db: &Conn) -> Result<()> {
    if read_only_default(db).await? {
        let name: String = db.query_one("select current_database()", &[]).await?.get(0);
        db.batch_execute(&format!(
            "alter database {} reset default_transaction_read_only",
            quote_ident(&name)
        ))
        .await?;
    }
    Ok(())
}

/// The captured tables of an installed sync, in installation order.
pub async fn captured(
    client: &Conn,
    schema: &str,
    sync: &str,
) -> Result<Option<(i32, Vec<Captured>)>> {
    let s = quote_ident(schema);
    if !client.relation_exists(&format!("{s}.syncs")).await? {
        return Ok(None);
    }
    let Some(row) =
        client.query_opt(&format!("select id from {s}.syncs where name = $1"), &[&sync]).await?
    else {
        return Ok(None);
    };
    let sync_id: i32 = row.get(0);
    let rows = client
        .query(
            &format!(
                "select r.n, r.schema_name, r.rel_name, r.delta_table, r.key_columns,
                        coalesce((select t.typcategory = 'A'
                                  from pg_attribute a join pg_type t on t.oid = a.atttypid
                                  where a.attrelid = to_regclass(format('%I.%I', $2::text,
                                                                        r.delta_table))
                                    and a.attname = r.key_columns[1]), false)
                 from {s}.relations r where r.sync_id = $1 order by r.n"
            ),
            &[&sync_id, &schema],
        )
        .await?;
    let tables = rows
        .iter()
        .map(|r| Captured {
            n: r.get(0),
            schema: r.get(1),
            name: r.get(2),
            delta: r.get(3),
            key_columns: r.get(4),
            key_arrays: r.get(5),
        })
        .collect();
    Ok(Some((sync_id, tables)))
}

/// Removes a sync's capture from its source: triggers, functions, delta
/// tables, bookkeeping rows, and the schema once no sync uses it. Objects
/// pgleap did not create are never touched.
/// With `keep_fence`, a cut-over sync's fence (its trigger on each table and
/// its function) stays: the old server goes on refusing writes.
pub async fn remove(client: &mut Conn, schema: &str, sync: &str, keep_fence: bool) -> Result<()> {
    let Some((sync_id, _)) = captured(client, schema, sync).await? else {
        return Ok(());
    };
    let fence = fence_trigger(sync_id);
    let fence_function = fence_function(sync_id);
    let s = quote_ident(schema);
    // Tables whose installation failed half-way have triggers but no
    // relations row; find every table carrying this sync's triggers (not
    // the server's clones of them on partitions).
    let trigger_tables = client
        .query(&own_triggers_sql(client.version()), &[&format!("pgleap\\_{sync_id}\\_%")])
        .await?;
    for row in &trigger_tables {
        let table = qualified(row.get(0), row.get(1));
        let triggers: Vec<String> = row.get(2);
        let mut ddl = String::new();
        for trigger in triggers {
            if keep_fence && trigger == fence {
                continue;
            }
            ddl.push_str(&format!(
                "drop trigger if exists {} on {table};\n",
                quote_ident(&trigger)
            ));
        }
        if !ddl.is_empty() {
            with_lock_retries(client, &format!("removing capture from {table}"), &ddl).await?;
        }
    }
    decoding::stop(client, schema, sync_id).await?;
    let mut ddl = String::new();
    let functions = client.query(SYNC_FUNCTIONS, &[&schema, &format!("f{sync_id}\\_%")]).await?;
    for f in &functions {
        let name: &str = f.get(0);
        if keep_fence && name == fence_function {
            continue;
        }
        ddl.push_str(&format!("drop function {}();\n", qualified(schema, name)));
    }
    let deltas = client.query(SYNC_DELTA_TABLES, &[&schema, &format!("d{sync_id}\\_%")]).await?;
    for d in &deltas {
        ddl.push_str(&format!("drop table {};\n", qualified(schema, d.get(0))));
    }
    ddl.push_str(&format!(
        "delete from {s}.relations where sync_id = {sync_id};
         delete from {s}.consumer where sync_id = {sync_id};
         delete from {s}.syncs where id = {sync_id};"
    ));
    with_lock_retries(client, "removing capture tables", &ddl).await?;
    let tables = ["decoding", "syncs", "relations", "consumer"];
    drop_schema_if_unused(client, schema, "syncs", &tables).await
}

/// Drops pgleap's bookkeeping tables and the schema once `registry` is
/// empty and the schema holds nothing else.
pub async fn drop_schema_if_unused(
    client: &Conn,
    schema: &str,
    registry: &str,
    tables: &[&str],
) -> Result<()> {
    let s = quote_ident(schema);
    let left: i64 = client
        .query_one(&format!("select count(*) from {s}.{}", quote_ident(registry)), &[])
        .await?
        .get(0);
    if left > 0 {
        return Ok(());
    }
    let list: Vec<String> = tables.iter().map(|t| format!("{s}.{}", quote_ident(t))).collect();
    client.batch_execute(&format!("drop table if exists {}", list.join(", "))).await?;
    // Refuses (and we leave it) if someone put their own objects there.
    if let Err(e) = client.batch_execute(&format!("drop schema {s}")).await {
        tracing::info!("schema {schema} kept: {}", e.message());
    }
    Ok(())
}

// The catalog queries of this module, named.

const TRIGGER_EXISTS: &str = "select exists (select 1 from pg_trigger
    where tgrelid = $1::text::regclass and tgname = $2)";

const IN_INHERITANCE_OR_PARTITIONS: &str =
    "select exists (select 1 from pg_inherits i join pg_class c on c.oid = i.inhrelid
               where (i.inhparent = $1::text::regclass
                      or i.inhrelid = $1::text::regclass)
                 and not c.relispartition)
    or (select relispartition or relkind = 'p' from pg_class
        where oid = $1::text::regclass)";

const PARTITION_TREE: &str = "with recursive tree(oid) as (
        select inhrelid from pg_inherits where inhparent = $1::text::regclass
        union
        select i.inhrelid from pg_inherits i join tree on i.inhparent = tree.oid)
    select oid::regclass::text from tree";

const READ_ONLY_DEFAULT: &str = "select exists (select 1 from pg_db_role_setting s
    join pg_database d on d.oid = s.setdatabase
    where d.datname = current_database() and s.setrole = 0
      and 'default_transaction_read_only=on' = any(s.setconfig))";

const SYNC_FUNCTIONS: &str =
    "select p.proname::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace
    where n.nspname = $1 and p.proname like $2";

const SYNC_DELTA_TABLES: &str =
    "select c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where n.nspname = $1 and c.relkind = 'r' and c.relname like $2";

/// A table's ($1) copied columns: name, type, whether the type has an
/// array type.
fn columns_sql(v: PgVersion) -> String {
    format!(
        "select a.attname::text, format_type(a.atttypid, a.atttypmod), t.typarray <> 0
         from pg_attribute a join pg_type t on t.oid = a.atttypid
         where a.attrelid = $1::text::regclass and a.attnum > 0 and not a.attisdropped
           {}
         order by a.attnum",
        crate::pg::not_generated(v)
    )
}

/// The triggers named like $1, by table, that each table owns: a trigger
/// on a partitioned table is cloned to its partitions by the server
/// (marked by tgparentid from 13, internal before); the clones go with it
/// and cannot be dropped alone.
fn own_triggers_sql(v: PgVersion) -> String {
    let own = if v.has_tgparentid() { "t.tgparentid = 0" } else { "not t.tgisinternal" };
    format!(
        "select n.nspname::text, c.relname::text, array_agg(t.tgname::text order by t.tgname)
         from pg_trigger t join pg_class c on c.oid = t.tgrelid
         join pg_namespace n on n.oid = c.relnamespace
         where t.tgname like $1 and {own}
         group by 1, 2"
    )
}

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries(v: PgVersion) -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("capture: a table's columns", columns_sql(v)),
        NamedQuery::new("capture: a sync's triggers", own_triggers_sql(v)),
        NamedQuery::new("capture: partition TRUNCATE trigger exists", TRIGGER_EXISTS),
        NamedQuery::new("capture: inheritance or partitioning", IN_INHERITANCE_OR_PARTITIONS),
        NamedQuery::new("capture: partitions of a table", PARTITION_TREE),
        NamedQuery::new("capture: read-only default", READ_ONLY_DEFAULT),
        NamedQuery::new("capture: a sync's functions", SYNC_FUNCTIONS),
        NamedQuery::new("capture: a sync's delta tables", SYNC_DELTA_TABLES),
    ]
}
