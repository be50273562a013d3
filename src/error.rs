//! The library's error type. Every variant names the object it is about, and
//! [`Error::hint`] says what the user can do; the binary prints both.

use tokio_postgres::error::SqlState;

use crate::catalog::CatalogError;
use crate::pg::{ConninfoError, PgError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("database \"{db}\": {source}")]
    Conninfo {
        db: String,
        #[source]
        source: ConninfoError,
    },
    /// Resolving, connecting to or querying one database.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// `kick --wait` ran out of time.
    #[error("sync \"{sync}\": target \"{target}\" did not catch up in time (last error: {last})")]
    KickTimeout { sync: String, target: String, last: String },
    /// A captured table's columns changed on the source during the sync.
    #[error(
        "sync \"{sync}\" stopped: columns changed on the source: {}; nothing more is applied \
         until the target matches",
        tables.join("; ")
    )]
    SchemaChanged { sync: String, tables: Vec<String> },
    /// The sync was paused by a schema change and not resumed yet.
    #[error("sync \"{sync}\" is paused: {reason}")]
    Paused { sync: String, reason: String },
    /// `status` or `ready` found a sync that needs attention, or not ready.
    #[error("{message}")]
    NotReady { message: String, hint: String },
    /// `verify` ran and found differences.
    #[error(
        "verify found differences in {tables} table(s) and {objects} schema object(s) of sync \"{sync}\""
    )]
    Differences { sync: String, tables: usize, objects: usize },
    /// Ctrl-C (SIGINT) stopped a command between its recorded steps.
    #[error(
        "interrupted: pgleap {command} stopped; what it had done is kept (each step is recorded, \
         a batch in flight rolled back)"
    )]
    Interrupted { command: String },
    /// A request that cannot be carried out as given.
    #[error("{message}")]
    Invalid { message: String, hint: Option<String> },
    /// A sync's replication slot cannot be read any more (see `decoding`).
    #[error(
        "the replication slot {slot} of sync \"{sync}\" {why} on the source: the changes since \
         its last batch cannot be read from it"
    )]
    SlotLost { sync: String, slot: String, why: String },
    /// One pump would write the deltas of more tables than one transaction
    /// may lock; the batch pumps by slices and tries again.
    #[error(
        "sync \"{sync}\": the slot's changes name {tables} tables, more than one transaction \
         may lock on the source ({limit}); pumping them by slices"
    )]
    PumpTooWide { sync: String, tables: usize, limit: usize },
    /// The daemon's stream of a slot broke while a pump read it.
    #[error("sync \"{sync}\": the stream of replication slot {slot} broke: {why}")]
    StreamBroken { sync: String, slot: String, why: String },
}

impl Error {
    pub fn invalid(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Invalid { message: message.into(), hint: Some(hint.into()) }
    }

    /// Whether the same step may succeed if tried again: a connection lost
    /// or refused, a server starting or shutting down, a lock or
    /// serialization conflict, a server out of resources. Everything else
    /// (a retired sync, a missing table or column, a permission) fails the
    /// same way every time, and is reported at once.
    pub fn is_transient(&self) -> bool {
        use crate::pg::ConnectError;
        match self {
            Self::Pg(PgError::Connect { source, .. }) => {
                matches!(source, ConnectError::Unreachable { .. } | ConnectError::Other { .. })
            }
            Self::Pg(PgError::Query { source, .. }) => match source.code() {
                // No SQLSTATE: the connection itself failed.
                None => true,
                Some(code) => {
                    let code = code.code();
                    ["08", "40", "53", "57P"].iter().any(|class| code.starts_with(class))
                        || code == "55P03"
                        || code == "55006"
                        || concurrent_create(code, source)
                }
            },
            // The next attempt pumps by slices.
            Self::PumpTooWide { .. } => true,
            // The next pump opens the stream again from what was confirmed.
            Self::StreamBroken { .. } => true,
            Self::Catalog(CatalogError::Sqlite { source, .. }) => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            _ => false,
        }
    }

    /// The server's SQLSTATE, when a query failed on the server.
    pub fn sqlstate(&self) -> Option<&SqlState> {
        match self {
            Self::Pg(e) => e.sqlstate(),
            _ => None,
        }
    }

    /// The process exit code: 1 for "ran, but the goal was not reached",
    /// 2 for errors.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::KickTimeout { .. } | Self::Differences { .. } | Self::NotReady { .. } => 1,
            // As a shell reports a command ended by SIGINT.
            Self::Interrupted { .. } => 130,
            _ => 2,
        }
    }

    /// What to do about it, when there is something to say.
    pub fn hint(&self) -> Option<String> {
        match self {
            Self::Catalog(e) => e.hint(),
            Self::Conninfo { .. } => Some(
                "write the connection as a URI (postgresql://user@host:5432/dbname?sslmode=require) \
                 or as key=value pairs (host=... port=... dbname=... user=...)"
                    .into(),
            ),
            Self::Pg(e) => e.hint(),
            Self::Differences { sync, tables, .. } if *tables > 0 => Some(format!(
                "the keys above differ; if the source is still written, run pgleap kick {sync} \
                 --wait and verify again"
            )),
            Self::Differences { .. } => Some(
                "create the objects listed above on the target (pgleap schema copy creates what \
                 it can; a role that is missing: CREATE ROLE ... on the target), then verify again"
                    .into(),
            ),
            Self::SchemaChanged { sync, .. } | Self::Paused { sync, .. } => Some(format!(
                "make the same change on the target (ALTER TABLE ... as on the source), then \
                 pgleap sync resume {sync}; nothing is applied until then (changes keep being \
                 captured on the source)"
            )),
            Self::KickTimeout { sync, .. } => {
                Some(format!("pgleap status {sync} shows the last error of each target"))
            }
            Self::Invalid { hint, .. } => hint.clone().filter(|h| !h.is_empty()),
            Self::SlotLost { sync, .. } => Some(format!(
                "a slot is lost with a failover to a standby that did not have it (before \
                 PostgreSQL 17's failover slots), dropped by hand, or invalidated past \
                 max_slot_wal_keep_size; the sync's next batch (the daemon's, or pgleap kick \
                 {sync}) captures its tables by triggers instead and copies them again"
            )),
            Self::PumpTooWide { .. } => Some(
                "nothing to do: the next attempt writes them a slice of tables at a time; to \
                 pump in fewer, larger slices raise max_locks_per_transaction (a restart)"
                    .into(),
            ),
            Self::StreamBroken { .. } => Some(
                "nothing to do if it does not recur: the next batch opens the stream again from \
                 what the slot confirmed; without PGLEAP_DECODING_STREAM=1 in its environment \
                 the daemon reads the slot through the SQL functions instead"
                    .into(),
            ),
            Self::NotReady { hint, .. } => Some(hint.clone()),
            Self::Interrupted { command } => Some(format!(
                "run pgleap {command} again to resume from where it stopped; pgleap status shows \
                 where each sync is"
            )),
        }
    }
}

/// Two sessions creating the same object at once: a backend of a killed
/// pgleap still building an index, or the daemon and a kick preparing the
/// same target. The loser sees a duplicate (or a unique violation on a
/// system catalog); the object exists when it tries again, and pgleap
/// creates only what is missing.
fn concurrent_create(code: &str, e: &tokio_postgres::Error) -> bool {
    matches!(code, "42P07" | "42710" | "42P06")
        || (code == "23505"
            && e.as_db_error().and_then(|d| d.constraint()).is_some_and(|c| c.starts_with("pg_")))
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
