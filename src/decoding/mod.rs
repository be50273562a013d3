//! Capture by logical decoding, where the source allows it: the keys of
//! changed rows read from a logical replication slot instead of triggers,
//! so the application's transactions pay nothing for capture.
//!
//! The deltas stay what they are (see `capture`): pgleap writes them
//! itself, from the slot (a "pump"), and everything downstream — batches
//! bounded by snapshots, the fence, verify, rollback, schema changes
//! pausing the sync — reads them as it reads the triggers'. A delta row
//! written by a pump carries the id of the transaction it decoded, so a
//! batch's snapshot judges it as it judges that transaction, as it judges
//! a trigger's row written inside it. What a trigger gives for free — the
//! row is visible exactly when its transaction is — the batch gets by
//! pumping inside its own source transaction, first (see [`pump`]): every
//! transaction its snapshot sees is then in the deltas it sees.
//!
//! - Slot and publication: one each per sync (`pgleap_<database oid>_<schema
//!   oid>_<sync id>`, unique on the server), pgoutput, created when the
//!   sync is added, after its delta tables and before any initial copy;
//!   dropped by teardown (the daemon need not run) and past a cutover's
//!   switch point.
//! - Which tables: keyed ones outside inheritance trees whose key is their
//!   replica identity (the primary key by default, or REPLICA IDENTITY
//!   FULL): those whose old key a delete or a key change carries. Other
//!   tables of the same sync keep triggers.
//! - The slot advances only after the transaction that wrote a pump's
//!   keys committed: a crash in between decodes those transactions again,
//!   which only writes their keys twice (harmless). Pumps of one sync take
//!   turns under an advisory lock (see [`unlock`]).
//! - Read through the SQL functions (`pg_logical_slot_peek_binary_changes`);
//!   with `PGLEAP_DECODING_STREAM=1`, the daemon on PostgreSQL 14 and
//!   later keeps a replication connection open from one pump to the next
//!   instead (see [`feed`]).
//! - A slot that is gone (dropped, or lost with a failover before
//!   PostgreSQL 17's failover slots) or invalidated (past
//!   `max_slot_wal_keep_size`) is an error of its own (`Error::SlotLost`):
//!   changes since its last pump cannot be read any more. The sync's next
//!   batch falls back, loudly: triggers capture its tables from then on
//!   and the target is copied again (`Session::fall_back`).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

mod feed;

pub use feed::Feed;

use crate::error::{Error, Result};
use crate::pg::{Conn, NamedQuery, Sql, Tx, array_literal, copy_field, quote_ident};

/// How `sync add` captures a sync's keyed tables (`--capture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Decoding where the source allows it, else triggers.
    Auto,
    Triggers,
    /// Decoding, or a refusal that says what is missing.
    Decoding,
}

/// A sync's slot, and the tables it decodes.
#[derive(Debug, Clone)]
pub struct Stream {
    /// The sync's name, for messages.
    sync: String,
    /// The slot's name, which is also the publication's.
    pub slot: String,
    /// Where the sync records it (`<schema>.decoding`).
    registry: String,
    /// Per decoded table's oid on the source: its index in the plan.
    pub tables: HashMap<u32, usize>,
}

/// A sync's slot as status shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotState {
    pub slot: String,
    /// How many of the sync's tables it decodes.
    pub tables: usize,
    /// The WAL the slot keeps on the source (from its restart point), in
    /// bytes; 0 for a slot that is gone.
    pub retained_bytes: i64,
    /// `pg_replication_slots.wal_status` (13 and later): reserved,
    /// extended, unreserved, lost; or "gone".
    pub wal_status: Option<String>,
}

/// The state of a sync's slot on its source.
pub async fn slot_state(src: &Conn, stream: &Stream) -> Result<SlotState> {
    let status = if src.version().major() >= 13 { "wal_status::text" } else { "null::text" };
    let row = src
        .query_opt(
            &format!(
                "select coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8,
                        {status}
                 from pg_replication_slots where slot_name = $1"
            ),
            &[&stream.slot],
        )
        .await?;
    let (retained_bytes, wal_status) = match row {
        Some(r) => (r.get(0), r.get(1)),
        None => (0, Some("gone".to_string())),
    };
    Ok(SlotState {
        slot: stream.slot.clone(),
        tables: stream.tables.len(),
        retained_bytes,
        wal_status,
    })
}

