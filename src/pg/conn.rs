//! A connection that knows its name, and the SQL surface shared by a
//! connection and its transactions.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, TryStreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{
    Client, CopyInSink, CopyOutStream, GenericClient, IsolationLevel, Portal, Row, Statement,
};

use super::conninfo::{ConnParams, Env, PasswordSource, ResolveError, ResolvedConn};
use super::{ConnectError, PgVersion, error_chain, quote_literal};

/// A failure talking to one database, named by its catalog name.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("database \"{db}\": {source}")]
    Resolve {
        db: String,
        #[source]
        source: ResolveError,
    },
    #[error("database \"{db}\": {source}")]
    Connect {
        db: String,
        #[source]
        source: ConnectError,
    },
    #[error("database \"{db}\": query failed: {}", query_detail(.context.as_deref(), .source))]
    Query {
        db: String,
        /// What pgleap was doing, when the statement alone does not say.
        context: Option<String>,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// The server's own message (not tokio-postgres's "db error: ..." wrapper),
/// after what pgleap was doing.
fn query_detail(context: Option<&str>, e: &tokio_postgres::Error) -> String {
    let detail = server_message(e);
    match context {
        Some(what) => format!("{what}: {detail}"),
        None => detail,
    }
}

fn server_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => d.message().to_string(),
        None => error_chain(e),
    }
}

impl PgError {
    /// The server's SQLSTATE, when the server sent one.
    pub fn sqlstate(&self) -> Option<&SqlState> {
        match self {
            Self::Query { source, .. } => source.code(),
            _ => None,
        }
    }

    /// The server's message alone, without the database's name.
    pub fn message(&self) -> String {
        match self {
            Self::Query { source, .. } => server_message(source),
            other => other.to_string(),
        }
    }

    pub fn db(&self) -> &str {
        match self {
            Self::Resolve { db, .. } | Self::Connect { db, .. } | Self::Query { db, .. } => db,
        }
    }

    /// Says what pgleap was doing when the query failed.
    pub fn context(mut self, what: &str) -> Self {
        if let Self::Query { context, .. } = &mut self {
            *context = Some(what.to_string());
        }
        self
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            Self::Resolve { .. } => Some("check the file's path and permissions".into()),
            Self::Connect { source, .. } => source.hint(),
            // The shared lock table is full: pgleap's own transactions
            // stay within a share of it, but installing or removing
            // capture must name every table at once, as pg_dump does.
            Self::Query { source, .. }
                if source.as_db_error().is_some_and(|e| e.message() == "out of shared memory") =>
            {
                Some(
                    "the server's lock table is too small for one transaction naming every \
                     table of the relgroup: raise max_locks_per_transaction (a restart), then \
                     run the command again"
                        .into(),
                )
            }
            Self::Query { .. } => None,
        }
    }
}

/// An open connection to a database of the catalog.
pub struct Conn {
    client: Client,
    name: Arc<str>,
    version: PgVersion,
    encoding: String,
    resolved: ResolvedConn,
    prepared: Prepared,
    temp_tables: TempTables,
    tables_per_transaction: usize,
}

/// The statements a connection keeps prepared (see
/// [`Sql::query_prepared`]), by their text; shared with its transactions.
#[derive(Clone, Default)]
pub struct Prepared(Arc<Mutex<HashMap<String, Statement>>>);

/// How many prepared statements a connection keeps: past this many (a plan
/// read again after schema changes names other tables), all are closed.
const MAX_PREPARED: usize = 256;

/// Asked of every new connection: the server's version and encoding, and
/// the slots of its shared lock table (`max_locks_per_transaction` for
/// each process the server may run and each prepared transaction).
const CONNECTED: &str = "select current_setting('server_version_num')::int4,
        current_setting('server_encoding'),
        current_setting('max_locks_per_transaction')::int8
          * (current_setting('max_connections')::int8
             + current_setting('autovacuum_max_workers')::int8 + 1
             + current_setting('max_worker_processes')::int8
             + current_setting('max_wal_senders')::int8
             + current_setting('max_prepared_transactions')::int8)";

/// Slots of the server's shared lock table per table one transaction of
/// pgleap's may name. The table is shared by every session: a transaction
/// holds a lock on each relation it read or wrote until it ends, and past
/// the table's size every session's next lock fails ("out of shared
/// memory"). A batch takes about four locks a table on each server (the
/// table or its delta, and their indexes); at twelve slots a table it uses
/// at most a third of the table, leaving the rest to the application. The
/// defaults (64 locks, 100 connections) give 650 tables.
pub const LOCK_SLOTS_PER_TABLE: i64 = 12;

