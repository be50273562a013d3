//! The whole job in one command: preflight, catalog entries, schema,
//! capture, initial copy, sync, verify, cutover.
//!
//! Every step is one of the commands a user could run by hand, and every
//! step first checks whether it is already done, so rerunning `upgrade`
//! after an interruption resumes where it stopped (the initial copy itself
//! resumes by parts). Preflight writes nothing: a refusal leaves no catalog
//! entry and no server object behind.

use std::time::Duration;

use serde::Serialize;

use crate::catalog::{Catalog, CatalogError, OneTimeCopy};
use crate::error::{Error, Result};
use crate::inventory::{self, Selection, display_name};
use crate::objects::{self, DbSpec, Env, SyncSpec};
use crate::pg::{ConnParams, PasswordSource};
use crate::{cutover, daemon, schema, verify};

/// Copy speed assumed for the estimate, from docs/BENCHMARKS.md (2 cores).
const ASSUMED_MB_PER_S: f64 = 40.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutoverMode {
    Prompt,
    Auto,
    Never,
}

pub struct UpgradeOptions {
    pub name: String,
    pub source: ConnParams,
    pub target: ConnParams,
    pub jobs: usize,
    pub cutover: CutoverMode,
    pub max_lag: Duration,
}

#[derive(Debug, Serialize)]
pub struct Preflight {
    pub source_version: String,
    pub target_version: String,
    pub tables: usize,
    pub sequences: usize,
    pub keyless: Vec<String>,
    pub not_owned: Vec<String>,
    pub missing_extensions: Option<String>,
    pub source_can_create_schema: bool,
    pub target_can_create_schema: bool,
    pub target_replica_role: bool,
    pub size_bytes: i64,
    pub estimated_copy_seconds: f64,
}

impl Preflight {
    /// Why the job cannot work, if it cannot.
    pub fn refusal(&self) -> Option<Error> {
        let mut problems = Vec::new();
        if let Some(m) = &self.missing_extensions {
            problems.push(m.clone());
        }
        if !self.not_owned.is_empty() {
            problems.push(format!(
                "the role does not own {}: its triggers cannot be created",
                self.not_owned.join(", ")
            ));
        }
        if !self.source_can_create_schema {
            problems.push("the role may not create a schema in the source database".into());
        }
        if !self.target_can_create_schema {
            problems.push("the role may not create a schema in the target database".into());
        }
        if problems.is_empty() {
            return None;
        }
        Some(Error::invalid(
            format!("preflight: {}", problems.join("; ")),
            "grant what is missing (table ownership, CREATE on the databases, the extensions on \
             the target) and run upgrade again; nothing was created",
        ))
    }
}