/// Why the source cannot capture by decoding, if it cannot.
pub async fn unavailable(src: &Conn) -> Result<Option<String>> {
    if src.version().major() < 11 {
        return Ok(Some(format!(
            "PostgreSQL {} cannot advance a replication slot by SQL (11 and later can)",
            src.version()
        )));
    }
    let row = src.query_one(AVAILABLE, &[]).await?;
    let (wal_level, role, allowed, free, encoding): (String, String, bool, i64, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    Ok(if wal_level != "logical" {
        Some(format!(
            "wal_level is {wal_level} (logical decoding needs wal_level = logical, which takes \
             a restart)"
        ))
    } else if !allowed {
        Some(format!(
            "role {role} may not use replication slots (ALTER ROLE {} REPLICATION as a \
             superuser; on RDS, GRANT rds_replication TO {})",
            quote_ident(&role),
            quote_ident(&role)
        ))
    } else if free < 1 {
        Some("every replication slot is taken (max_replication_slots)".into())
    } else if encoding != "UTF8" {
        Some(format!("the database's encoding is {encoding} (decoding reads UTF8 only)"))
    } else {
        None
    })
}

/// What preflight says of capture under `method`: how keyed tables will
/// be captured; and, for `--capture decoding` where the source does not
/// allow it, why.
pub async fn preflight(src: &Conn, method: Method) -> Result<(String, Option<String>)> {
    let why = unavailable(src).await?;
    Ok(match (method, why) {
        (Method::Triggers, _) => ("triggers (--capture triggers)".into(), None),
        (Method::Auto, Some(why)) => {
            (format!("triggers (logical decoding is not available: {why})"), None)
        }
        (Method::Decoding, Some(why)) => (format!("logical decoding, refused: {why}"), Some(why)),
        (_, None) => {
            let unlimited: bool = src.query_one(UNLIMITED_SLOT_WAL, &[]).await?.get(0);
            let warning = if unlimited {
                "; warning: max_slot_wal_keep_size is unlimited, so a slot that no daemon reads \
                 keeps the source's WAL until its disk fills (set it, and watch the slot's \
                 retained WAL in pgleap status)"
            } else {
                ""
            };
            let text = format!(
                "logical decoding of keyed tables (a replication slot: the application's \
                 transactions pay nothing), and of tables without a key whose REPLICA IDENTITY \
                 is FULL (ALTER TABLE ... REPLICA IDENTITY FULL, which their owner may set: \
                 their updates and deletes then log whole old rows); other tables without a \
                 key keep triggers{warning}"
            );
            (text, None)
        }
    })
}

/// Whether decoding can capture `table` (quoted, qualified) keyed by
/// `key_columns` (outside inheritance trees): its key its replica
/// identity; a keyless table, with REPLICA IDENTITY FULL (whole rows).
pub async fn decodable(src: &Conn, table: &str, key_columns: &[String]) -> Result<bool> {
    let row = src.query_one(REPLICA_IDENTITY, &[&table]).await?;
    let (full, mut identity): (bool, Vec<String>) = (row.get(0), row.get(1));
    if key_columns.is_empty() {
        return Ok(full);
    }
    let mut keys = key_columns.to_vec();
    keys.sort();
    identity.sort();
    Ok(full || identity == keys)
}

/// The name of a sync's slot and publication.
async fn name(src: &impl Sql, schema: &str, sync_id: i32) -> Result<String> {
    Ok(src.query_one(NAME, &[&schema, &sync_id]).await?.get(0))
}

/// Starts decoding for `tables` (quoted, qualified) of an installed sync:
/// its publication, then its slot, from which on every commit is decoded.
/// On error, `capture::remove` removes what was made.
pub async fn start(client: &mut Conn, schema: &str, sync_id: i32, tables: &[String]) -> Result<()> {
    let s = quote_ident(schema);
    let slot = name(client, schema, sync_id).await?;
    let publication = quote_ident(&slot);
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "create table if not exists {s}.decoding (
             sync_id int primary key references {s}.syncs(id),
             slot text not null);
         insert into {s}.decoding (sync_id, slot) values ({sync_id}, {});
         create publication {publication};",
        crate::pg::quote_literal(&slot)
    ))
    .await?;
    tx.commit().await?;
    // By slices, each in its own transaction: adding a table locks it,
    // and waits for whoever holds it (bounded, as installing triggers is).
    for chunk in tables.chunks(client.tables_per_statement()) {
        let ddl = format!("alter publication {publication} add table {}", chunk.join(", "));
        let what = format!("adding {} to the publication {slot}", chunk.join(", "));
        crate::capture::with_lock_retries(client, &what, &ddl).await?;
    }
    // Waits for the transactions running now to end: every transaction
    // that commits after it is decoded. Bounded: one left open (a session
    // idle in transaction) would hold `sync add` without a word.
    let wait = slot_wait();
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("set local statement_timeout = '{}s'", wait.as_secs())).await?;
    if let Err(e) = tx.execute(CREATE_SLOT, &[&slot]).await {
        if e.sqlstate() != Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) {
            return Err(e.into());
        }
        drop(tx);
        let oldest = client.query_opt(OLDEST_TRANSACTION, &[]).await?;
        let oldest: Option<String> = oldest.map(|r| r.get(0));
        return Err(Error::invalid(
            format!(
                "creating the replication slot waited {} s for the transactions running on the \
                 source to end{}",
                wait.as_secs(),
                oldest.map_or(String::new(), |o| format!(" (the oldest: {o})"))
            ),
            "end that transaction, or add the sync again later, or with --capture triggers",
        ));
    }
    tx.commit().await?;
    tracing::info!(slot, tables = tables.len(), "capturing by logical decoding");
    Ok(())
}

/// How long creating a slot may wait for the source's running
/// transactions: a minute, or `PGLEAP_SLOT_WAIT` seconds.
fn slot_wait() -> std::time::Duration {
    let seconds = std::env::var("PGLEAP_SLOT_WAIT").ok().and_then(|s| s.parse().ok());
    std::time::Duration::from_secs(seconds.unwrap_or(60).max(1))
}

/// Drops a sync's slot and publication, if it has them, once no pump runs.
/// The slot goes even with no daemon running.
pub async fn stop(client: &Conn, schema: &str, sync_id: i32) -> Result<()> {
    let s = quote_ident(schema);
    if !client.relation_exists(&format!("{s}.decoding")).await? {
        return Ok(());
    }
    let row = client
        .query_opt(&format!("select slot from {s}.decoding where sync_id = $1"), &[&sync_id])
        .await?;
    let Some(row) = row else { return Ok(()) };
    let slot: String = row.get(0);
    // One transaction, after the pumps: one running (the daemon's, while
    // a cutover passes its switch point) keeps the slot active, and
    // dropping it then fails. Pumps hold their lock until they let go of
    // the slot (a minute at most); a daemon's stream holds it between
    // pumps too, and is ended.
    client
        .batch_execute(&format!(
            "begin;
             select set_config('lock_timeout', '60s', true);
             select pg_advisory_xact_lock({PUMP_LOCK_CLASS}, {sync_id});"
        ))
        .await?;
    let dropped = async {
        take(client, &slot).await?;
        client
            .batch_execute(&format!(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots
                     where slot_name = {literal} and database = current_database();
                 drop publication if exists {publication};
                 delete from {s}.decoding where sync_id = {sync_id};
                 commit;",
                literal = crate::pg::quote_literal(&slot),
                publication = quote_ident(&slot)
            ))
            .await?;
        Ok(())
    }
    .await;
    if dropped.is_err() {
        let _ = client.batch_execute("rollback").await;
    }
    dropped
}

/// The slot of an installed sync and the tables it decodes (`tables`: the
/// plan's, quoted and qualified, in order), if the sync decodes.
pub async fn load(
    src: &Conn,
    schema: &str,
    sync: &str,
    sync_id: i32,
    tables: &[String],
) -> Result<Option<Stream>> {
    let s = quote_ident(schema);
    if !src.relation_exists(&format!("{s}.decoding")).await? {
        return Ok(None);
    }
    let row = src
        .query_opt(&format!("select slot from {s}.decoding where sync_id = $1"), &[&sync_id])
        .await?;
    let Some(row) = row else { return Ok(None) };
    let slot: String = row.get(0);
    let rows = src.query(DECODED_TABLES, &[&slot, &tables]).await?;
    let tables = rows.iter().map(|r| (r.get::<_, i64>(0) as u32, r.get::<_, i64>(1) as usize - 1));
    let registry = format!("{s}.decoding");
    Ok(Some(Stream { sync: sync.to_string(), slot, registry, tables: tables.collect() }))
}

/// Where a pump's keys go, per decoded table.
pub struct Sink<'a> {
    /// The table, as messages name it.
    pub table: &'a str,
    pub delta: &'a str,
    /// The key columns, unquoted, as the delta names them; none for a
    /// keyless table, whose delta takes whole rows (see [`Event`]).
    pub keys: &'a [String],
    /// Whether the delta holds keys as arrays.
    pub arrays: bool,
    /// The table's journal and its number there, if the sync keeps one.
    pub journal: Option<(&'a str, i32)>,
}

