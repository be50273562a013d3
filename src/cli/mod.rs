//! The command line: clap definitions, and the glue that turns them into
//! library calls and prints the results. Nothing outside this module knows
//! about clap or how output looks.

mod logs;
mod render;

pub use logs::init as init_logging;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::catalog::{Catalog, OneTimeCopy};
use crate::error::{Error, Result};
use crate::inventory::Selection;
use crate::objects::{self, DbChanges, DbSpec, SyncSpec};
use crate::pg::{ConnParams, Env};
use crate::route::DbConn;
use crate::{daemon, session, status};

/// Move a live PostgreSQL database to a new server or major version.
#[derive(Debug, Parser)]
#[command(name = "pgleap", version, propagate_version = true)]
pub struct Cli {
    /// The catalog file holding pgleap's state.
    #[arg(long, global = true, env = "PGLEAP_CATALOG", value_name = "PATH")]
    pub catalog: Option<PathBuf>,

    /// Log more (-v: debug, -vv: trace). PGLEAP_LOG takes a tracing filter.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Log lines as text, or as one JSON object each (for log shippers;
    /// the daemon started in the background logs the same way).
    #[arg(long, global = true, env = "PGLEAP_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// No progress bars or progress lines: only results, warnings and
    /// errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Databases: named connections.
    #[command(subcommand)]
    Db(DbCommand),
    /// Groups of databases: one source and its targets.
    #[command(subcommand)]
    Dbgroup(DbGroupCommand),
    /// Groups of tables and sequences of one source database.
    #[command(subcommand)]
    Relgroup(RelGroupCommand),
    /// Syncs: a relgroup replicated along a dbgroup.
    #[command(subcommand)]
    Sync(SyncCommand),
    /// The schema: copied from a source database to a target.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Start the sync daemon (in the background unless --foreground).
    Start {
        /// Stay in the foreground and log to stderr (for systemd).
        #[arg(long)]
        foreground: bool,
        /// Where to serve the status page (/), /metrics and /api/status;
        /// `off` for nowhere.
        #[arg(long, env = "PGLEAP_LISTEN", default_value = daemon::DEFAULT_LISTEN,
              value_name = "ADDR")]
        listen: String,
    },
    /// Stop the sync daemon; the batch in flight commits or rolls back.
    Stop {
        /// How long to wait for it to exit.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        timeout: u64,
    },
    /// Show what the syncs are doing (phase, last rounds, pending changes,
    /// lag); exit 1 when one needs attention (bad, unreachable, or nothing
    /// applying while autokick is on).
    Status {
        sync: Option<String>,
        #[arg(long)]
        json: bool,
        /// Every field of every sync, one per line (as for a named sync).
        #[arg(short = 'x', long)]
        expanded: bool,
        /// Refresh every SECONDS until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
    },
    /// Can SYNC be cut over now? Says why not, exit 0 (yes) or 1 (no).
    Ready {
        sync: String,
        /// The lag a cutover accepts (it catches up the rest inside).
        #[arg(long, default_value_t = 5, value_name = "SECONDS")]
        max_lag: u64,
    },
    /// Apply a sync's pending changes now.
    Kick {
        sync: String,
        /// Wait until the targets have everything committed before the kick;
        /// exit 1 if that takes longer than SECONDS.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
        /// Parallel workers for an initial copy (default: one per core).
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
    },
    /// Compare source and target table by table (counts, chunked checksums).
    Verify {
        sync: String,
        /// Only this table (repeatable), as shown by relgroup show.
        #[arg(long = "table", value_name = "TABLE")]
        tables: Vec<String>,
        /// Compare as things are, without catching the target up first.
        #[arg(long)]
        no_kick: bool,
        /// Compare only what changed since the last verify that ended: the
        /// parts it found equal that no batch touched since are taken as
        /// they were (a quick check before the cutover).
        #[arg(long, conflicts_with = "no_kick")]
        incremental: bool,
        #[arg(long)]
        json: bool,
    },
    /// Switch to the target: fence writes on the source, drain, set
    /// sequences, add foreign keys and triggers, report the write downtime.
    Cutover {
        sync: String,
        /// Catch up until the oldest pending change is younger than this.
        #[arg(long, default_value_t = 5, value_name = "SECONDS")]
        max_lag: u64,
        /// Also end the source's other sessions and make it read-only.
        #[arg(long)]
        terminate: bool,
        /// Added to every sequence value on the target.
        #[arg(long, default_value_t = 0, value_name = "N")]
        sequence_margin: i64,
        /// Rehearse every step except the fence, and predict the fence time.
        #[arg(long)]
        dry_run: bool,
        /// Also create (and start) a sync NAME from the new server back to
        /// the old one, capturing before the new server takes writes.
        #[arg(long, value_name = "NAME")]
        rollback_sync: Option<String>,
        /// Switch even though schema objects are missing or different on
        /// the target (verify lists them).
        #[arg(long)]
        allow_schema_differences: bool,
        /// Of a sync with several targets, the one the application moves
        /// to; the others are brought to the same final state inside the
        /// fence and then left as they are, unless --keep-others.
        #[arg(long, value_name = "TARGET")]
        to: Option<String>,
        /// Also create (and start) a sync NAME from the new server to the
        /// sync's other targets, so that they keep following it.
        #[arg(long, value_name = "NAME", requires = "to")]
        keep_others: Option<String>,
        #[command(flatten)]
        switch: SwitchArgs,
        #[arg(long)]
        json: bool,
    },
    /// After a cutover with --rollback-sync: move the writes back to the old
    /// server (fence the new one, drain the sync back, sequences, switch the
    /// poolers or run the command, lift the old server's fence).
    Rollback {
        /// The sync that was cut over.
        sync: String,
        /// Catch up until the oldest pending change is younger than this.
        #[arg(long, default_value_t = 5, value_name = "SECONDS")]
        max_lag: u64,
        #[command(flatten)]
        switch: SwitchArgs,
        #[arg(long)]
        json: bool,
    },
    /// The whole job: preflight, schema, capture, initial copy, sync, verify,
    /// cutover. Rerun it after an interruption to resume.
    Upgrade {
        /// The server to leave (libpq URI or key=value string, no password).
        #[arg(long, value_name = "CONNSTR")]
        source: String,
        /// The server to move to.
        #[arg(long, value_name = "CONNSTR")]
        target: String,
        /// Names the catalog entries (NAME_source, NAME_target, and the
        /// relgroup, dbgroup and sync NAME).
        #[arg(long, default_value = "upgrade")]
        name: String,
        /// Parallel copy workers (default: one per core).
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// Cut over by itself (auto), after asking (prompt), or not (never).
        #[arg(long, value_enum, default_value = "prompt")]
        cutover: CutoverArg,
        /// Cutover waits until the oldest pending change is younger than this.
        #[arg(long, default_value_t = 5, value_name = "SECONDS")]
        max_lag: u64,
        /// Where pg_dump and pg_restore are (default: PATH, /usr/lib/postgresql/*/bin,
        /// and what scripts/install-pg client installed).
        #[arg(long, value_name = "DIR")]
        pg_bin: Option<PathBuf>,
        /// Create the roles the source's grants and policies name and the
        /// target lacks (NOLOGIN, no password).
        #[arg(long)]
        create_roles: bool,
        /// Cut over even though schema objects are missing or different on
        /// the target.
        #[arg(long)]
        allow_schema_differences: bool,
        /// Replace the rows the target's tables hold already (refused
        /// without it: a mistyped --target would lose its data).
        #[arg(long)]
        overwrite_target: bool,
        /// Move the whole server: every database the role can connect to
        /// (not templates, postgres, or a managed service's own), the roles
        /// they need, with one cutover. --source and --target then name the
        /// servers (their dbname, default postgres, is where the databases
        /// are listed); each database's entries are NAME.DB.
        #[arg(long, conflicts_with = "databases")]
        all_databases: bool,
        /// Move these databases of the server, as --all-databases does.
        #[arg(long, value_name = "DB,...", value_delimiter = ',')]
        databases: Vec<String>,
        /// Arm a sync back to the old server inside the fence (NAME_back,
        /// for a server NAME.DB_back each), so that pgleap rollback NAME
        /// moves the application back without losing its new writes.
        #[arg(long)]
        rollback: bool,
        /// With --all-databases/--databases: create the roles that log in
        /// on the source with LOGIN (still without a password, which a
        /// non-superuser cannot read: for servers that authenticate them by
        /// certificate, LDAP or the like). Default NOLOGIN.
        #[arg(long)]
        login_roles: bool,
        /// How keyed tables are captured (as sync add --trigger-level).
        #[arg(long, value_enum, default_value = "statement")]
        trigger_level: TriggerLevel,
        /// Triggers or logical decoding (as sync add --capture).
        #[arg(long, value_enum, default_value = "auto")]
        capture: CaptureArg,
        /// The final report as JSON on stdout (each step's time and share,
        /// the preflight, the cutover's steps); progress goes to stderr.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        switch: SwitchArgs,
    },
    /// Remove everything a sync created on its servers, and the sync.
    Teardown {
        sync: String,
        /// After a cutover: also remove the old server's fence (and the
        /// read-only default of --terminate), so that it takes writes again.
        #[arg(long)]
        unfence: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SchemaCommand {
    /// Create the source's tables, types, functions, sequences and views on
    /// the target; indexes follow the data (initial copy, or --with-indexes);
    /// foreign keys and triggers wait for cutover.
    Copy {
        #[arg(long, value_name = "DB")]
        from: String,
        #[arg(long, value_name = "DB")]
        to: String,
        /// Only this schema (repeatable).
        #[arg(long = "schema", value_name = "SCHEMA")]
        schemas: Vec<String>,
        /// Where pg_dump and pg_restore are (default: PATH, then /usr/lib/postgresql/*/bin).
        #[arg(long, value_name = "DIR")]
        pg_bin: Option<PathBuf>,
        /// Also create indexes and key constraints now (when no initial copy follows).
        #[arg(long)]
        with_indexes: bool,
        /// Create the roles that the source's grants and policies name and
        /// the target lacks (NOLOGIN, no password).
        #[arg(long)]
        create_roles: bool,
    },
}

impl Command {
    /// The name of a long command that Ctrl-C may stop between its recorded
    /// steps (the daemon handles its signals itself).
    fn interruptible(&self) -> Option<&'static str> {
        match self {
            Command::Upgrade { .. } => Some("upgrade"),
            Command::Kick { .. } => Some("kick"),
            Command::Verify { .. } => Some("verify"),
            Command::Cutover { .. } => Some("cutover"),
            Command::Rollback { .. } => Some("rollback"),
            _ => None,
        }
    }

    /// Whether this command runs the daemon (which logs at info by default).
    pub fn is_daemon(&self) -> bool {
        matches!(self, Command::Start { foreground: true, .. })
    }
}

