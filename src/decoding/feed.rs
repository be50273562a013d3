//! A sync's slot read through the replication protocol, by the daemon
//! with `PGLEAP_DECODING_STREAM=1`: one decoding context kept open from
//! one pump to the next.
//!
//! The SQL functions (`pg_logical_slot_peek_binary_changes`) build a new
//! decoding context at each call, which decodes again from the slot's
//! restart point, and the advance after it decodes that stretch once
//! more. A replication connection (`START_REPLICATION`) decodes each
//! record once, and its walsender keeps going between pumps. Measured,
//! that makes the daemon level sooner once writes stop, but not less
//! behind under a saturating load, nor cheaper for the source's CPU
//! (docs/BENCHMARKS.md, session 16); and it holds a walsender. Hence
//! opt-in.
//!
//! A pump still reads inside its batch's source transaction and still
//! stops at that snapshot's end (see [`super::pump`]): after its snapshot
//! is taken it commits a logical message of its own on another session
//! (a "mark", flushed at commit); everything the stream sends before that
//! message committed before it, so every transaction the snapshot sees.
//! Reading on to the mark needs PostgreSQL 14 (pgoutput's `messages`
//! option); older sources, and connections pgleap does not open itself
//! (a list of hosts, TLS required), read through the SQL functions.
//!
//! What a pump read is confirmed to the server (the slot's
//! `confirmed_flush_lsn`) only once its transaction committed
//! ([`Feed::confirm`]). A pump that did not get there (an error, a
//! verify's snapshot, a kill) leaves the stream ahead of the slot: the
//! next pump opens it again, from what was confirmed, and reads those
//! transactions again (harmless, as after a crash between commit and
//! advance). Every other pgleap process that needs the slot takes it,
//! under the pump lock ([`super::take`]): the daemon's next pump finds its
//! walsender gone and opens the stream again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};

use super::{Decoder, FETCH, HOLDER, Stream};
use crate::error::{Error, Result};
use crate::pg::{Conn, Sql, Tx};

/// The stream of one sync's slot in this process, shared by the daemon's
/// workers of the sync (one per target; their pumps take turns under the
/// pump lock, as across processes).
pub struct Feed {
    slot: String,
    sync: String,
    config: ReplicationConfig,
    /// The session that commits the marks.
    marks: tokio::sync::Mutex<Conn>,
    open: tokio::sync::Mutex<Option<Open>>,
    /// After a stream could not be opened (no free walsender, a pooler in
    /// between, a `pg_hba.conf` that refuses it), pumps read through the
    /// SQL functions until then, rather than try again at every poll.
    retry_at: Mutex<Option<std::time::Instant>>,
}

/// How long pumps read through the SQL functions after a stream could not
/// be opened.
const RETRY_AFTER: Duration = Duration::from_secs(60);

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed").field("slot", &self.slot).finish_non_exhaustive()
    }
}

struct Open {
    client: ReplicationClient,
    /// The walsender that holds the slot for it.
    walsender: i32,
    /// Relation messages, sent once per relation per stream.
    relations: HashMap<u32, Arc<Vec<String>>>,
    /// Read past what the server was told is confirmed: by a pump whose
    /// transaction may not have committed.
    unconfirmed: bool,
    /// How far the server said it decoded (its keepalives): every
    /// transaction that committed before is in the events read.
    sent: u64,
    /// Between a transaction's BEGIN and its COMMIT.
    within: bool,
}

/// What one event of the stream told a pump.
enum Step {
    Next,
    /// A transaction's commit, and where it ends.
    Committed(Lsn),
    /// The pump's own mark.
    Marked,
}

/// The prefix of pgleap's marks among logical messages.
const MARK: &str = "pgleap";

/// How long a stream may send nothing while a pump waits for its mark.
const SILENCE: Duration = Duration::from_secs(30);

/// How often at most the client tells the server what is confirmed: at
/// once, in effect. The client does not send what is pending when the
/// stream is closed (the daemon's session ends: autokick turned off, an
/// error), and until the server has it, `status` counts what was applied
/// as still in the slot and the next reader decodes it again.
const STATUS_INTERVAL: Duration = Duration::from_millis(10);

/// A mark's text, never the same twice: a stream opened again reads the
/// marks of pumps whose transactions did not commit again, and stopping at
/// one of those (as at a counter's that started over) would stop before
/// transactions the pump's snapshot sees.
fn token() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static STARTED: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let started = STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}.{started}.{n}", std::process::id())
}

/// What one process streams, per slot.
static FEEDS: Mutex<Option<HashMap<String, Weak<Feed>>>> = Mutex::new(None);