/// How many tables one statement names at most whatever the lock table: a
/// UNION ALL (or OR) of 10,000 arms exceeds the server's stack depth while
/// it is parsed ("stack depth limit exceeded", found at 10,000 tables), so
/// statements over every delta or sequence go by slices.
pub const TABLES_PER_STATEMENT: usize = 500;

/// The temp tables a session keeps from one transaction to the next (see
/// [`Sql::keep_temp_table`]), least recently used first, and those to
/// drop before its next transaction; shared with its transactions.
///
/// Bounded because a session's temp tables are dropped when it ends, all
/// in one transaction holding a lock on each table and on its types: a
/// catch-up worker that had staged 300 tables was seen holding 403 locks
/// as its connection closed, near a small server's whole lock table,
/// and the other sessions' next locks failed with "out of shared memory".
#[derive(Clone, Default)]
pub struct TempTables(Arc<Mutex<TempState>>);

#[derive(Default)]
struct TempState {
    kept: VecDeque<String>,
    evicted: Vec<String>,
}

/// Temp tables dropped by one statement: each takes about five locks
/// (the table, its TOAST table and index, its row type and array type).
const TEMP_TABLES_PER_DROP: usize = 16;

impl TempTables {
    fn keep(&self, name: &str, limit: usize) {
        let mut state = self.0.lock().unwrap();
        if let Some(at) = state.kept.iter().position(|n| n == name) {
            state.kept.remove(at);
        }
        state.kept.push_back(name.to_string());
        while state.kept.len() > limit.max(1) {
            let old = state.kept.pop_front().expect("longer than the limit");
            state.evicted.push(old);
        }
    }
}

impl Prepared {
    fn get(&self, sql: &str) -> Option<Statement> {
        self.0.lock().unwrap().get(sql).cloned()
    }

    fn put(&self, sql: &str, statement: Statement) {
        let mut map = self.0.lock().unwrap();
        if map.len() >= MAX_PREPARED {
            // Dropping a Statement closes it on the server.
            map.clear();
        }
        map.insert(sql.to_string(), statement);
    }
}

impl Conn {
    /// Connects to a database given its parameters; `name` names it in
    /// every error.
    pub async fn connect(
        name: &str,
        params: &ConnParams,
        password: &PasswordSource,
        env: Env<'_>,
    ) -> Result<Conn, PgError> {
        let resolved = ResolvedConn::resolve(params, password, env)
            .map_err(|source| PgError::Resolve { db: name.into(), source })?;
        Self::open(name, resolved).await
    }

    /// Another connection to the same database, as this one was made.
    pub async fn sibling(&self) -> Result<Conn, PgError> {
        Self::open(&self.name, self.resolved.clone()).await
    }

    /// The settings of a replication connection (`replication=database`)
    /// to the same database, streaming `slot` through pgoutput with the
    /// publication of the same name, with this connection's session
    /// settings (values decoded as pgleap reads them). `None` where pgleap
    /// does not open one itself: a list of hosts (which one answered is
    /// not known here), a fixed `hostaddr`, or TLS required.
    pub fn replication_config(&self, slot: &str) -> Option<pgwire_replication::ReplicationConfig> {
        use super::conninfo::SslMode;
        let r = &self.resolved;
        let [host] = r.hosts.as_slice() else { return None };
        if r.ports.len() > 1 {
            return None;
        }
        let port = r.ports.first().copied().unwrap_or(5432);
        let tls = matches!(r.sslmode, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull);
        if r.hostaddr.is_some() || (tls && !host.starts_with('/')) {
            return None;
        }
        let password = r.password().unwrap_or_default();
        let config = if host.starts_with('/') {
            pgwire_replication::ReplicationConfig::unix(
                host.as_str(),
                port,
                r.user.as_str(),
                password,
                r.dbname.as_str(),
                slot,
                slot,
            )
        } else {
            pgwire_replication::ReplicationConfig::new(
                host.as_str(),
                r.user.as_str(),
                password,
                r.dbname.as_str(),
                slot,
                slot,
            )
            .with_port(port)
        };
        Some(
            config
                .with_options(super::session_options(r))
                .with_application_name(r.application_name.as_str()),
        )
    }