/// Messages read from the slot per round trip: pgoutput sends a row's
/// every column, so this bounds pgleap's memory to this many rows.
const FETCH: i32 = 1000;
/// Keys or rows held before they are written to the deltas, and the
/// bytes of rows.
const FLUSH_KEYS: usize = 10_000;
const FLUSH_BYTES: usize = 8 << 20;

/// Writes into the deltas, inside `tx`, every change the slot decoded
/// since it last advanced; returns the position to advance it to once
/// `tx` has committed ([`advance`]): at least the WAL position read after
/// its snapshot, whether or not a change came (`None` once the sync's slot
/// went with its cutover). `sinks` is
/// indexed like the plan's tables (`None`: not decoded).
///
/// `tx` must be a REPEATABLE READ transaction that may write, and this
/// its first statement: then every transaction its snapshot sees is in
/// the deltas it sees. A transaction visible in the snapshot wrote its
/// commit record before the snapshot was taken, so before the WAL
/// position read next; logical decoding reads only WAL flushed to disk,
/// so the pump waits until the source has flushed that far (at once
/// under synchronous_commit; within wal_writer_delay under asynchronous
/// commit) and then decodes up to that position. Each delta row carries
/// the decoded transaction's own id, so a batch's snapshot judges it as it
/// judges that transaction (applied once visible in a batch's snapshot),
/// exactly as a trigger's row written inside the transaction.
///
/// With `feed` (the daemon's, opt-in: see [`Feed::shared`]) the pump reads
/// the slot's stream instead, up to a mark committed after the snapshot
/// (see [`feed`]).
pub async fn pump<'a>(
    tx: &Tx<'_>,
    sync_id: i32,
    stream: &'a Stream,
    sinks: &'a [Option<Sink<'a>>],
    feed: Option<&Feed>,
) -> Result<Option<String>> {
    // A sync whose slot went with its cutover has nothing to read.
    let registered =
        format!("select exists (select 1 from {} where sync_id = $1)", stream.registry);
    if !tx.query_one(&registered, &[&sync_id]).await?.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = tx.query_one(POSITION, &[]).await?;
    let (written_to, own): (String, i64) = (row.get(0), row.get(1));
    let mut decoder = Decoder {
        stream,
        sinks,
        own,
        txid: 0,
        lsn: 0,
        rank: 0,
        relations: HashMap::new(),
        pending: HashMap::new(),
        events: HashMap::new(),
        held: 0,
        held_bytes: 0,
        written: HashSet::new(),
        limit: tx.tables_per_transaction(),
        flushing: std::time::Duration::ZERO,
    };
    if let Some(feed) = feed {
        let at = std::time::Instant::now();
        if let Some(to) = feed.read(tx, &written_to, &mut decoder).await? {
            decoder.flush(tx).await?;
            // As below; reading includes committing the mark.
            let written = decoder.flushing;
            tracing::debug!(
                slot = stream.slot,
                streamed = true,
                read_ms = at.elapsed().saturating_sub(written).as_millis() as u64,
                write_ms = written.as_millis() as u64,
                "pumped"
            );
            crate::failpoint::hit("decoding-pumped");
            return Ok(Some(to));
        }
    }
    take(tx, &stream.slot).await?;
    let started = std::time::Instant::now();
    wait_for_flush(tx, &written_to).await?;
    let flushed = started.elapsed();
    // Up to `written_to`, not the flushed end: past it the last record
    // may not be flushed whole, and the server would wait for the WAL
    // writer to read it (up to `wal_writer_delay` under asynchronous
    // commit, 200 ms of every pump in the tax bench), for transactions
    // this snapshot does not see.
    let upto = Some(written_to.as_str());
    let portal =
        tx.bind(PEEK, &[&stream.slot, &stream.slot, &upto]).await.map_err(|e| lost(e, stream))?;
    let mut last = None;
    // Where a pump's time goes (debug): waiting for the WAL flush, reading
    // the slot (the server decodes), writing the deltas.
    let (mut read, mut messages) = (std::time::Duration::ZERO, 0);
    loop {
        let at = std::time::Instant::now();
        let rows = tx.fetch(&portal, FETCH).await.map_err(|e| lost(e, stream))?;
        messages += rows.len();
        for r in &rows {
            let data: &[u8] = r.get(1);
            if decoder.message(data)? {
                last = Some(r.get::<_, String>(0));
            }
        }
        read += at.elapsed();
        decoder.flush_if_full(tx).await?;
        if rows.len() < FETCH as usize {
            break;
        }
    }
    decoder.flush(tx).await?;
    // The peek read to `written_to`: every transaction that committed
    // before it is in this pump's deltas, even when none had a change to
    // send. Confirming only the last commit read would leave the slot
    // where it was while the sync's tables are idle and the rest of the
    // server is not (other databases, other tables: pgoutput sends nothing
    // for them from 15 on), keeping all that WAL.
    let last = Some(match last {
        Some(last) => later(&last, &written_to).to_string(),
        None => written_to,
    });
    tracing::debug!(
        slot = stream.slot,
        messages,
        flush_wait_ms = flushed.as_millis() as u64,
        read_ms = read.as_millis() as u64,
        write_ms = decoder.flushing.as_millis() as u64,
        "pumped"
    );
    crate::failpoint::hit("decoding-pumped");
    Ok(last)
}

/// What the slot holds that no pump has read yet, as status shows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unread {
    /// Rows changed (an INSERT, UPDATE or DELETE each; a TRUNCATE one per
    /// table) in the first [`UNREAD_LIMIT`] messages: a floor past them.
    pub changes: i64,
    /// Seconds since the oldest of their transactions committed.
    pub oldest: f64,
}

