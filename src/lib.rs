//! pgleap moves a live PostgreSQL database to another server or major version
//! with seconds of write downtime, using nothing but a table owner's
//! privileges on both servers.
//!
//! The modules follow the job:
//!
//! - [`pg`]: connecting (libpq connection strings, TLS), quoting, versions.
//! - [`catalog`]: pgleap's own state, an embedded SQLite file.
//! - [`inventory`]: what a source database holds (tables, keys, sizes).
//! - [`objects`]: declaring databases, dbgroups, relgroups and syncs.
//! - [`cli`]: the command line over all of the above.
//!
//! See docs/ARCHITECTURE.md for the decisions behind them.

pub mod catalog;
pub mod cli;
pub mod error;
pub mod inventory;
pub mod objects;
pub mod pg;

pub use error::{Error, Result};