    async fn open(name: &str, resolved: ResolvedConn) -> Result<Conn, PgError> {
        let client = super::connect(&resolved, super::Startup::Pinned)
            .await
            .map_err(|source| PgError::Connect { db: name.into(), source })?;
        let limit = resolved.connect_timeout.unwrap_or(super::DEFAULT_CONNECT_TIMEOUT);
        let mut conn = Conn {
            client,
            name: name.into(),
            version: PgVersion(0),
            encoding: String::new(),
            resolved,
            prepared: Prepared::default(),
            temp_tables: TempTables::default(),
            tables_per_transaction: 1,
        };
        let version = conn.query_one(CONNECTED, &[]);
        let row = tokio::time::timeout(limit, version).await.map_err(|_| PgError::Connect {
            db: name.into(),
            source: ConnectError::Unreachable {
                target: conn.endpoint(),
                detail: format!("no answer within {} s (connect_timeout)", limit.as_secs()),
            },
        })??;
        conn.version = PgVersion(row.get::<_, i32>(0) as u32);
        let lock_slots: i64 = row.get(2);
        conn.tables_per_transaction = (lock_slots / LOCK_SLOTS_PER_TABLE).max(1) as usize;
        // Rows cross between servers as the database's own bytes (COPY to
        // COPY), as pg_dump moves them: a SQL_ASCII database holds bytes no
        // conversion to UTF8 accepts, and a LATIN1 one must not be
        // converted twice. pgleap moves between databases of one encoding
        // (checked before a sync is added); what it reads itself is
        // catalog text.
        let encoding: String = row.get(1);
        if encoding != "UTF8" {
            conn.batch_execute(&format!("set client_encoding = {}", quote_literal(&encoding)))
                .await?;
        }
        conn.encoding = encoding;
        Ok(conn)
    }

    /// The database's encoding (`server_encoding`).
    pub fn encoding(&self) -> &str {
        &self.encoding
    }

    /// The catalog name of the database.
    /// `user@host:port/dbname` of its settings (the first host of a list),
    /// never a password.
    pub fn address(&self) -> String {
        self.resolved.to_string()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it is connected (host, port, database, user; never a password).
    pub fn endpoint(&self) -> String {
        self.resolved.to_string()
    }

    /// The application_name its sessions report (pgleap's unless the
    /// connection string says).
    pub fn application_name(&self) -> &str {
        &self.resolved.application_name
    }

    pub async fn transaction(&mut self) -> Result<Tx<'_>, PgError> {
        self.begin(None).await
    }

    /// Drops the temp tables [`Sql::keep_temp_table`] let go, outside any
    /// transaction of the caller's, a few at a time.
    async fn drop_evicted_temp_tables(&mut self) -> Result<(), PgError> {
        let evicted = std::mem::take(&mut self.temp_tables.0.lock().unwrap().evicted);
        for (n, chunk) in evicted.chunks(TEMP_TABLES_PER_DROP).enumerate() {
            let dropped = self
                .batch_execute(&format!(
                    "begin; set local client_min_messages = warning;
                     drop table if exists {}; commit",
                    chunk.join(", ")
                ))
                .await;
            if let Err(e) = dropped {
                // Dropped at the next transaction, then.
                let _ = self.batch_execute("rollback").await;
                let rest = &evicted[n * TEMP_TABLES_PER_DROP..];
                self.temp_tables.0.lock().unwrap().evicted.extend_from_slice(rest);
                return Err(e);
            }
        }
        Ok(())
    }

