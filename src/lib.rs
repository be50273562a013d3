//! pgleap moves a live PostgreSQL database to another server or major version
//! with seconds of write downtime, using nothing but a table owner's
//! privileges on both servers.
//!
//! The modules follow the job, lower layers first:
//!
//! - `pg`: connecting (libpq connection strings, TLS), the named connection
//!   and its SQL surface, quoting, versions.
//! - `failpoint`: named points where a test makes pgleap die as kill -9
//!   would.
//! - `catalog`: pgleap's own state, an embedded SQLite file.
//! - `route`: what the catalog's names stand for (a database's connection
//!   settings; a sync's relgroup, source and targets).
//! - `inventory`: what a source database holds (tables, keys, sizes).
//! - `capture`: triggers and delta tables on the source.
//! - `decoding`: capture from a logical replication slot, where the source
//!   allows it.
//! - `large_objects`: large objects copied, synced by passes, compared.
//! - `slices`: values too large to travel whole, moved in slices.
//! - `apply`: snapshot-delimited batches applied to a target.
//! - `sequences`: the relgroup's sequences carried to a target.
//! - `target`: pgleap's bookkeeping on a target; its foreign keys and
//!   triggers while the sync runs.
//! - `fidelity`: every object of both sides compared by definition, and
//!   created on the target at the stage where it belongs.
//! - `dump`: pg_dump, pg_restore and psql chosen for a source and target
//!   pair; their script adapted to the target.
//! - `schema`: staged schema copy with pg_dump/pg_restore; indexes.
//! - `evolve`: schema changes on the source during a sync: followed, or
//!   the sync paused.
//! - `copy`: the initial copy, parallel, from one exported snapshot.
//! - `session`: one sync applied to one target over open connections; kick.
//! - `objects`: declaring databases, dbgroups, relgroups and syncs.
//! - `status`: what each sync is doing.
//! - `web`: the daemon's metrics and status page.
//! - `daemon`: the process: workers, signals, pid and log files.
//! - `verify`: source and target compared by digests.
//! - `switch`: moving the application inside the fence: PgBouncer or a
//!   command.
//! - `cutover`: fence, drain, finish the target, measure the downtime;
//!   rollback.
//! - `upgrade`: the whole job in one resumable command.
//! - `server`: a whole server moved: every database, the roles they
//!   need, one cutover.
//! - `queries`: every catalog query above, gathered and prepared on a
//!   server (`db check-queries`).
//! - `cli`: the command line over all of the above.
//!
//! Only the command line and the error type are public: the binary is the
//! interface. See docs/ARCHITECTURE.md for the decisions behind them.

mod apply;
mod backlog;
mod capture;
mod catalog;
pub mod cli;
mod copy;
mod cutover;
mod daemon;
mod decoding;
mod dump;
mod error;
mod evolve;
mod failpoint;
mod fidelity;
mod inventory;
mod large_objects;
mod objects;
mod pg;
mod progress;
mod queries;
mod route;
mod schema;
mod sequences;
mod server;
mod session;
mod slices;
mod status;
mod switch;
mod target;
mod upgrade;
mod verify;
mod web;

pub use error::{Error, Result};