impl Feed {
    /// This process's feed of `stream`'s slot, opened if none is, with
    /// `PGLEAP_DECODING_STREAM=1`; `None` where the slot is read through
    /// the SQL functions: by default, on a source before PostgreSQL 14, or
    /// through a connection pgleap does not open itself.
    ///
    /// Not the default: measured under a saturating write load it brought
    /// neither the lag nor the source's CPU down (docs/BENCHMARKS.md), and
    /// a stream holds one of the source's `max_wal_senders` for as long as
    /// the daemon runs, which a standby may need.
    pub async fn shared(src: &Conn, stream: &Stream) -> Result<Option<Arc<Feed>>> {
        let on = std::env::var("PGLEAP_DECODING_STREAM").is_ok_and(|v| v == "1");
        if !on || src.version().major() < 14 {
            return Ok(None);
        }
        let Some(config) = src.replication_config(&stream.slot) else {
            return Ok(None);
        };
        if let Some(feed) = Self::registered(&stream.slot) {
            return Ok(Some(feed));
        }
        let feed = Arc::new(Feed {
            slot: stream.slot.clone(),
            sync: stream.sync.clone(),
            config: config.with_buffer_size(FETCH as usize).with_status_interval(STATUS_INTERVAL),
            marks: tokio::sync::Mutex::new(src.sibling().await?),
            open: tokio::sync::Mutex::new(None),
            retry_at: Mutex::new(None),
        });
        let mut feeds = FEEDS.lock().unwrap_or_else(|e| e.into_inner());
        let feeds = feeds.get_or_insert_with(HashMap::new);
        feeds.retain(|_, f| f.strong_count() > 0);
        feeds.insert(stream.slot.clone(), Arc::downgrade(&feed));
        Ok(Some(feed))
    }

    fn registered(slot: &str) -> Option<Arc<Feed>> {
        let feeds = FEEDS.lock().unwrap_or_else(|e| e.into_inner());
        feeds.as_ref()?.get(slot)?.upgrade()
    }

    /// Feeds `decoder`, inside `tx` (the pump's transaction, its snapshot
    /// taken when the WAL was written to `written_to`), every transaction
    /// that snapshot sees, and maybe more, writing the deltas as it goes.
    /// Returns where to confirm once `tx` committed; `Ok(None)` if the
    /// stream cannot be opened (the caller reads through the SQL
    /// functions, which also say why a slot is lost).
    ///
    /// First what the stream already sent: if the server said it decoded
    /// past `written_to` and no transaction is half read, that is all (an
    /// idle source: no mark, so the daemon's polls write nothing). Else on
    /// to a mark.
    pub(super) async fn read(
        &self,
        tx: &Tx<'_>,
        written_to: &str,
        decoder: &mut Decoder<'_>,
    ) -> Result<Option<String>> {
        let written_to = Lsn::parse(written_to).map_err(|e| self.broken(e.to_string()))?;
        let mut open = self.open.lock().await;
        let Some(row) = tx.query_opt(HOLDER, &[&self.slot]).await? else {
            *open = None;
            return Ok(None);
        };
        let active: Option<i32> = row.get(0);
        let fresh = open.as_ref().is_some_and(|o| !o.unconfirmed && active == Some(o.walsender));
        if !fresh {
            if let Some(mut stale) = open.take() {
                stale.client.abort();
            }
            let waiting = *self.retry_at.lock().unwrap_or_else(|e| e.into_inner());
            if waiting.is_some_and(|at| std::time::Instant::now() < at) {
                return Ok(None);
            }
            match self.start().await {
                Ok(o) => *open = Some(o),
                Err(e) => {
                    tracing::info!(
                        slot = self.slot,
                        error = %e,
                        "slot not streamed; read through the SQL functions for {} s",
                        RETRY_AFTER.as_secs()
                    );
                    let at = std::time::Instant::now() + RETRY_AFTER;
                    *self.retry_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
                    return Ok(None);
                }
            }
        }
        let o = open.as_mut().expect("opened above");
        o.unconfirmed = true;
        decoder.relations = std::mem::take(&mut o.relations);
        let read = self.read_open(o, tx, written_to, decoder).await;
        o.relations = std::mem::take(&mut decoder.relations);
        Ok(Some(read?.to_pg_string()))
    }