    /// A [`Conn::snapshot`] transaction that sees what the transaction
    /// that exported `exported` (see [`Tx::export_snapshot`]) sees: the
    /// workers of one copy or catch-up read one snapshot.
    pub async fn imported_snapshot(&mut self, exported: &str) -> Result<Tx<'_>, PgError> {
        let tx = self.snapshot().await?;
        tx.batch_execute(&format!("set transaction snapshot {}", quote_literal(exported))).await?;
        Ok(tx)
    }

    /// A read-only REPEATABLE READ transaction: one snapshot for all it reads.
    pub async fn snapshot(&mut self) -> Result<Tx<'_>, PgError> {
        self.repeatable_read(true).await
    }

    /// A REPEATABLE READ transaction that may write.
    pub async fn writable_snapshot(&mut self) -> Result<Tx<'_>, PgError> {
        self.repeatable_read(false).await
    }

    async fn repeatable_read(&mut self, read_only: bool) -> Result<Tx<'_>, PgError> {
        self.begin(Some(read_only)).await
    }

    /// Begins a transaction, once the temp tables let go of are dropped: a
    /// plain BEGIN (the session's defaults), or with `repeatable_read` a
    /// REPEATABLE READ one, read-only or READ WRITE as it says.
    async fn begin(&mut self, repeatable_read: Option<bool>) -> Result<Tx<'_>, PgError> {
        self.drop_evicted_temp_tables().await?;
        let (name, version, prepared) = (self.name.clone(), self.version, self.prepared.clone());
        let (temp_tables, tables_per_transaction) =
            (self.temp_tables.clone(), self.tables_per_transaction);
        let mut builder = self.client.build_transaction();
        if let Some(read_only) = repeatable_read {
            builder = builder.isolation_level(IsolationLevel::RepeatableRead).read_only(read_only);
        }
        match builder.start().await {
            Ok(tx) => Ok(Tx { tx, name, version, prepared, temp_tables, tables_per_transaction }),
            Err(source) => Err(PgError::Query { db: name.to_string(), context: None, source }),
        }
    }
}

/// A transaction of a [`Conn`], with the same name.
pub struct Tx<'a> {
    tx: tokio_postgres::Transaction<'a>,
    name: Arc<str>,
    version: PgVersion,
    prepared: Prepared,
    temp_tables: TempTables,
    tables_per_transaction: usize,
}

impl Tx<'_> {
    pub async fn commit(self) -> Result<(), PgError> {
        let db = self.name.to_string();
        self.tx.commit().await.map_err(|source| PgError::Query { db, context: None, source })
    }

    pub async fn rollback(self) -> Result<(), PgError> {
        let db = self.name.to_string();
        self.tx.rollback().await.map_err(|source| PgError::Query { db, context: None, source })
    }
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Running SQL on a named connection or transaction; every failure carries
/// the database's name and the server's error.
pub trait Sql: Sync {
    fn client(&self) -> &Client;
    fn db(&self) -> &str;
    fn version(&self) -> PgVersion;
    /// How many tables one transaction of pgleap's may name on this server
    /// (see [`LOCK_SLOTS_PER_TABLE`]).
    fn tables_per_transaction(&self) -> usize;
    /// How many tables one statement names at most on this server: its
    /// share of the lock table, and no more than [`TABLES_PER_STATEMENT`].
    fn tables_per_statement(&self) -> usize {
        self.tables_per_transaction().min(TABLES_PER_STATEMENT)
    }
    fn prepared(&self) -> &Prepared;
    fn temp_tables(&self) -> &TempTables;

    /// Notes that this session keeps temp table `name` (qualified and
    /// quoted) for its later transactions. It keeps at most half as many
    /// as one transaction may name tables (see [`TempTables`]): the least
    /// recently used beyond are dropped before the connection's next
    /// transaction (and created again when needed).
    fn keep_temp_table(&self, name: &str) {
        self.temp_tables().keep(name, self.tables_per_transaction() / 2);
    }

    fn error(&self, source: tokio_postgres::Error) -> PgError {
        PgError::Query { db: self.db().to_string(), context: None, source }
    }

    async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, PgError> {
        self.client().query(sql, params).await.map_err(|e| self.error(e))
    }

    async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, PgError> {
        self.client().query_one(sql, params).await.map_err(|e| self.error(e))
    }