/// Counts the changes in the sync's slot that no pump has written to the
/// deltas yet: where no daemon runs, or its sync waits for a kick, they
/// stay in the slot, and a pending count of the deltas alone would say
/// the target is level while it is not. Reads without consuming
/// (`peek`), at most [`UNREAD_LIMIT`] messages. `None` while a pump runs
/// (it holds the pump lock; what it read is in the deltas when it ends,
/// and counting both would count it twice) or once the slot is gone.
pub async fn unread(src: &mut Conn, stream: &Stream, sync_id: i32) -> Result<Option<Unread>> {
    let locked = "select pg_try_advisory_lock($1, $2)";
    if !src.query_one(locked, &[&PUMP_LOCK_CLASS, &sync_id]).await?.get::<_, bool>(0) {
        return Ok(None);
    }
    let counted = async {
        let tx = src.transaction().await?;
        // A daemon streams the slot (see [`feed`]): it pumps at every poll,
        // and its stream is not ended for a status.
        let held = tx.query_opt(HOLDER, &[&stream.slot]).await?;
        if held.is_some_and(|r| r.get::<_, Option<i32>>(0).is_some()) {
            return Ok(None);
        }
        let portal = match tx.bind(PEEK, &[&stream.slot, &stream.slot, &None::<&str>]).await {
            Ok(p) => p,
            Err(e) if e.sqlstate() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => {
                return Ok(None);
            }
            Err(e) => return Err(Error::from(e)),
        };
        let (mut out, mut read, mut begun) = (Unread::default(), 0, None);
        let mut oldest: Option<u64> = None;
        loop {
            let rows = tx.fetch(&portal, FETCH).await?;
            for r in &rows {
                let data: &[u8] = r.get(1);
                let mut m = Reader { b: data, at: 0 };
                match m.u8()? {
                    b'B' => {
                        let _final_lsn = m.u64()?;
                        begun = Some(m.u64()?);
                    }
                    b'I' | b'U' | b'D' => out.changes += 1,
                    b'T' => out.changes += i64::from(m.u32()?),
                    _ => {}
                }
                if out.changes > 0 && oldest.is_none() {
                    oldest = begun;
                }
            }
            read += rows.len();
            if rows.len() < FETCH as usize || read >= UNREAD_LIMIT {
                break;
            }
        }
        // pgoutput dates a commit in microseconds since 2000-01-01.
        if let Some(at) = oldest {
            let sql = "select extract(epoch from clock_timestamp())::float8 - 946684800";
            let now: f64 = tx.query_one(sql, &[]).await?.get(0);
            out.oldest = (now - at as f64 / 1e6).max(0.0);
        }
        tx.rollback().await?;
        Ok(Some(out))
    }
    .await;
    let unlocked = "select pg_advisory_unlock($1, $2)";
    src.execute(unlocked, &[&PUMP_LOCK_CLASS, &sync_id]).await?;
    counted
}

/// Messages [`unread`] reads at most: a status answers in seconds.
const UNREAD_LIMIT: usize = 200_000;

/// Waits until the source has flushed its WAL to `position`.
async fn wait_for_flush(tx: &Tx<'_>, position: &str) -> Result<()> {
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(1);
    while !tx.query_one(FLUSHED, &[&position]).await?.get::<_, bool>(0) {
        if started.elapsed() > FLUSH_WAIT {
            return Err(Error::invalid(
                format!(
                    "the source has not flushed its WAL to {position} in {} s: logical decoding \
                     cannot read past what is flushed",
                    FLUSH_WAIT.as_secs()
                ),
                "check the source's disk and its WAL writer; capture by triggers does not wait",
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(20));
    }
    Ok(())
}

/// How long a pump waits for the source to flush its WAL.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Takes the sync's pump lock on `src`, before the pump's transaction
/// begins: see [`unlock`].
pub async fn lock(src: &Conn, sync_id: i32) -> Result<()> {
    src.execute("select pg_advisory_lock($1, $2)", &[&PUMP_LOCK_CLASS, &sync_id]).await?;
    Ok(())
}

/// Moves the slot past what a committed pump read, if `to`, then releases
/// the pump lock.
///
/// Pumps of one sync take turns, each holding the lock from before its
/// snapshot is taken until after it advanced the slot. Otherwise a pump
/// whose snapshot was taken before another's deltas committed, and whose
/// peek came after that other advanced the slot, would read neither
/// those deltas nor the transactions behind them, and its batch would
/// record them as applied: lost. A pump that lets go of the lock before
/// its transaction commits (verify, which keeps its snapshot through the
/// compare) must not advance; the next pump decodes the same transactions
/// again, which only writes their keys twice. A crash between commit and
/// advance does the same. An error leaves the lock with the session,
/// which pgleap's sessions then replace.
pub async fn unlock(src: &impl Sql, stream: &Stream, sync_id: i32, to: Option<&str>) -> Result<()> {
    if let Some(to) = to {
        advance(src, stream, to).await?;
    }
    src.execute("select pg_advisory_unlock($1, $2)", &[&PUMP_LOCK_CLASS, &sync_id]).await?;
    Ok(())
}

/// Moves the slot past `to`, what committed pumps read, keeping the pump
/// lock (see [`unlock`]).
pub async fn advance(src: &impl Sql, stream: &Stream, to: &str) -> Result<()> {
    crate::failpoint::hit("decoding-committed");
    src.execute(ADVANCE, &[&stream.slot, &to]).await?;
    Ok(())
}

/// The earlier of two WAL positions (`X/Y`), as text.
pub fn earlier<'a>(a: &'a str, b: &'a str) -> &'a str {
    if position(b) < position(a) { b } else { a }
}

/// The later of two WAL positions (`X/Y`), as text.
fn later<'a>(a: &'a str, b: &'a str) -> &'a str {
    if position(b) > position(a) { b } else { a }
}

/// A WAL position (`X/Y`) as a number: as text, `0/9` sorts after `0/10`.
fn position(lsn: &str) -> u64 {
    pgwire_replication::Lsn::parse(lsn).map_or(0, |l| l.as_u64())
}

/// Gets the slot's restart point moved up when the next pump would decode
/// much from it: called before a pump's snapshot, holding the pump lock.
///
/// Every pump through the SQL functions decodes from the slot's restart
/// point, not from where the last pump stopped: they build a new decoding
/// context at each call. The server moves that point only when decoding
/// passes a record of the transactions running on it, which it writes
/// about every 15 s when idle of them; under load each pump then re-reads
/// 15-30 s of WAL, and after a large transaction every pump decodes all
/// of it again. Creating a logical slot writes such a record (any role
/// that may use slots may do it, where `pg_log_standby_snapshot()` needs a
/// superuser), so pgleap creates a temporary one and drops it, at most
/// once a second: the pump about to run decodes past the record, and its
/// advance moves the restart point there. Written before the pump (it
/// used to follow the advance), so that the one pump of a kick or a
/// verify leaves the point moved, not the daemon's next pump to decode
/// again what the kick read (4.8 s after a bulk UPDATE of a million rows
/// in the tax bench). Best effort: without a free slot, or with a
/// transaction that the new slot would wait for (cut short, after the
/// record was written), the sync only lags as before. At most once a
/// second per source database (the look as well as the nudge): the record
/// serves every slot on its server, and a daemon's syncs from other
/// sources are not held back by this one's nudge.
pub async fn nudge(src: &impl Sql, stream: &Stream) {
    static LAST: std::sync::Mutex<Option<HashMap<String, std::time::Instant>>> =
        std::sync::Mutex::new(None);
    // Looked at once a second, not at every pump: the daemon pumps up to
    // ten times a second, and the query is on its path.
    {
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        let last = last.get_or_insert_with(HashMap::new);
        if last.get(src.db()).is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1)) {
            return;
        }
        last.insert(src.db().to_string(), std::time::Instant::now());
    }
    let behind: i64 = match src.query_opt(RESTART_BEHIND, &[&stream.slot]).await {
        Ok(Some(row)) => row.get(0),
        _ => return,
    };
    if behind < NUDGE_BYTES {
        return;
    }
    let nudge = format!("{}_nudge", stream.slot);
    // One statement: a timeout cancels the creation, not the record it
    // wrote first; the temporary slot goes with the error.
    let sql = format!(
        "set statement_timeout = '100ms';
         select pg_create_logical_replication_slot({n}, 'pgoutput', true);
         select pg_drop_replication_slot({n});
         reset statement_timeout;",
        n = crate::pg::quote_literal(&nudge)
    );
    if let Err(e) = src.batch_execute(&sql).await {
        tracing::debug!(slot = stream.slot, error = %e, "restart point not nudged");
        let _ = src.batch_execute("reset statement_timeout").await;
    }
}

