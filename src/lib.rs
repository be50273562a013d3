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
//! - [`capture`]: triggers and delta tables on the source.
//! - [`schema`]: staged schema copy with pg_dump/pg_restore.
//! - [`copy`]: the initial copy, parallel, from one exported snapshot.
//! - [`apply`]: snapshot-delimited batches applied to a target.
//! - [`daemon`]: workers that apply continuously; start, stop, kick.
//! - [`status`]: what each sync is doing.
//! - [`verify`]: source and target compared by digests.
//! - [`cutover`]: fence, drain, finish the target, measure the downtime.
//! - [`upgrade`]: the whole job in one resumable command.
//! - [`cli`]: the command line over all of the above.
//!
//! See docs/ARCHITECTURE.md for the decisions behind them.

pub mod apply;
pub mod capture;
pub mod catalog;
pub mod cli;
pub mod copy;
pub mod cutover;
pub mod daemon;
pub mod error;
pub mod inventory;
pub mod objects;
pub mod pg;
pub mod progress;
pub mod schema;
pub mod status;
pub mod upgrade;
pub mod verify;

pub use error::{Error, Result};