async fn preflight(opts: &UpgradeOptions, env: Env<'_>) -> Result<Preflight> {
    let none = PasswordSource::default();
    let src = objects::connect_params("source", &opts.source, &none, env).await?;
    let tgt = objects::connect_params("target", &opts.target, &none, env).await?;
    if tgt.version.major() < src.version.major() {
        return Err(Error::invalid(
            format!(
                "the target runs PostgreSQL {} and the source {}: that is a downgrade",
                tgt.version, src.version
            ),
            "upgrade moves to the same or a newer major",
        ));
    }
    let sel = Selection { all_tables: true, all_sequences: true, ..Default::default() };
    let relations = inventory::resolve(&src.client, "source", &sel).await?;
    let tables: Vec<_> = relations.iter().filter(|r| r.kind != "sequence").collect();
    let q = |db: &'static str| move |e: tokio_postgres::Error| Error::query(db, &e);
    let names: Vec<String> =
        tables.iter().map(|r| crate::pg::qualified(&r.schema, &r.name)).collect();
    let not_owned: Vec<String> = src
        .client
        .query(
            "select t from unnest($1::text[]) t join pg_class c on c.oid = t::regclass
             where not pg_has_role(current_user, c.relowner, 'USAGE')",
            &[&names],
        )
        .await
        .map_err(q("source"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let can_create = "select has_database_privilege(current_database(), 'CREATE')";
    let source_can_create_schema: bool =
        src.client.query_one(can_create, &[]).await.map_err(q("source"))?.get(0);
    let target_can_create_schema: bool =
        tgt.client.query_one(can_create, &[]).await.map_err(q("target"))?.get(0);
    let target_replica_role = tgt
        .client
        .batch_execute("begin; set local session_replication_role = replica; rollback")
        .await
        .is_ok();
    if !target_replica_role {
        let _ = tgt.client.batch_execute("rollback").await;
    }
    let missing_extensions =
        match schema::check_extensions(&src.client, "source", &tgt.client, "target").await {
            Ok(()) => None,
            Err(e) => Some(e.to_string()),
        };
    let size_bytes: i64 = tables.iter().map(|r| r.est_bytes).sum();
    Ok(Preflight {
        source_version: src.version.to_string(),
        target_version: tgt.version.to_string(),
        tables: tables.len(),
        sequences: relations.len() - tables.len(),
        keyless: tables
            .iter()
            .filter(|r| r.key_columns.is_empty())
            .map(|r| display_name(&r.schema, &r.name))
            .collect(),
        not_owned,
        missing_extensions,
        source_can_create_schema,
        target_can_create_schema,
        target_replica_role,
        size_bytes,
        estimated_copy_seconds: size_bytes as f64 / 1e6 / ASSUMED_MB_PER_S,
    })
}

/// What happened, for the final report.
#[derive(Debug, Serialize)]
pub struct UpgradeReport {
    pub preflight: Preflight,
    pub tables_equal: bool,
    pub cutover: Option<cutover::CutoverReport>,
}

/// Runs the job; `say` reports each step, `confirm` asks before a cutover
/// in prompt mode.
pub async fn upgrade(
    catalog: &mut Catalog,
    opts: &UpgradeOptions,
    say: &dyn Fn(&str),
    confirm: &dyn Fn(&str) -> bool,
    env: Env<'_>,
) -> Result<UpgradeReport> {
    let pre = preflight(opts, env).await?;
    say(&format!(
        "preflight: PostgreSQL {} -> {}; {} tables, {} sequences, {:.1} MB, copy in about {:.0} s; \
         target triggers and foreign keys during sync: {}",
        pre.source_version,
        pre.target_version,
        pre.tables,
        pre.sequences,
        pre.size_bytes as f64 / 1e6,
        pre.estimated_copy_seconds,
        if pre.target_replica_role { "off by replica role" } else { "set aside until cutover" }
    ));
    if !pre.keyless.is_empty() {
        say(&format!(
            "preflight: {} table(s) without a usable key, replicated by whole rows: {}",
            pre.keyless.len(),
            pre.keyless.join(", ")
        ));
    }
    if let Some(e) = pre.refusal() {
        return Err(e);
    }

    let name = &opts.name;
    let (source, target) = (format!("{name}_source"), format!("{name}_target"));
    for (db, params) in [(&source, &opts.source), (&target, &opts.target)] {
        if catalog.db(db).is_err() {
            let spec =
                DbSpec { params: params.clone(), password_file: None, store_password: false };
            objects::add_db(catalog, db, spec, env).await?;
            say(&format!("added database \"{db}\""));
        }
    }
    if catalog.relgroup(name).is_err() {
        let sel = Selection { all_tables: true, all_sequences: true, ..Default::default() };
        objects::add_relgroup(catalog, name, &source, &sel, env).await?;
        say(&format!("added relgroup \"{name}\" (every table and sequence)"));
    }
    if catalog.dbgroup(name).is_err() {
        objects::add_dbgroup(
            catalog,
            name,
            &[format!("{source}:source"), format!("{target}:target")],
        )?;
    }
    let source_conn = objects::DbConn::from_catalog(catalog, &source)?;
    let target_conn = objects::DbConn::from_catalog(catalog, &target)?;
    let relgroup = catalog.relgroup(name)?;
    let first = relgroup.members.iter().find(|m| m.kind != "sequence");
    let has_schema = match first {
        Some(m) => {
            let tgt = target_conn.connect(env).await?;
            tgt.client
                .query_one(
                    "select to_regclass($1) is not null",
                    &[&crate::pg::qualified(&m.schema, &m.name)],
                )
                .await
                .map_err(|e| Error::query(&target, &e))?
                .get(0)
        }
        None => true,
    };
    if !has_schema {
        let job = schema::SchemaCopy {
            source: &source_conn,
            target: &target_conn,
            schemas: &[],
            pg_bin: None,
            exclude_schema: "pgleap",
        };
        schema::copy_pre_data(&job, env).await?;
        say("copied the schema (indexes follow the data; foreign keys and triggers at cutover)");
    }
    match catalog.sync(name) {
        Ok(s) if s.retired => {
            return Err(Error::invalid(
                format!("upgrade \"{name}\" was already cut over"),
                format!(
                    "pgleap teardown {name} removes what is left; use another --name for a new run"
                ),
            ));
        }
        Ok(_) => {}
        Err(CatalogError::NotFound { .. }) => {
            let spec = SyncSpec {
                name: name.clone(),
                relgroup: name.clone(),
                dbgroup: name.clone(),
                onetimecopy: OneTimeCopy::Always,
                autokick: true,
                allow_downgrade: false,
                capture_schema: "pgleap".into(),
            };
            objects::add_sync(catalog, &spec, env).await?;
            say("installed change capture on the source");
        }
        Err(e) => return Err(e.into()),
    }
    say("initial copy and catch-up ...");
    daemon::kick(catalog, name, Some(Duration::from_secs(24 * 3600)), opts.jobs, env).await?;
    let reports = verify::verify_sync(catalog, name, &[], true, env).await?;
    let differing: Vec<String> =
        reports.iter().flat_map(|(_, r)| r).filter(|r| !r.equal).map(|r| r.table.clone()).collect();
    say(&format!(
        "verify: {}",
        if differing.is_empty() {
            "every table equal".to_string()
        } else {
            format!("differences in {}", differing.join(", "))
        }
    ));
    let go = match opts.cutover {
        CutoverMode::Auto => differing.is_empty(),
        CutoverMode::Never => false,
        CutoverMode::Prompt => {
            differing.is_empty() && confirm("cut over now? writes to the source stop")
        }
    };
    let cut = if go {
        let copts = cutover::CutoverOptions {
            max_lag: opts.max_lag,
            terminate: false,
            sequence_margin: 0,
            dry_run: false,
            rollback_sync: None,
        };
        Some(cutover::cutover(catalog, name, &copts, env).await?)
    } else {
        if !differing.is_empty() {
            return Err(Error::Differences { sync: name.clone(), tables: differing.len() });
        }
        say(&format!(
            "the sync is in place: pgleap start follows the source; pgleap cutover {name} when ready"
        ));
        None
    };
    Ok(UpgradeReport { preflight: pre, tables_equal: differing.is_empty(), cutover: cut })
}