/// How far (bytes of WAL) a slot's restart point may lag behind the WAL
/// written before pgleap nudges it ([`nudge`]).
const NUDGE_BYTES: i64 = 1 << 20;

/// Takes the slot from a daemon's stream (see [`feed`]) for the SQL
/// functions, which refuse a slot another session holds: ends that
/// walsender and waits until it let go. The caller holds the pump lock,
/// so the stream cannot open again meanwhile; the daemon's next pump opens
/// it again from what was confirmed.
pub async fn take(src: &impl Sql, slot: &str) -> Result<()> {
    let Some(row) = src.query_opt(HOLDER, &[&slot]).await? else {
        return Ok(());
    };
    let Some(pid) = row.get::<_, Option<i32>>(0) else {
        return Ok(());
    };
    tracing::debug!(slot, pid, "taking the slot from its stream");
    src.query_one("select pg_terminate_backend($1)", &[&pid]).await?;
    let started = std::time::Instant::now();
    loop {
        let holder = src.query_opt(HOLDER, &[&slot]).await?;
        if holder.is_none_or(|r| r.get::<_, Option<i32>>(0).is_none()) {
            return Ok(());
        }
        if started.elapsed() > FLUSH_WAIT {
            return Err(Error::invalid(
                format!(
                    "the replication slot {slot} is still held by process {pid} {} s after it \
                     was asked to end",
                    FLUSH_WAIT.as_secs()
                ),
                "look at that process in pg_stat_activity and end it (pg_terminate_backend)",
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Lets go of the sync's pump lock on `src` as many times as it holds it
/// (a failed pump leaves it with the session): for a session that goes
/// on without its slot.
pub async fn release(src: &Conn, sync_id: i32) -> Result<()> {
    let unlock = "select pg_advisory_unlock($1, $2)";
    while src.query_one(unlock, &[&PUMP_LOCK_CLASS, &sync_id]).await?.get::<_, bool>(0) {}
    Ok(())
}

/// Advisory lock class of a sync's pumps on the source ("pgld").
const PUMP_LOCK_CLASS: i32 = 0x70676c64;

/// A slot that cannot be read any more, said so.
fn lost(e: crate::pg::PgError, stream: &Stream) -> Error {
    use tokio_postgres::error::SqlState;
    let gone = e.sqlstate() == Some(&SqlState::UNDEFINED_OBJECT);
    let invalid = e.message().contains("can no longer get changes");
    if !gone && !invalid {
        return e.into();
    }
    Error::SlotLost {
        sync: stream.sync.clone(),
        slot: stream.slot.clone(),
        why: if gone { "is gone".into() } else { format!("was invalidated ({})", e.message()) },
    }
}

/// Keys decoded and not yet written, per table index.
#[derive(Default)]
struct Pending {
    keys: Vec<Vec<String>>,
    truncated: bool,
}

/// A change to a keyless table, as its delta holds it (see
/// `capture::keyless_delta`): the row inserted or deleted (an UPDATE is
/// both), or a TRUNCATE; with where it came from, so that apply replays
/// it once however often it was decoded.
struct Event {
    txid: i64,
    /// b'I', b'D' or b'T'.
    op: u8,
    /// Its transaction's commit position, and its rank there.
    lsn: u64,
    rank: i32,
    /// The row's columns as its relation message named them, and values.
    names: Arc<Vec<String>>,
    values: Vec<Option<String>>,
}

struct Decoder<'a> {
    stream: &'a Stream,
    sinks: &'a [Option<Sink<'a>>],
    /// The pump's snapshot's next transaction id (64 bits), which dates
    /// the 32-bit ids decoding gives.
    own: i64,
    /// The transaction being read (since its BEGIN): its id, its commit
    /// position, and how many row events it gave so far.
    txid: i64,
    lsn: u64,
    rank: i32,
    /// Per relation oid, its columns' names as the last Relation message
    /// gave them.
    relations: HashMap<u32, Arc<Vec<String>>>,
    /// Per table index and transaction.
    pending: HashMap<(usize, i64), Pending>,
    /// Per keyless table index, in the order they happened.
    events: HashMap<usize, Vec<Event>>,
    held: usize,
    held_bytes: usize,
    /// The tables whose deltas this pump wrote, and how many it may write
    /// in its one transaction (see [`crate::pg::Sql::tables_per_transaction`]).
    written: HashSet<usize>,
    limit: usize,
    /// How long writing the deltas took (logged at debug).
    flushing: std::time::Duration,
}

/// A row as pgoutput sent it, and which kind ('K': key only, 'O': whole).
type OldRow = (u8, Vec<Column>);

impl Decoder<'_> {
    /// A transaction begins: `final_lsn` its commit's position, `xid` its
    /// 32-bit id.
    fn begin(&mut self, final_lsn: u64, xid: u32) {
        self.txid = full_txid(xid, self.own);
        (self.lsn, self.rank) = (final_lsn, 0);
    }

    /// Takes one pgoutput message; returns whether it was a COMMIT.
    fn message(&mut self, data: &[u8]) -> Result<bool> {
        let mut r = Reader { b: data, at: 0 };
        match r.u8()? {
            b'B' => {
                let (final_lsn, _committed_at) = (r.u64()?, r.u64()?);
                self.begin(final_lsn, r.u32()?);
            }
            b'C' => return Ok(true),
            b'R' => {
                let relid = r.u32()?;
                let (_namespace, _name) = (r.string()?, r.string()?);
                let _identity = r.u8()?;
                let n = r.u16()?;
                let mut names = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let (_flags, name) = (r.u8()?, r.string()?);
                    let (_type, _typmod) = (r.u32()?, r.u32()?);
                    names.push(name);
                }
                self.relations.insert(relid, Arc::new(names));
            }
            b'I' => {
                let relid = r.u32()?;
                r.expect(b'N')?;
                let new = r.tuple()?;
                self.change(relid, b'I', None, Some(new))?;
            }
            b'U' => {
                let relid = r.u32()?;
                let mut kind = r.u8()?;
                let mut old = None;
                if kind == b'K' || kind == b'O' {
                    old = Some((kind, r.tuple()?));
                    kind = r.u8()?;
                }
                if kind != b'N' {
                    return Err(malformed("an UPDATE without its new row"));
                }
                let new = r.tuple()?;
                self.change(relid, b'U', old, Some(new))?;
            }
            b'D' => {
                let relid = r.u32()?;
                let kind = r.u8()?;
                let old = r.tuple()?;
                self.change(relid, b'D', Some((kind, old)), None)?;
            }
            b'T' => {
                let n = r.u32()?;
                let _options = r.u8()?;
                for _ in 0..n {
                    let relid = r.u32()?;
                    let Some(&i) = self.stream.tables.get(&relid) else { continue };
                    match self.sinks.get(i) {
                        Some(Some(sink)) if sink.keys.is_empty() => {
                            self.event(i, b'T', Arc::default(), Vec::new());
                        }
                        _ => self.pending.entry((i, self.txid)).or_default().truncated = true,
                    }
                }
            }
            // Origin, type, logical message: nothing to capture.
            _ => {}
        }
        Ok(false)
    }

    /// Records a change (`op`: b'I', b'U' or b'D') to a row of relation
    /// `relid`: its old row (a key, or whole) for an UPDATE or DELETE, its
    /// new row for an INSERT or UPDATE.
    fn change(
        &mut self,
        relid: u32,
        op: u8,
        old: Option<OldRow>,
        new: Option<Vec<Column>>,
    ) -> Result<()> {
        let Some(&i) = self.stream.tables.get(&relid) else {
            return Ok(());
        };
        let Some(Some(sink)) = self.sinks.get(i) else {
            return Ok(());
        };
        let Some(names) = self.relations.get(&relid).cloned() else {
            return Err(malformed("a row before its relation"));
        };
        if sink.keys.is_empty() {
            return self.rows(i, sink, names, op, old, new);
        }
        for tuple in old.iter().map(|(_, t)| t).chain(&new) {
            let key = key_of(sink, self.stream, &names, tuple)?;
            self.pending.entry((i, self.txid)).or_default().keys.push(key);
            self.held += 1;
        }
        Ok(())
    }

    /// A keyless table's change, as events: the old row deleted, the new
    /// one inserted. Its replica identity is FULL, so an UPDATE or DELETE
    /// sends the whole old row, and a new row's TOASTed value the UPDATE
    /// left alone (not sent) is the old row's.
    fn rows(
        &mut self,
        i: usize,
        sink: &Sink,
        names: Arc<Vec<String>>,
        op: u8,
        old: Option<OldRow>,
        new: Option<Vec<Column>>,
    ) -> Result<()> {
        // A value not sent (TOASTed, left alone) is the old row's: only an
        // UPDATE has one to take it from.
        let whole = |tuple: &[Column], old: Option<&[Option<String>]>| {
            let value = |(at, c): (usize, &Column)| match c {
                Column::Null => Some(None),
                Column::Text(v) => Some(Some(v.clone())),
                Column::Unchanged => old.map(|o| o.get(at).cloned().flatten()),
            };
            tuple.iter().enumerate().map(value).collect::<Option<Vec<_>>>()
        };
        let changed = |what: &str| Error::SlotLost {
            sync: self.stream.sync.clone(),
            slot: self.stream.slot.clone(),
            why: format!(
                "sent {what} of {} (a table without a key): its REPLICA IDENTITY is no longer \
                 FULL",
                sink.table
            ),
        };
        let old = match old {
            Some((b'O', tuple)) => Some(whole(&tuple, None).ok_or_else(|| changed("an old row"))?),
            Some(_) => return Err(changed("only the key of a row")),
            None if op == b'I' => None,
            None => return Err(changed("a row change without its old row")),
        };
        if let Some(values) = &old {
            self.event(i, b'D', names.clone(), values.clone());
        }
        if let Some(tuple) = &new {
            let values = whole(tuple, old.as_deref()).ok_or_else(|| changed("an UPDATE"))?;
            self.event(i, b'I', names, values);
        }
        Ok(())
    }

    fn event(&mut self, i: usize, op: u8, names: Arc<Vec<String>>, values: Vec<Option<String>>) {
        self.held += 1;
        self.held_bytes += values.iter().flatten().map(|v| v.len()).sum::<usize>();
        let (txid, lsn, rank) = (self.txid, self.lsn, self.rank);
        self.rank += 1;
        self.events.entry(i).or_default().push(Event { txid, op, lsn, rank, names, values });
    }

    /// Writes the keys and rows held into the deltas (and the journal), in
    /// `tx`, a statement per table.
    async fn flush(&mut self, tx: &Tx<'_>) -> Result<()> {
        let started = std::time::Instant::now();
        let flushed = self.write(tx).await;
        self.flushing += started.elapsed();
        flushed
    }

    /// Writes what is held once it reaches [`FLUSH_KEYS`] or
    /// [`FLUSH_BYTES`]: what bounds a pump's memory.
    async fn flush_if_full(&mut self, tx: &Tx<'_>) -> Result<()> {
        if self.held >= FLUSH_KEYS || self.held_bytes >= FLUSH_BYTES {
            self.flush(tx).await?;
        }
        Ok(())
    }

    async fn write(&mut self, tx: &Tx<'_>) -> Result<()> {
        // Refused before anything is written: a pump naming more deltas
        // than the lock table can spare would fail with "out of shared
        // memory" at every retry (the changes of hours without a daemon,
        // on a schema-per-tenant database). The caller pumps by slices.
        // (A TRUNCATE is held for a table outside the pump's sinks too,
        // and not written.)
        let tables = self.pending.keys().map(|(i, _)| i).chain(self.events.keys());
        let sinks = self.sinks;
        self.written.extend(tables.filter(|&&i| matches!(sinks.get(i), Some(Some(_)))));
        if self.written.len() > self.limit {
            return Err(Error::PumpTooWide {
                sync: self.stream.sync.clone(),
                tables: self.written.len(),
                limit: self.limit,
            });
        }
        let mut by_table: HashMap<usize, Vec<(i64, Pending)>> = HashMap::new();
        for ((i, txid), p) in std::mem::take(&mut self.pending) {
            by_table.entry(i).or_default().push((txid, p));
        }
        let mut journal: HashMap<&str, (Vec<i64>, Vec<i32>)> = HashMap::new();
        for (i, changes) in by_table {
            let Some(Some(sink)) = self.sinks.get(i) else { continue };
            tx.copy_from(&copy_keys(sink), keys_copy(sink, &changes).into()).await?;
            note(&mut journal, sink.journal, changes.iter().map(|(txid, _)| *txid));
        }
        for (i, events) in std::mem::take(&mut self.events) {
            let Some(Some(sink)) = self.sinks.get(i) else { continue };
            let columns = tx.query(DELTA_COLUMNS, &[&sink.delta]).await?;
            let columns: Vec<String> = columns.iter().map(|r| r.get(0)).collect();
            tx.copy_from(&copy_rows(sink, &columns), rows_copy(&events, &columns).into()).await?;
            let mut txids: Vec<i64> = events.iter().map(|e| e.txid).collect();
            txids.dedup();
            note(&mut journal, sink.journal, txids.into_iter());
        }
        for (j, (txids, numbers)) in journal {
            tx.execute(
                &format!(
                    "insert into {j} (_pgleap_txid, n)
                     select * from unnest($1::int8[], $2::int4[])"
                ),
                &[&txids, &numbers],
            )
            .await?;
        }
        (self.held, self.held_bytes) = (0, 0);
        Ok(())
    }
}

/// Journal entries for a table's transactions, if the sync keeps one:
/// `entry` is the journal and the table's number there.
fn note<'a>(
    journal: &mut HashMap<&'a str, (Vec<i64>, Vec<i32>)>,
    entry: Option<(&'a str, i32)>,
    txids: impl Iterator<Item = i64>,
) {
    if let Some((j, n)) = entry {
        let entries = journal.entry(j).or_default();
        for txid in txids {
            entries.0.push(txid);
            entries.1.push(n);
        }
    }
}

/// The key of `tuple`, a row of `sink`'s table whose columns are `names`.
fn key_of(sink: &Sink, stream: &Stream, names: &[String], tuple: &[Column]) -> Result<Vec<String>> {
    let mut key = Vec::with_capacity(sink.keys.len());
    for k in sink.keys {
        let at = names.iter().position(|n| n == k);
        match at.and_then(|at| tuple.get(at)) {
            Some(Column::Text(v)) => key.push(v.clone()),
            // Its replica identity changed: the slot cannot key this
            // table's changes any more.
            _ => {
                return Err(Error::SlotLost {
                    sync: stream.sync.clone(),
                    slot: stream.slot.clone(),
                    why: format!(
                        "sent a row of {} without its key column {k} (its REPLICA IDENTITY \
                         changed)",
                        sink.table
                    ),
                });
            }
        }
    }
    Ok(key)
}

/// A 32-bit transaction id decoded from the WAL as the 64-bit one
/// `txid_current()` gave it, from `own`, a transaction id of the same
/// time: the one nearest `own` (decoded transactions may be older or
/// newer than the pump's snapshot, by far less than 2^31).
fn full_txid(xid: u32, own: i64) -> i64 {
    let candidate = (own & !0xffff_ffff) | i64::from(xid);
    if candidate > own + (1 << 31) {
        candidate - (1 << 32)
    } else if candidate < own - (1 << 31) {
        candidate + (1 << 32)
    } else {
        candidate
    }
}

/// The statement writing a sink's changes (see [`keys_copy`]). By COPY:
/// the values pgoutput sent are their types' output, which COPY reads
/// with the delta column's input function, as a trigger's row would have
/// them (no cast per value from a JSON document, as until session 14).
fn copy_keys(sink: &Sink) -> String {
    let columns: Vec<String> = sink.keys.iter().map(|k| quote_ident(k)).collect();
    format!(
        "copy {} (_pgleap_txid, _pgleap_truncated, {}) from stdin",
        sink.delta,
        columns.join(", ")
    )
}

/// The statement writing a keyless table's events (see [`rows_copy`]),
/// in their order (the delta's `_pgleap_seq` keeps it), each value read
/// by its column type's input function, as the text pgoutput sent came
/// from its output function. `columns`: the delta's row columns, as
/// [`DELTA_COLUMNS`] reads them.
fn copy_rows(sink: &Sink, columns: &[String]) -> String {
    let names: String = columns.iter().map(|n| format!(", {}", quote_ident(n))).collect();
    format!(
        "copy {} (_pgleap_txid, _pgleap_truncated, _pgleap_op, _pgleap_lsn, _pgleap_n{names})
         from stdin",
        sink.delta
    )
}

/// Keyless events as [`copy_rows`] reads them: the event's columns, then
/// the row's values in `columns`' order (a column the row lacks, added
/// since, is NULL).
fn rows_copy(events: &[Event], columns: &[String]) -> String {
    let mut out = String::new();
    for e in events {
        let (op, truncated) = (char::from(e.op), e.op == b'T');
        let (hi, lo) = (e.lsn >> 32, e.lsn & 0xffff_ffff);
        let _ = write!(out, "{}\t{truncated}\t{op}\t{hi:X}/{lo:X}\t{}", e.txid, e.rank);
        for name in columns {
            let at = e.names.iter().position(|n| n == name);
            out.push('\t');
            copy_field(&mut out, at.and_then(|at| e.values.get(at)).and_then(|v| v.as_deref()));
        }
        out.push('\n');
    }
    out
}

/// A sink's changes as [`copy_keys`] reads them (COPY's text format), a
/// delta row each: per transaction, a TRUNCATE's marker, and its keys (one
/// row of arrays for a delta of arrays, else a row a key).
fn keys_copy(sink: &Sink, changes: &[(i64, Pending)]) -> String {
    fn row<'a>(
        out: &mut String,
        txid: i64,
        truncated: bool,
        keys: impl Iterator<Item = Option<&'a str>>,
    ) {
        let _ = write!(out, "{txid}\t{truncated}");
        for k in keys {
            out.push('\t');
            copy_field(out, k);
        }
        out.push('\n');
    }
    let mut out = String::new();
    for (txid, p) in changes {
        if p.truncated {
            row(&mut out, *txid, true, sink.keys.iter().map(|_| None));
        }
        if p.keys.is_empty() {
            continue;
        }
        if sink.arrays {
            let columns: Vec<String> = (0..sink.keys.len())
                .map(|c| array_literal(p.keys.iter().map(|k| k[c].as_str())))
                .collect();
            row(&mut out, *txid, false, columns.iter().map(|c| Some(c.as_str())));
        } else {
            for k in &p.keys {
                row(&mut out, *txid, false, k.iter().map(|v| Some(v.as_str())));
            }
        }
    }
    out
}