/// How the application moves at the switch point (cutover, rollback,
/// upgrade).
#[derive(Debug, Args, Default)]
pub struct SwitchArgs {
    /// A PgBouncer admin console (connection string, dbname pgbouncer) whose
    /// database --pgbouncer-db is paused before the fence, pointed at the new
    /// server inside it, and resumed after (repeatable).
    #[arg(long = "pgbouncer", value_name = "ADMIN_CONNSTR")]
    pub pgbouncers: Vec<String>,
    /// The pooler's database name that clients use.
    #[arg(long, value_name = "NAME")]
    pub pgbouncer_db: Option<String>,
    /// The pooler's ini file, in the order of --pgbouncer (default: the file
    /// it reports in SHOW CONFIG).
    #[arg(long = "pgbouncer-ini", value_name = "PATH")]
    pub pgbouncer_inis: Vec<PathBuf>,
    /// A shell command run inside the fence after the drain, with PGHOST,
    /// PGPORT, PGDATABASE and PGUSER of the new server (never a password);
    /// a non-zero exit aborts and unfences.
    #[arg(long, value_name = "CMD")]
    pub switch_command: Option<String>,
    /// How long the switch command may run.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub switch_timeout: u64,
    /// How long PAUSE may wait for the pooler's transactions in flight.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub pause_timeout: u64,
}