    /// Runs a statement this connection prepared the first time it ran it.
    /// For the statements naming every delta that run on every poll and
    /// batch: text run once is parsed and planned every time (with a
    /// thousand tables, most of its cost), a prepared statement is planned
    /// with its parameters for five runs and then keeps a generic plan.
    async fn query_prepared(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, PgError> {
        let statement = match self.prepared().get(sql) {
            Some(statement) => statement,
            None => {
                let statement = self.client().prepare(sql).await.map_err(|e| self.error(e))?;
                self.prepared().put(sql, statement.clone());
                statement
            }
        };
        self.client().query(&statement, params).await.map_err(|e| self.error(e))
    }

    async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, PgError> {
        self.client().query_opt(sql, params).await.map_err(|e| self.error(e))
    }

    async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, PgError> {
        self.client().execute(sql, params).await.map_err(|e| self.error(e))
    }

    /// Runs one or more statements without parameters.
    async fn batch_execute(&self, sql: &str) -> Result<(), PgError> {
        self.client().batch_execute(sql).await.map_err(|e| self.error(e))
    }

    async fn copy_out(&self, sql: &str) -> Result<CopyOutStream, PgError> {
        self.client().copy_out(sql).await.map_err(|e| self.error(e))
    }

    async fn copy_in(&self, sql: &str) -> Result<CopyInSink<Bytes>, PgError> {
        self.client().copy_in(sql).await.map_err(|e| self.error(e))
    }

    /// Runs `copy ... from stdin` with `data`, whole rows in the
    /// statement's format; returns the rows written.
    async fn copy_from(&self, sql: &str, data: Bytes) -> Result<u64, PgError> {
        let sink = self.copy_in(sql).await?;
        let mut sink = std::pin::pin!(sink);
        sink.feed(data).await.map_err(|e| self.error(e))?;
        sink.as_mut().finish().await.map_err(|e| self.error(e))
    }

    /// Runs a query that prints definitions (`pg_get_indexdef`, ...) under
    /// an empty search_path, so that every name in them comes out
    /// schema-qualified: the target's search_path may differ.
    async fn query_qualified(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, PgError> {
        self.batch_execute("set search_path = ''").await?;
        let rows = self.query(sql, params).await;
        let reset = self.batch_execute("reset search_path").await;
        let rows = rows?;
        reset?;
        Ok(rows)
    }

    /// Parses and plans a statement without running it: every table,
    /// column and function it names must exist on this server.
    async fn prepare_only(&self, sql: &str) -> Result<(), PgError> {
        self.client().prepare(sql).await.map(|_| ()).map_err(|e| self.error(e))
    }

    /// Whether a relation of this name (quoted, qualified) exists.
    async fn relation_exists(&self, name: &str) -> Result<bool, PgError> {
        Ok(self.query_one("select to_regclass($1) is not null", &[&name]).await?.get(0))
    }
}

impl Sql for Conn {
    fn client(&self) -> &Client {
        &self.client
    }
    fn prepared(&self) -> &Prepared {
        &self.prepared
    }
    fn temp_tables(&self) -> &TempTables {
        &self.temp_tables
    }
    fn db(&self) -> &str {
        &self.name
    }
    fn version(&self) -> PgVersion {
        self.version
    }
    fn tables_per_transaction(&self) -> usize {
        self.tables_per_transaction
    }
}

impl Tx<'_> {
    /// Binds `sql` to a portal of this transaction, whose rows
    /// [`Tx::fetch`] reads a slice at a time.
    pub async fn bind(&self, sql: &str, params: Params<'_>) -> Result<Portal, PgError> {
        self.tx.bind(sql, params).await.map_err(|e| self.error(e))
    }

    /// The next `rows` rows of `portal` (fewer: the last).
    pub async fn fetch(&self, portal: &Portal, rows: i32) -> Result<Vec<Row>, PgError> {
        self.tx.query_portal(portal, rows).await.map_err(|e| self.error(e))
    }

    /// Exports this transaction's snapshot for other sessions to import
    /// ([`Conn::imported_snapshot`]): (the exported name, the same snapshot
    /// as txid_snapshot text, which bounds what it saw of the deltas).
    pub async fn export_snapshot(&self) -> Result<(String, String), PgError> {
        let row = self
            .query_one("select pg_export_snapshot(), txid_current_snapshot()::text", &[])
            .await?;
        Ok((row.get(0), row.get(1)))
    }
}

impl Sql for Tx<'_> {
    fn client(&self) -> &Client {
        GenericClient::client(&self.tx)
    }
    fn prepared(&self) -> &Prepared {
        &self.prepared
    }
    fn temp_tables(&self) -> &TempTables {
        &self.temp_tables
    }
    fn db(&self) -> &str {
        &self.name
    }
    fn version(&self) -> PgVersion {
        self.version
    }
    fn tables_per_transaction(&self) -> usize {
        self.tables_per_transaction
    }
}

/// Streams `copy (...) to stdout` on `from` into `copy ... from stdin` on
/// `to`, without decoding: memory stays bounded by the sink's buffer.
/// Returns the rows written and the bytes forwarded, reporting the bytes as
/// they pass.
///
/// The source sends one message per row; rows are gathered into messages
/// of up to [`COPY_CHUNK`] bytes before they go on, and the bytes reported
/// in steps of that size: per row, the sink's flushes and the progress
/// counter cost more than the forwarding (measured: docs/BENCHMARKS.md).
pub async fn copy_between(
    from: &impl Sql,
    copy_out: &str,
    to: &impl Sql,
    copy_in: &str,
    on_bytes: &dyn Fn(u64),
) -> Result<(u64, u64), PgError> {
    forward(from, copy_out, to, copy_in, on_bytes, None).await
}