fn malformed(what: &str) -> Error {
    Error::invalid(
        format!("logical decoding sent {what}: pgleap cannot read this slot's output"),
        "tear the sync down and add it again with --capture triggers",
    )
}

/// One column of a decoded row.
enum Column {
    Null,
    /// A TOASTed value the change left as it was: not sent.
    Unchanged,
    Text(String),
}

/// Reads pgoutput's binary messages (protocol version 1).
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else { return Err(malformed("a truncated message")) };
        let out = &self.b[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn expect(&mut self, byte: u8) -> Result<()> {
        match self.u8()? == byte {
            true => Ok(()),
            false => Err(malformed("an unexpected message part")),
        }
    }
    fn string(&mut self) -> Result<String> {
        let rest = &self.b[self.at..];
        let Some(len) = rest.iter().position(|&c| c == 0) else {
            return Err(malformed("an unterminated name"));
        };
        let s = String::from_utf8_lossy(&rest[..len]).into_owned();
        self.at += len + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Column>> {
        let n = self.u16()?;
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Column::Null,
                b'u' => Column::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    let bytes = self.take(len)?;
                    match std::str::from_utf8(bytes) {
                        Ok(s) => Column::Text(s.to_string()),
                        Err(_) => return Err(malformed("a value that is not UTF-8")),
                    }
                }
                _ => return Err(malformed("a column of an unknown kind")),
            });
        }
        Ok(out)
    }
}