impl SwitchArgs {
    /// `server`: a server move, whose poolers' entries are named like the
    /// databases (no --pgbouncer-db).
    fn plan(self, server: bool) -> Result<crate::switch::SwitchPlan> {
        if !server && !self.pgbouncers.is_empty() && self.pgbouncer_db.is_none() {
            return Err(Error::invalid(
                "--pgbouncer needs --pgbouncer-db",
                "give the database name the application connects to in the pooler",
            ));
        }
        if self.pgbouncer_inis.len() > self.pgbouncers.len() {
            return Err(Error::invalid(
                "more --pgbouncer-ini than --pgbouncer",
                "give one ini file per pooler, in the same order",
            ));
        }
        let db = self.pgbouncer_db.unwrap_or_default();
        let inis = self.pgbouncer_inis;
        let bouncers = self
            .pgbouncers
            .into_iter()
            .enumerate()
            .map(|(i, admin)| crate::switch::Bouncer {
                admin,
                db: db.clone(),
                ini: inis.get(i).cloned(),
            })
            .collect();
        Ok(crate::switch::SwitchPlan {
            bouncers,
            command: self.switch_command,
            pause_timeout: Duration::from_secs(self.pause_timeout),
            command_timeout: Duration::from_secs(self.switch_timeout),
        })
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub name: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    pub name: String,
}

/// Connection fields; each sets one libpq keyword over --dsn.
#[derive(Debug, Args, Default)]
pub struct ConnArgs {
    /// A libpq connection string: postgresql://user@host:5432/db?sslmode=... or key=value pairs.
    #[arg(long, value_name = "CONNSTR")]
    pub dsn: Option<String>,
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long)]
    pub dbname: Option<String>,
    #[arg(long)]
    pub user: Option<String>,
    /// disable, allow, prefer, require, verify-ca or verify-full.
    #[arg(long)]
    pub sslmode: Option<String>,
    /// A file holding the password; pgleap reads it at each connection.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Store the password (from the connection string or PGPASSWORD) in the catalog, which is then made readable by its owner only.
    #[arg(long)]
    pub store_password: bool,
}