/// What [`copy_between_marked`] does with a row's mark.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Marked {
    /// The mark is not forwarded, nor is a row whose mark is not NULL.
    Dropped,
    /// Every row goes on as it came, its mark included.
    Forwarded,
}

/// [`copy_between`] where the last column of each row out is a mark: the
/// marks that are not NULL are returned (the rows whose large values move
/// in slices, see `slices`), read from the stream as it passes. Returns
/// the rows written, the bytes forwarded and the marks.
pub async fn copy_between_marked(
    from: &impl Sql,
    copy_out: &str,
    to: &impl Sql,
    copy_in: &str,
    on_bytes: &dyn Fn(u64),
    marked: Marked,
) -> Result<(u64, u64, Vec<String>), PgError> {
    let mut marks = Vec::new();
    let (rows, bytes) =
        forward(from, copy_out, to, copy_in, on_bytes, Some((&mut marks, marked))).await?;
    Ok((rows, bytes, marks))
}

async fn forward(
    from: &impl Sql,
    copy_out: &str,
    to: &impl Sql,
    copy_in: &str,
    on_bytes: &dyn Fn(u64),
    mut marks: Option<(&mut Vec<String>, Marked)>,
) -> Result<(u64, u64), PgError> {
    let out = from.copy_out(copy_out).await?;
    let sink = to.copy_in(copy_in).await?;
    let mut out = std::pin::pin!(out);
    let mut sink = std::pin::pin!(sink);
    let mut bytes = 0u64;
    let mut chunk = bytes::BytesMut::with_capacity(COPY_CHUNK);
    while let Some(row) = out.try_next().await.map_err(|e| from.error(e))? {
        // A marked row in COPY's text format: its fields, a tab, the mark
        // (`\N` for NULL), a newline.
        let (row, newline) = match &mut marks {
            None => (row, false),
            Some((marks, marked)) => {
                let tab = row.iter().rposition(|&b| b == b'\t').unwrap_or(0);
                let mark = &row[(tab + 1).min(row.len())..row.len().saturating_sub(1)];
                let null = mark == b"\\N";
                if !null {
                    marks.push(String::from_utf8_lossy(mark).into_owned());
                }
                match marked {
                    Marked::Forwarded => (row, false),
                    Marked::Dropped if null => (row.slice(..tab), true),
                    Marked::Dropped => continue,
                }
            }
        };
        if row.len() >= COPY_CHUNK {
            // A big row (a large value) goes on as it came, not copied into
            // the chunk first: memory holds it once, not twice (#28).
            if !chunk.is_empty() {
                bytes += chunk.len() as u64;
                on_bytes(chunk.len() as u64);
                sink.feed(chunk.split().freeze()).await.map_err(|e| to.error(e))?;
            }
            bytes += row.len() as u64;
            on_bytes(row.len() as u64);
            sink.feed(row).await.map_err(|e| to.error(e))?;
            if newline {
                chunk.extend_from_slice(b"\n");
            }
            continue;
        }
        chunk.extend_from_slice(&row);
        if newline {
            chunk.extend_from_slice(b"\n");
        }
        if chunk.len() >= COPY_CHUNK {
            bytes += chunk.len() as u64;
            on_bytes(chunk.len() as u64);
            sink.feed(chunk.split().freeze()).await.map_err(|e| to.error(e))?;
            chunk.reserve(COPY_CHUNK);
        }
    }
    if !chunk.is_empty() {
        bytes += chunk.len() as u64;
        on_bytes(chunk.len() as u64);
        sink.feed(chunk.freeze()).await.map_err(|e| to.error(e))?;
    }
    let rows = sink.as_mut().finish().await.map_err(|e| to.error(e))?;
    Ok((rows, bytes))
}

/// How many bytes of rows one forwarded COPY message carries.
const COPY_CHUNK: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::TempTables;

    #[test]
    fn temp_tables_past_the_limit_go_least_recently_used_first() {
        let kept = TempTables::default();
        for name in ["a", "b", "a", "c", "d"] {
            kept.keep(name, 2);
        }
        let state = kept.0.lock().unwrap();
        assert_eq!(state.kept, ["c", "d"]);
        // "a" was used again after "b": "b" went first.
        assert_eq!(state.evicted, ["b", "a"]);
    }
}