// The catalog queries of this module, named.

const AVAILABLE: &str = "select current_setting('wal_level'), current_user::text,
        coalesce((select rolreplication or rolsuper from pg_roles where rolname = current_user),
                 false)
          or exists (select 1 from pg_roles r where r.rolname = 'rds_replication'
                     and pg_has_role(r.oid, 'member')),
        current_setting('max_replication_slots')::int8
          - (select count(*) from pg_replication_slots),
        current_setting('server_encoding')";

/// Before 13 a slot retains WAL without any limit.
const UNLIMITED_SLOT_WAL: &str =
    "select coalesce(current_setting('max_slot_wal_keep_size', true), '-1') = '-1'";

const REPLICA_IDENTITY: &str = "select c.relreplident = 'f',
        coalesce((select array_agg(a.attname::text)
                  from pg_index i join pg_attribute a
                    on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
                  where i.indrelid = c.oid and i.indimmediate
                    and case c.relreplident when 'i' then i.indisreplident
                                            when 'd' then i.indisprimary
                                            else false end), '{}')
    from pg_class c where c.oid = $1::text::regclass";

const NAME: &str = "select format('pgleap_%s_%s_%s', d.oid, n.oid, $2::int4)
    from pg_database d, pg_namespace n
    where d.datname = current_database() and n.nspname = $1";

