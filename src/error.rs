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
    /// `verify` ran and found differences.
    #[error("verify found differences in {tables} table(s) of sync \"{sync}\"")]
    Differences { sync: String, tables: usize },
    /// A request that cannot be carried out as given.
    #[error("{message}")]
    Invalid { message: String, hint: Option<String> },
}

impl Error {
    pub fn invalid(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Invalid { message: message.into(), hint: Some(hint.into()) }
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
            Self::KickTimeout { .. } | Self::Differences { .. } => 1,
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
            Self::Differences { sync, .. } => Some(format!(
                "the keys above differ; if the source is still written, run pgleap kick {sync} \
                 --wait and verify again"
            )),
            Self::KickTimeout { sync, .. } => {
                Some(format!("pgleap status {sync} shows the last error of each target"))
            }
            Self::Invalid { hint, .. } => hint.clone().filter(|h| !h.is_empty()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