    async fn read_open(
        &self,
        o: &mut Open,
        tx: &Tx<'_>,
        written_to: Lsn,
        decoder: &mut Decoder<'_>,
    ) -> Result<Lsn> {
        let mut last = Lsn::from_u64(0);
        // Received already: the stream runs between pumps. (A zero
        // timeout polls `recv` once.)
        while let Ok(event) = tokio::time::timeout(Duration::ZERO, o.client.recv()).await {
            if let Step::Committed(end) = self.step(o, event, "", decoder)? {
                last = last.max(end);
            }
            decoder.flush_if_full(tx).await?;
        }
        if !o.within && o.sent >= written_to.as_u64() {
            return Ok(last.max(Lsn::from_u64(o.sent)));
        }
        let token = token();
        let marked = self.mark(&token).await?;
        loop {
            let event = tokio::time::timeout(SILENCE, o.client.recv())
                .await
                .map_err(|_| self.broken(format!("nothing came in {} s", SILENCE.as_secs())))?;
            match self.step(o, event, &token, decoder)? {
                Step::Committed(end) => last = last.max(end),
                // Everything that committed before the mark was sent
                // before it.
                Step::Marked => return Ok(last.max(marked)),
                Step::Next => {}
            }
            decoder.flush_if_full(tx).await?;
        }
    }

    /// Takes one event of the stream (`token`: the pump's mark, if any).
    fn step(
        &self,
        o: &mut Open,
        event: pgwire_replication::Result<Option<ReplicationEvent>>,
        token: &str,
        decoder: &mut Decoder<'_>,
    ) -> Result<Step> {
        let event = match event {
            Ok(Some(event)) => event,
            Ok(None) => return Err(self.broken("the server ended it".into())),
            Err(e) => return Err(self.broken(e.to_string())),
        };
        match event {
            ReplicationEvent::Begin { final_lsn, xid, .. } => {
                o.within = true;
                decoder.begin(final_lsn.as_u64(), xid);
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                o.within = false;
                return Ok(Step::Committed(end_lsn));
            }
            ReplicationEvent::XLogData { data, .. } => {
                decoder.message(&data)?;
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => o.sent = o.sent.max(wal_end.as_u64()),
            ReplicationEvent::Message { prefix, content, .. }
                if !token.is_empty() && prefix == MARK && content.as_ref() == token.as_bytes() =>
            {
                return Ok(Step::Marked);
            }
            _ => {}
        }
        Ok(Step::Next)
    }

    /// Opens the stream from the slot's confirmed position.
    async fn start(&self) -> Result<Open> {
        let mut client = ReplicationClient::connect(self.config.clone())
            .await
            .map_err(|e| self.broken(e.to_string()))?;
        match tokio::time::timeout(SILENCE, client.wait_started()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.broken(e.to_string())),
            Err(_) => return Err(self.broken("START_REPLICATION did not answer".into())),
        }
        let marks = self.marks.lock().await;
        let walsender: Option<i32> = marks.query_one(HOLDER, &[&self.slot]).await?.get(0);
        let Some(walsender) = walsender else {
            return Err(self.broken("the slot is not held by the stream".into()));
        };
        tracing::debug!(slot = self.slot, walsender, "streaming the slot");
        Ok(Open {
            client,
            walsender,
            relations: HashMap::new(),
            unconfirmed: false,
            sent: 0,
            within: false,
        })
    }

    /// Commits a logical message `token` and returns where it is. Its own
    /// transaction, flushed at commit (`synchronous_commit = local`: a
    /// pump does not wait for standbys); begun after the pump's snapshot,
    /// so it commits after every transaction that snapshot sees.
    async fn mark(&self, token: &str) -> Result<Lsn> {
        let mut marks = self.marks.lock().await;
        let marked = async {
            let tx = marks.transaction().await?;
            tx.batch_execute("set local synchronous_commit = local").await?;
            let sql = "select pg_logical_emit_message(true, $1::text, $2::text)::text";
            let at: String = tx.query_one(sql, &[&MARK, &token]).await?.get(0);
            tx.commit().await?;
            Lsn::parse(&at).map_err(|e| self.broken(format!("a mark at {at}: {e}")))
        }
        .await;
        if marked.is_err() {
            // The session may be gone (the source restarted): the next
            // pump marks on a new one. The workers of other targets share
            // this feed, so it outlives their sessions.
            if let Ok(fresh) = marks.sibling().await {
                *marks = fresh;
            }
        }
        marked
    }

    /// Tells the server that what the last pump read is in committed
    /// deltas, if that pump read through this feed; returns whether it
    /// did (else the caller advances the slot by SQL).
    pub async fn confirm(&self, to: &str) -> bool {
        let mut open = self.open.lock().await;
        let Some(o) = open.as_mut().filter(|o| o.unconfirmed) else {
            return false;
        };
        let Ok(lsn) = Lsn::parse(to) else { return false };
        o.client.update_applied_lsn(lsn);
        o.unconfirmed = false;
        true
    }

    /// Ends the stream (the slot is then free for the SQL functions).
    pub async fn close(&self) {
        if let Some(mut o) = self.open.lock().await.take() {
            o.client.abort();
        }
    }

    fn broken(&self, why: String) -> Error {
        Error::StreamBroken { sync: self.sync.clone(), slot: self.slot.clone(), why }
    }
}