const CREATE_SLOT: &str = "select pg_create_logical_replication_slot($1, 'pgoutput')";

/// The oldest transaction holding an id on the server, as a DBA finds it.
const OLDEST_TRANSACTION: &str = "select format('pid %s, %s, open since %s',
        pid, coalesce(nullif(state, ''), 'unknown state'), xact_start)
    from pg_stat_activity
    where backend_xid is not null and pid <> pg_backend_pid()
    order by xact_start limit 1";

const DECODED_TABLES: &str = "select r.prrelid::int8, t.n
    from pg_publication p join pg_publication_rel r on r.prpubid = p.oid
    join unnest($2::text[]) with ordinality t(name, n) on to_regclass(t.name) = r.prrelid
    where p.pubname = $1";

const PEEK: &str = "select lsn::text, data
    from pg_logical_slot_peek_binary_changes($1, $3::text::pg_lsn, null,
         'proto_version', '1', 'publication_names', $2)";

/// Where the WAL is written to, read after the snapshot was taken; and the
/// snapshot's next transaction id, which dates decoded ids (not
/// `txid_current()`: a pump that finds nothing assigns no id and writes
/// no WAL, as the daemon's idle polls would).
const POSITION: &str =
    "select pg_current_wal_insert_lsn()::text, txid_snapshot_xmax(txid_current_snapshot())";

const RESTART_BEHIND: &str =
    "select pg_wal_lsn_diff(pg_current_wal_insert_lsn(), restart_lsn)::int8
    from pg_replication_slots where slot_name = $1 and restart_lsn is not null";

/// A delta's columns of its table (pgleap's own start `_pgleap_`).
const DELTA_COLUMNS: &str = "select a.attname::text
    from pg_attribute a
    where a.attrelid = $1::text::regclass and a.attnum > 0 and not a.attisdropped
      and left(a.attname, 8) <> '_pgleap_'
    order by a.attnum";

/// The session that holds a slot, if one does.
const HOLDER: &str = "select active_pid from pg_replication_slots where slot_name = $1";

const FLUSHED: &str = "select pg_current_wal_flush_lsn() >= $1::text::pg_lsn";

const ADVANCE: &str = "select pg_replication_slot_advance(slot_name, $2::text::pg_lsn)
    from pg_replication_slots
    where slot_name = $1 and confirmed_flush_lsn < $2::text::pg_lsn";

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries() -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("decoding: availability", AVAILABLE),
        NamedQuery::new("decoding: replica identity", REPLICA_IDENTITY),
        NamedQuery::new("decoding: names", NAME),
        NamedQuery::new("decoding: decoded tables", DECODED_TABLES),
        NamedQuery::new("decoding: oldest transaction", OLDEST_TRANSACTION),
        NamedQuery::new("decoding: restart point behind", RESTART_BEHIND),
        NamedQuery::new("decoding: slot holder", HOLDER),
    ]
}

#[cfg(test)]
mod tests {
    use super::{earlier, full_txid, later};

    #[test]
    fn wal_positions_compare_as_numbers_not_text() {
        assert_eq!(earlier("0/9", "0/10"), "0/9");
        assert_eq!(earlier("1/0", "0/FFFFFFFF"), "0/FFFFFFFF");
        assert_eq!(earlier("A/1", "A/1"), "A/1");
        assert_eq!(later("0/9", "0/10"), "0/10");
        assert_eq!(later("1/0", "0/FFFFFFFF"), "1/0");
    }

    #[test]
    fn decoded_ids_take_the_epoch_nearest_the_pumps() {
        assert_eq!(full_txid(1500, 1000), 1500, "newer than the pump, same epoch");
        assert_eq!(full_txid(900, 1000), 900);
        let own = (3 << 32) + 5;
        assert_eq!(full_txid(u32::MAX - 2, own), (3 << 32) - 3, "before the epoch turned");
        let own = (3 << 32) + u32::MAX as i64 - 5;
        assert_eq!(full_txid(7, own), (4 << 32) + 7, "after it turned");
    }
}