impl ConnArgs {
    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = Vec::new();
        if let Some(v) = &self.host {
            f.push(("host", v.clone()));
        }
        if let Some(v) = self.port {
            f.push(("port", v.to_string()));
        }
        if let Some(v) = &self.dbname {
            f.push(("dbname", v.clone()));
        }
        if let Some(v) = &self.user {
            f.push(("user", v.clone()));
        }
        if let Some(v) = &self.sslmode {
            f.push(("sslmode", v.clone()));
        }
        f
    }

    fn dsn(&self, name: &str) -> Result<Option<ConnParams>> {
        self.dsn
            .as_deref()
            .map(ConnParams::parse)
            .transpose()
            .map_err(|source| Error::Conninfo { db: name.into(), source })
    }
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Add a database; pgleap connects to it before saving.
    Add {
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List databases.
    List(ListArgs),
    /// Show one database.
    Show(ShowArgs),
    /// Change a database's connection; pgleap connects before saving.
    Update {
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
        /// Stop using a password file.
        #[arg(long, conflicts_with = "password_file")]
        no_password_file: bool,
        /// Delete a password stored in the catalog.
        #[arg(long, conflicts_with = "store_password")]
        forget_password: bool,
    },
    /// Prepare every catalog query pgleap builds for this database's server
    /// version, without running any; exit 2 naming those it refuses.
    CheckQueries { name: String },
    /// Remove a database.
    Remove {
        name: String,
        /// Also take it out of the dbgroups that name it.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DbGroupCommand {
    /// Add a dbgroup: exactly one DB:source and one or more DB:target.
    Add {
        name: String,
        #[arg(required = true, value_name = "DB:ROLE")]
        members: Vec<String>,
    },
    /// List dbgroups.
    List(ListArgs),
    /// Show one dbgroup.
    Show(ShowArgs),
    /// Remove a dbgroup.
    Remove(RemoveArgs),
}

#[derive(Debug, Subcommand)]
pub enum RelGroupCommand {
    /// Add a relgroup; the names are resolved on the database now.
    Add {
        name: String,
        /// The source database the tables live in.
        #[arg(long)]
        db: String,
        /// Every table (in the --schema schemas, if given).
        #[arg(long)]
        all_tables: bool,
        /// Every sequence (in the --schema schemas, if given).
        #[arg(long)]
        all_sequences: bool,
        /// Take every table of this schema (repeatable).
        #[arg(long = "schema", value_name = "SCHEMA")]
        schemas: Vec<String>,
        /// Leave this schema out (repeatable).
        #[arg(long = "exclude-schema", value_name = "SCHEMA")]
        exclude_schemas: Vec<String>,
        /// A table, as SCHEMA.NAME in SQL syntax (repeatable).
        #[arg(long = "table", value_name = "SCHEMA.NAME")]
        tables: Vec<String>,
        /// Leave this table out (repeatable).
        #[arg(long = "exclude-table", value_name = "SCHEMA.NAME")]
        exclude_tables: Vec<String>,
        /// A sequence, as SCHEMA.NAME (repeatable).
        #[arg(long = "sequence", value_name = "SCHEMA.NAME")]
        sequences: Vec<String>,
        /// Tables without a usable key: replicate them by whole-row images
        /// (allow), or refuse them.
        #[arg(long, value_enum, default_value = "allow")]
        keyless: KeylessArg,
        /// Migrate the database's large objects too (the default when it
        /// has any).
        #[arg(long, overrides_with = "no_large_objects")]
        large_objects: bool,
        /// Leave the database's large objects out.
        #[arg(long)]
        no_large_objects: bool,
    },
    /// List relgroups.
    List(ListArgs),
    /// Show one relgroup with its members, keys and sizes.
    Show(ShowArgs),
    /// Remove a relgroup.
    Remove(RemoveArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CutoverArg {
    Prompt,
    Auto,
    Never,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KeylessArg {
    Allow,
    Refuse,
}

/// Which triggers capture a keyed table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TriggerLevel {
    Statement,
    Row,
}

/// How a sync's keyed tables are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CaptureArg {
    Auto,
    Triggers,
    Decoding,
}

impl From<CaptureArg> for crate::decoding::Method {
    fn from(c: CaptureArg) -> Self {
        match c {
            CaptureArg::Auto => Self::Auto,
            CaptureArg::Triggers => Self::Triggers,
            CaptureArg::Decoding => Self::Decoding,
        }
    }
}

/// Bucardo's onetimecopy values, with its numbers as aliases.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OneTimeCopyArg {
    #[value(alias = "0")]
    Never,
    #[value(alias = "1")]
    Always,
    #[value(alias = "2")]
    IfEmpty,
}

impl From<OneTimeCopyArg> for OneTimeCopy {
    fn from(v: OneTimeCopyArg) -> Self {
        match v {
            OneTimeCopyArg::Never => OneTimeCopy::Never,
            OneTimeCopyArg::Always => OneTimeCopy::Always,
            OneTimeCopyArg::IfEmpty => OneTimeCopy::IfEmpty,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl From<OnOff> for bool {
    fn from(v: OnOff) -> bool {
        matches!(v, OnOff::On)
    }
}

#[derive(Debug, Subcommand)]
pub enum SyncCommand {
    /// Add a sync of a relgroup along a dbgroup.
    Add {
        name: String,
        #[arg(long)]
        relgroup: String,
        #[arg(long)]
        dbgroup: String,
        /// Copy the data first: never, always, or only into empty tables (Bucardo's 0/1/2).
        #[arg(long, value_enum, default_value = "if-empty")]
        onetimecopy: OneTimeCopyArg,
        /// Wake on source commits (on) or only when kicked (off).
        #[arg(long, value_enum, default_value = "on")]
        autokick: OnOff,
        /// Allow a target of a lower major version than the source.
        #[arg(long)]
        allow_downgrade: bool,
        /// The schema pgleap creates on the servers for its own objects.
        #[arg(long, default_value = "pgleap", value_name = "SCHEMA")]
        capture_schema: String,
        /// Seconds between two passes over the large objects (0: every
        /// round); each pass finds created and unlinked objects and
        /// re-digests a bounded number of the others.
        #[arg(long, default_value_t = 10, value_name = "SECONDS")]
        large_objects_every: u32,
        /// How keyed tables are captured: statement triggers (a statement's
        /// keys in a few delta rows: cheapest for bulk statements) or row
        /// triggers (a delta row per changed row: cheapest for one-row
        /// statements, as most OLTP writes are). See docs/BENCHMARKS.md.
        #[arg(long, value_enum, default_value = "statement")]
        trigger_level: TriggerLevel,
        /// How keyed tables are captured: by logical decoding where the
        /// source allows it (wal_level = logical, a role with REPLICATION),
        /// which costs the application's transactions nothing, else by
        /// triggers (auto); or always one of them.
        #[arg(long, value_enum, default_value = "auto")]
        capture: CaptureArg,
    },
    /// List syncs.
    List(ListArgs),
    /// Show one sync.
    Show(ShowArgs),
    /// Change a sync's options.
    Update {
        name: String,
        #[arg(long, value_enum)]
        onetimecopy: Option<OneTimeCopyArg>,
        #[arg(long, value_enum)]
        autokick: Option<OnOff>,
        #[arg(long, value_name = "SECONDS")]
        large_objects_every: Option<u32>,
    },
    /// Remove a sync and everything it created on its servers (as teardown).
    Remove(RemoveArgs),
    /// Let a sync paused by a schema change go on, once the target was
    /// changed the same way.
    Resume { name: String },
}

/// Runs a parsed command line: opens the catalog and hands the command to
/// the function of its group.
pub async fn run(cli: Cli) -> Result<()> {
    if cli.log_format == LogFormat::Json {
        daemon::log_json();
    }
    let Some(command) = cli.command.interruptible() else {
        return run_command(cli).await;
    };
    // Ctrl-C stops the command between recorded steps, saying so and how
    // to resume (dropping the work closes its connections: a batch in
    // flight rolls back, and applying it again later is harmless). Inside a
    // cutover's fence the switch is completed or undone first.
    let work = run_command(cli);
    tokio::pin!(work);
    loop {
        tokio::select! {
            result = &mut work => return result,
            _ = tokio::signal::ctrl_c() => {
                if crate::cutover::inside_fence() {
                    eprintln!(
                        "interrupt: the cutover is inside its fence; it completes or undoes the \
                         switch first (seconds)"
                    );
                    continue;
                }
                return Err(Error::Interrupted { command: command.into() });
            }
        }
    }
}

async fn run_command(cli: Cli) -> Result<()> {
    let path = cli.catalog.clone().unwrap_or_else(Catalog::default_path);
    let mut catalog = Catalog::open(&path)?;
    let c = &mut catalog;
    match cli.command {
        Command::Db(cmd) => db(c, cmd).await,
        Command::Dbgroup(cmd) => dbgroup(c, cmd),
        Command::Relgroup(cmd) => relgroup(c, cmd).await,
        Command::Sync(cmd) => sync(c, cmd).await,
        Command::Schema(cmd) => schema(c, cmd).await,
        Command::Verify { sync, tables, no_kick, incremental, json } => {
            verify(c, sync, &tables, no_kick, incremental, json).await
        }
        cmd @ (Command::Cutover { .. } | Command::Rollback { .. }) => cutover(c, cmd).await,
        cmd @ Command::Upgrade { .. } => upgrade(c, cmd).await,
        Command::Teardown { sync: name, unfence } => {
            // A server move's name tears down each of its databases' syncs.
            let mut fenced = false;
            for sync in crate::server::syncs_named(c, &name)? {
                fenced |= objects::teardown(c, &sync, unfence, ENV).await?;
                println!("removed sync \"{sync}\" and its objects on the servers");
            }
            if fenced {
                println!(
                    "the old server keeps refusing writes to the migrated tables (its fence stays, \
                     in the capture schema); pgleap never reopens it silently: drop that schema \
                     (drop schema pgleap cascade) on the old server when it may take writes again"
                );
            }
            Ok(())
        }
        cmd => {
            drop(catalog);
            daemon(&path, cmd).await
        }
    }
}

const ENV: Env<'static> = &crate::pg::process_env;

/// `pgleap db ...`
async fn db(catalog: &mut Catalog, cmd: DbCommand) -> Result<()> {
    match cmd {
        DbCommand::Add { name, conn } => {
            let mut params = conn.dsn(&name)?.unwrap_or_default();
            for (key, value) in conn.fields() {
                params
                    .set(key, &value)
                    .map_err(|source| Error::Conninfo { db: name.clone(), source })?;
            }
            let spec = DbSpec {
                params,
                password_file: conn.password_file,
                store_password: conn.store_password,
            };
            let added = objects::add_db(catalog, &name, spec, ENV).await?;
            println!(
                "added database \"{}\": PostgreSQL {} at {}",
                added.name, added.server_version, added.target
            );
        }
        DbCommand::List(args) => render::dbs(&catalog.dbs()?, args.json),
        DbCommand::Show(args) => {
            let db = catalog.db(&args.name)?;
            let users = catalog.db_users(&args.name)?;
            render::db(&db, &users, args.json);
        }
        DbCommand::Update { name, conn, no_password_file, forget_password } => {
            let changes = DbChanges {
                dsn: conn.dsn(&name)?,
                fields: conn.fields(),
                password_file: if no_password_file {
                    Some(None)
                } else {
                    conn.password_file.map(Some)
                },
                store_password: conn.store_password,
                forget_password,
            };
            let updated = objects::update_db(catalog, &name, changes, ENV).await?;
            println!(
                "updated database \"{}\": PostgreSQL {} at {}",
                updated.name, updated.server_version, updated.target
            );
        }
        DbCommand::CheckQueries { name } => {
            let check = crate::queries::check(catalog, &name, ENV).await?;
            for (query, message) in &check.refused {
                println!("refused: {query}: {message}");
            }
            if !check.refused.is_empty() {
                return Err(Error::invalid(
                    format!(
                        "PostgreSQL {} refused {} of pgleap's {} catalog queries",
                        check.server_version,
                        check.refused.len(),
                        check.prepared
                    ),
                    "this server's release is not one pgleap supports yet; report the queries above",
                ));
            }
            println!(
                "PostgreSQL {} prepared all {} of pgleap's catalog queries",
                check.server_version, check.prepared
            );
        }
        DbCommand::Remove { name, force } => {
            catalog.remove_db(&name, force)?;
            println!("removed database \"{name}\"");
        }
    }
    Ok(())
}

/// `pgleap dbgroup ...`
fn dbgroup(catalog: &mut Catalog, cmd: DbGroupCommand) -> Result<()> {
    match cmd {
        DbGroupCommand::Add { name, members } => {
            objects::add_dbgroup(catalog, &name, &members)?;
            println!("added dbgroup \"{name}\"");
        }
        DbGroupCommand::List(args) => render::dbgroups(&catalog.dbgroups()?, args.json),
        DbGroupCommand::Show(args) => render::dbgroups(&[catalog.dbgroup(&args.name)?], args.json),
        DbGroupCommand::Remove(args) => {
            catalog.remove_dbgroup(&args.name)?;
            println!("removed dbgroup \"{}\"", args.name);
        }
    }
    Ok(())
}

/// `pgleap relgroup ...`
async fn relgroup(catalog: &mut Catalog, cmd: RelGroupCommand) -> Result<()> {
    match cmd {
        RelGroupCommand::Add {
            name,
            db,
            all_tables,
            all_sequences,
            schemas,
            exclude_schemas,
            tables,
            exclude_tables,
            sequences,
            keyless,
            large_objects,
            no_large_objects,
        } => {
            let selection = Selection {
                refuse_keyless: matches!(keyless, KeylessArg::Refuse),
                all_tables,
                all_sequences,
                schemas,
                exclude_schemas,
                tables,
                exclude_tables,
                sequences,
                large_objects: if no_large_objects {
                    Some(false)
                } else {
                    large_objects.then_some(true)
                },
            };
            let group = objects::add_relgroup(catalog, &name, &db, &selection, ENV).await?;
            let tables = group.members.iter().filter(|m| m.kind != "sequence").count();
            println!(
                "added relgroup \"{name}\": {tables} table(s), {} sequence(s) of database \"{db}\"",
                group.members.len() - tables
            );
            render::keyless_warning(&group);
        }
        RelGroupCommand::List(args) => render::relgroups(&catalog.relgroups()?, args.json),
        RelGroupCommand::Show(args) => {
            let group = catalog.relgroup(&args.name)?;
            render::relgroup(&group, args.json);
            if !args.json {
                render::keyless_warning(&group);
            }
        }
        RelGroupCommand::Remove(args) => {
            catalog.remove_relgroup(&args.name)?;
            println!("removed relgroup \"{}\"", args.name);
        }
    }
    Ok(())
}

/// `pgleap sync ...`
async fn sync(catalog: &mut Catalog, cmd: SyncCommand) -> Result<()> {
    match cmd {
        SyncCommand::Add {
            name,
            relgroup,
            dbgroup,
            onetimecopy,
            autokick,
            allow_downgrade,
            capture_schema,
            large_objects_every,
            trigger_level,
            capture,
        } => {
            let spec = SyncSpec {
                name: name.clone(),
                relgroup,
                dbgroup,
                onetimecopy: onetimecopy.into(),
                autokick: autokick.into(),
                allow_downgrade,
                capture_schema,
                lo_interval: large_objects_every,
                row_triggers: trigger_level == TriggerLevel::Row,
                capture: capture.into(),
            };
            objects::add_sync(catalog, &spec, ENV).await?;
            println!("added sync \"{name}\"; capture is installed on the source");
        }
        SyncCommand::List(args) => render::syncs(&catalog.syncs()?, args.json),
        SyncCommand::Show(args) => {
            let sync = catalog.sync(&args.name)?;
            let relgroup = catalog.relgroup(&sync.relgroup)?;
            let dbgroup = catalog.dbgroup(&sync.dbgroup)?;
            render::sync(&sync, &relgroup, &dbgroup, args.json);
        }
        SyncCommand::Update { name, onetimecopy, autokick, large_objects_every } => {
            if onetimecopy.is_none() && autokick.is_none() && large_objects_every.is_none() {
                return Err(Error::invalid(
                    format!("nothing to change for sync \"{name}\""),
                    "give --onetimecopy, --autokick and/or --large-objects-every",
                ));
            }
            let (onetimecopy, autokick) = (onetimecopy.map(Into::into), autokick.map(Into::into));
            catalog.update_sync(&name, onetimecopy, autokick, large_objects_every)?;
            println!("updated sync \"{name}\"");
        }
        SyncCommand::Remove(args) => {
            objects::teardown(catalog, &args.name, false, ENV).await?;
            println!("removed sync \"{}\" and its objects on the servers", args.name);
        }
        SyncCommand::Resume { name } => {
            let reason = session::resume(catalog, &name, ENV).await?;
            println!(
                "resumed sync \"{name}\" (it was paused: {reason}); the daemon applies what \
                 waited, or pgleap kick {name}"
            );
        }
    }
    Ok(())
}

/// `pgleap schema copy`
async fn schema(catalog: &mut Catalog, cmd: SchemaCommand) -> Result<()> {
    let SchemaCommand::Copy { from, to, schemas, pg_bin, with_indexes, create_roles } = cmd;
    let source = DbConn::from_catalog(catalog, &from)?;
    let target = DbConn::from_catalog(catalog, &to)?;
    let job = crate::schema::SchemaCopy {
        source: &source,
        target: &target,
        schemas: &schemas,
        pg_bin: pg_bin.as_deref(),
        exclude_schema: "pgleap",
        create_roles,
    };
    let copied = crate::schema::copy_pre_data(&job, ENV).await?;
    println!("copied the schema of \"{from}\" to \"{to}\" with {}", copied.tools.describe());
    render::schema_copied(&copied);
    if with_indexes {
        let n = crate::schema::create_indexes_like(&source, &target, &schemas, ENV).await?;
        println!("created {n} indexes and key constraints");
    }
    Ok(())
}

/// `pgleap verify`
async fn verify(
    catalog: &mut Catalog,
    sync: String,
    tables: &[String],
    no_kick: bool,
    incremental: bool,
    json: bool,
) -> Result<()> {
    let reports =
        crate::verify::verify_sync(catalog, &sync, tables, !no_kick, incremental, ENV).await?;
    render::verify(&reports, json);
    let tables = reports.iter().map(|r| r.differing_tables()).sum();
    let objects = reports.iter().map(|r| r.schema.len()).sum();
    if tables + objects > 0 {
        return Err(Error::Differences { sync, tables, objects });
    }
    Ok(())
}

/// `pgleap cutover` and `pgleap rollback`
async fn cutover(catalog: &mut Catalog, cmd: Command) -> Result<()> {
    let (report, json) = match cmd {
        Command::Cutover {
            sync,
            max_lag,
            terminate,
            sequence_margin,
            dry_run,
            rollback_sync,
            allow_schema_differences,
            to,
            keep_others,
            switch,
            json,
        } => {
            let opts = crate::cutover::CutoverOptions {
                max_lag: Duration::from_secs(max_lag),
                terminate,
                sequence_margin,
                dry_run,
                rollback_sync,
                switch: switch.plan(false)?,
                lift_fence: None,
                allow_schema_differences,
                rows_compared: false,
                to,
                keep_others,
            };
            (crate::cutover::cutover(catalog, &sync, &opts, ENV).await?, json)
        }
        Command::Rollback { sync, max_lag, switch, json } => {
            let syncs = crate::server::syncs_named(catalog, &sync)?;
            let server = syncs != [sync.clone()];
            let opts = crate::cutover::CutoverOptions {
                max_lag: Duration::from_secs(max_lag),
                terminate: false,
                sequence_margin: 0,
                dry_run: false,
                rollback_sync: None,
                switch: switch.plan(server)?,
                lift_fence: None,
                // Going back must not depend on the old server's schema
                // matching objects created since.
                allow_schema_differences: true,
                rows_compared: false,
                to: None,
                keep_others: None,
            };
            if server {
                // Every database of a server move goes back in one fence.
                let report =
                    crate::server::rollback_server(catalog, &sync, &syncs, &opts, ENV).await?;
                render::server_cutover(&report, json);
                return Ok(());
            }
            (crate::cutover::rollback(catalog, &sync, &opts, ENV).await?, json)
        }
        _ => unreachable!("dispatched on Command::Cutover and Command::Rollback"),
    };
    render::cutover(&report, json);
    Ok(())
}

/// `pgleap upgrade`
async fn upgrade(catalog: &mut Catalog, cmd: Command) -> Result<()> {
    let Command::Upgrade {
        source,
        target,
        name,
        jobs,
        cutover,
        max_lag,
        pg_bin,
        switch,
        create_roles,
        allow_schema_differences,
        overwrite_target,
        all_databases,
        databases,
        rollback,
        login_roles,
        trigger_level,
        capture,
        json,
    } = cmd
    else {
        unreachable!("dispatched on Command::Upgrade")
    };
    let server = all_databases || !databases.is_empty();
    if login_roles && !server {
        return Err(Error::invalid(
            "--login-roles goes with --all-databases or --databases",
            "for one database, --create-roles creates the roles NOLOGIN",
        ));
    }
    let parse = |what: &str, s: &str| {
        ConnParams::parse(s).map_err(|e| Error::Conninfo { db: what.into(), source: e })
    };
    let opts = crate::upgrade::UpgradeOptions {
        name,
        source: parse("source", &source)?,
        target: parse("target", &target)?,
        jobs: jobs.unwrap_or_else(session::default_jobs),
        cutover: match cutover {
            CutoverArg::Prompt => crate::upgrade::CutoverMode::Prompt,
            CutoverArg::Auto => crate::upgrade::CutoverMode::Auto,
            CutoverArg::Never => crate::upgrade::CutoverMode::Never,
        },
        max_lag: Duration::from_secs(max_lag),
        switch: switch.plan(server)?,
        pg_bin,
        create_roles,
        allow_schema_differences,
        overwrite_target,
        rollback,
        row_triggers: trigger_level == TriggerLevel::Row,
        capture: capture.into(),
    };
    // With --json, stdout is the report alone.
    let say = |line: &str| if json { eprintln!("{line}") } else { println!("{line}") };
    if server {
        let databases = if all_databases {
            crate::server::Databases::All
        } else {
            crate::server::Databases::Named(databases)
        };
        let opts = crate::server::ServerOptions { upgrade: opts, databases, login_roles };
        let report =
            crate::server::upgrade_server(catalog, &opts, &say, render::confirm, ENV).await?;
        render::server_summary(&report, json);
        return Ok(());
    }
    let report = crate::upgrade::upgrade(catalog, &opts, &say, render::confirm, ENV).await?;
    if let Some(c) = report.cutover.as_ref().filter(|_| !json) {
        render::cutover(c, false);
    }
    render::upgrade_summary(&report, json);
    Ok(())
}

/// Exit 1 when a sync needs someone.
fn attention(status: &[status::SyncStatus]) -> Result<()> {
    let mut needy: Vec<String> = status
        .iter()
        .filter_map(|s| {
            s.source_error.as_ref().map(|e| format!("{}: the source cannot be read ({e})", s.name))
        })
        .collect();
    needy.extend(status.iter().flat_map(|s| {
        s.targets
            .iter()
            .filter(|t| t.needs_attention())
            .map(move |t| format!("{} to {}: {}", s.name, t.target, t.phase))
    }));
    if needy.is_empty() {
        return Ok(());
    }
    Err(Error::NotReady {
        message: format!("needs attention: {}", needy.join("; ")),
        hint: "pgleap start runs the daemon; pgleap status SYNC shows the last error".into(),
    })
}

/// `pgleap start|stop|status|kick`: the daemon and what it does.
async fn daemon(path: &Path, cmd: Command) -> Result<()> {
    match cmd {
        Command::Start { foreground: true, listen } => {
            daemon::run_foreground(path, daemon::parse_listen(&listen)?).await?
        }
        Command::Start { foreground: false, listen } => {
            daemon::parse_listen(&listen)?;
            let pid = daemon::start_detached(path, &listen)?;
            println!("started the daemon (pid {pid}); log: {}", daemon::log_file(path).display());
        }
        Command::Stop { timeout } => match daemon::stop(path, Duration::from_secs(timeout))? {
            Some(pid) => println!("stopped the daemon (pid {pid})"),
            None => println!("the daemon is not running"),
        },
        Command::Status { sync, json, expanded, watch } => loop {
            let catalog = Catalog::open(path)?;
            let pid = daemon::running_pid(path);
            let status = status::gather(&catalog, sync.as_deref(), pid.is_some(), ENV).await?;
            match watch {
                Some(seconds) => {
                    // Clears a terminal; off one, the snapshots follow each other.
                    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                        print!("\x1b[2J\x1b[H");
                    }
                    render::status(&status, pid, expanded || sync.is_some(), json);
                    tokio::time::sleep(Duration::from_secs(seconds.max(1))).await;
                }
                None => {
                    render::status(&status, pid, expanded || sync.is_some(), json);
                    return attention(&status);
                }
            }
        },
        Command::Ready { sync: name, max_lag } => {
            let catalog = Catalog::open(path)?;
            let pid = daemon::running_pid(path);
            // A server move's name: every database's sync must be ready,
            // and each reason names its sync.
            let syncs = crate::server::syncs_named(&catalog, &name)?;
            let server = syncs.len() > 1 || syncs[0] != name;
            let mut reasons = Vec::new();
            let mut to = String::new();
            for sync in &syncs {
                let status = status::gather(&catalog, Some(sync), pid.is_some(), ENV).await?;
                let mut own = status::not_ready(&status[0], max_lag as f64);
                // The cutover's own schema judgement, rehearsed: ready and
                // cutover agree.
                match crate::cutover::schema_not_ready(&catalog, sync, ENV).await {
                    Ok(schema) => own.extend(schema),
                    Err(e) => own.push(format!("the schema could not be compared: {e}")),
                }
                reasons.extend(
                    own.into_iter().map(|r| if server { format!("{sync}: {r}") } else { r }),
                );
                if let targets @ [_, _, ..] = status[0].targets.as_slice() {
                    let names: Vec<&str> = targets.iter().map(|t| t.target.as_str()).collect();
                    to = format!(" --to {}", names.join("|"));
                }
            }
            let sync = name;
            if reasons.is_empty() && server {
                println!(
                    "every database of \"{sync}\" is ready to cut over ({}): rerun its \
                     pgleap upgrade with --cutover auto",
                    syncs.join(", ")
                );
            } else if reasons.is_empty() {
                println!("sync \"{sync}\" is ready to cut over: pgleap cutover {sync}{to}");
            } else {
                for r in &reasons {
                    println!("not ready: {r}");
                }
                return Err(Error::NotReady {
                    message: format!("sync \"{sync}\" is not ready to cut over"),
                    hint: "the reasons are above".into(),
                });
            }
        }
        Command::Kick { sync, wait, jobs } => {
            let mut catalog = Catalog::open(path)?;
            let jobs = jobs.unwrap_or_else(session::default_jobs);
            let wait = wait.map(Duration::from_secs);
            let results = session::kick(&mut catalog, &sync, wait, jobs, ENV).await?;
            for (target, stats) in results {
                println!(
                    "kicked sync \"{sync}\" to \"{target}\": {} rows written, {} deleted, {} truncates in {} ms",
                    stats.inserts, stats.deletes, stats.truncates, stats.millis
                );
            }
        }
        _ => unreachable!("the other commands are dispatched by run"),
    }
    Ok(())
}
