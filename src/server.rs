//! A whole server moved: every database, the roles they need, one cutover.
//!
//! Built on the one-database job: each database is an `upgrade` of its own
//! (catalog entries `NAME.DB_source`, `NAME.DB_target`, relgroup, dbgroup
//! and sync `NAME.DB`), prepared one after the other (each copy uses every
//! `--jobs` worker), and then cut over together: one fence over every
//! source, one switch, one catalog transaction past the switch point.
//!
//! Order, so a refusal writes nothing: the databases are found, every
//! database's preflight runs and the roles are read, all on both servers,
//! before the first role or database is created. Databases this run
//! creates are dropped again when a later one cannot be created.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::catalog::Catalog;
use crate::cutover::{self, CutoverOptions, Member, ServerCutoverReport};
use crate::error::{Error, Result};
use crate::objects;
use crate::pg::{
    Conn, ConnParams, Env, NamedQuery, PasswordSource, PgVersion, ResolvedConn, Sql, quote_ident,
    quote_literal,
};
use crate::route::SyncRoute;
use crate::session::Session;
use crate::switch::{Bouncer, SwitchPlan};
use crate::upgrade::{self, CutoverMode, Preflight, UpgradeOptions};

/// How long after a database's verify its cutover still trusts it instead
/// of counting its rows again before the fence.
const VERIFY_TRUSTED: std::time::Duration = std::time::Duration::from_secs(600);

/// Databases of managed services that belong to the provider, never moved.
const MANAGED: [&str; 4] = ["rdsadmin", "azure_maintenance", "azure_sys", "cloudsqladmin"];

/// Which databases a server move takes.
#[derive(Debug, Clone)]
pub enum Databases {
    /// Every database the role can connect to, but templates, `postgres`
    /// and a managed service's own.
    All,
    /// These, by name.
    Named(Vec<String>),
}

pub struct ServerOptions {
    /// `source` and `target` name the servers (their dbname, default
    /// `postgres`, is where the databases are listed); `name` prefixes
    /// every catalog entry; `switch`'s poolers have one entry per database,
    /// named like it.
    pub upgrade: UpgradeOptions,
    pub databases: Databases,
    /// Create the roles that log in on the source with LOGIN (still
    /// without a password: for servers that authenticate them otherwise).
    pub login_roles: bool,
}

/// One database of the move.
#[derive(Debug, Serialize)]
pub struct MovedDatabase {
    pub database: String,
    pub sync: String,
    /// Created on the target by this run.
    pub created: bool,
    pub preflight: Preflight,
}

/// What a server move did.
#[derive(Debug, Serialize)]
pub struct ServerReport {
    pub databases: Vec<MovedDatabase>,
    /// Databases of the source left out, and why.
    pub left_out: Vec<String>,
    /// Roles created on the target (NOLOGIN, no password).
    pub roles_created: Vec<String>,
    /// Roles that log in on the source: an administrator sets their
    /// password and LOGIN on the target (a non-superuser cannot read them).
    pub passwords_to_set: Vec<String>,
    /// Role settings and memberships the target would not take.
    pub role_warnings: Vec<String>,
    pub cutover: Option<ServerCutoverReport>,
    pub steps: Vec<upgrade::Step>,
    pub next: Vec<String>,
}

/// A database of the source and what the move knows of it.
struct Planned {
    database: String,
    opts: UpgradeOptions,
    exists_on_target: bool,
}

/// Moves the databases of a server; `say` reports each step.
pub async fn upgrade_server(
    catalog: &mut Catalog,
    opts: &ServerOptions,
    say: &dyn Fn(&str),
    confirm: fn(&str) -> bool,
    env: Env<'_>,
) -> Result<ServerReport> {
    let mut clock = cutover::Timer::new();
    let base = &opts.upgrade;
    let none = PasswordSource::default();
    let src = Conn::connect("source", &maintenance(&base.source), &none, env).await?;
    let tgt = Conn::connect("target", &maintenance(&base.target), &none, env).await?;
    let (chosen, left_out) = choose(&src, &opts.databases).await?;
    for l in &left_out {
        say(&format!("left out: {l}"));
    }
    let on_target: Vec<String> =
        tgt.query(DATABASES, &[]).await?.iter().map(|r| r.get(0)).collect();
    let mut planned = Vec::new();
    for database in &chosen {
        planned.push(plan_database(base, database, on_target.contains(database))?);
    }
    let switch = opts_switch(&base.switch, &chosen)?;
    if let Some(report) = finished_before(catalog, &planned, base, &switch, env).await? {
        return Ok(report);
    }

    // Preflight of every database, before anything is written.
    let mut refusals = Vec::new();
    let mut preflights = Vec::new();
    for p in &planned {
        let resuming = catalog.sync(&p.opts.name).is_ok();
        let created = !p.exists_on_target;
        let mut check = p.opts.clone();
        if created {
            // What the new database starts from: template1's objects
            // (none, usually), on the target server.
            check.target.set("dbname", "template1").map_err(|e| conninfo("target", e))?;
        }
        let prefix = format!("[{}] ", p.database);
        let say_db = |line: &str| say(&format!("{prefix}{line}"));
        match upgrade::step_preflight(&check, resuming, created, &say_db, env).await {
            Ok(pre) => preflights.push(pre),
            Err(e) => refusals.push(format!("database \"{}\": {}", p.database, refusal_text(&e))),
        }
    }
    let missing_dbs: Vec<&Planned> = planned.iter().filter(|p| !p.exists_on_target).collect();
    let can_create_db: bool = tgt.query_one(CAN_CREATE_DATABASE, &[]).await?.get(0);
    if !missing_dbs.is_empty() && !can_create_db {
        let names: Vec<&str> = missing_dbs.iter().map(|p| p.database.as_str()).collect();
        refusals.push(format!(
            "the target lacks database(s) {} and the role may not create databases (CREATEDB): \
             create them there first, owned by the role, or grant it CREATEDB",
            names.join(", ")
        ));
    }
    let wanted: BTreeSet<String> =
        preflights.iter().flat_map(|p| p.missing_roles.iter().cloned()).collect();
    let roles = read_roles(&src, &tgt, &wanted).await?;
    let can_create_role: bool = tgt.query_one(CAN_CREATE_ROLE, &[]).await?.get(0);
    if !roles.missing.is_empty() && !can_create_role {
        let names: Vec<&str> = roles.missing.iter().map(|r| r.name.as_str()).collect();
        refusals.push(format!(
            "the target lacks role(s) {} the databases need, and the role may not create roles \
             (CREATEROLE): create them there first, or grant it CREATEROLE",
            names.join(", ")
        ));
    }
    crate::switch::check(&switch, env).await?;
    if !refusals.is_empty() {
        return Err(Error::invalid(
            format!("preflight of the server: {}", refusals.join("; ")),
            "fix what is named (or leave a database out with --databases) and run upgrade \
             again; nothing was created on either server",
        ));
    }
    clock.lap("preflight");

    // Roles, then databases: a database's grants name the roles.
    let created_roles = create_roles(&tgt, &roles, opts.login_roles, say).await?;
    create_databases(&src, &tgt, &missing_dbs, say).await?;
    clock.lap("roles and databases");

    let mut members: Vec<Member> = Vec::new();
    // When the first database's verify ended: the cutover trusts the
    // verifies only while they are fresh.
    let mut first_verified = None;
    let mut differing = Vec::new();
    for p in &planned {
        let prefix = format!("[{}] ", p.database);
        let say_db = |line: &str| say(&format!("{prefix}{line}"));
        let mut db_clock = cutover::Timer::new();
        let prepared = upgrade::prepare(catalog, &p.opts, &say_db, &mut db_clock, env).await?;
        first_verified.get_or_insert_with(std::time::Instant::now);
        differing.extend(prepared.differing.iter().map(|t| format!("{}: {t}", p.database)));
        let rollback_sync = base.rollback.then(|| format!("{}_back", p.opts.name));
        members.push(Member {
            route: prepared.route,
            session: prepared.session,
            rollback_sync,
            lift_fence: None,
        });
        crate::failpoint::hit("server-database-prepared");
    }
    clock.lap("every database copied and verified");
    if !differing.is_empty() {
        return Err(Error::Differences {
            sync: base.name.clone(),
            tables: differing.len(),
            objects: 0,
        });
    }

    let go = match base.cutover {
        CutoverMode::Auto => true,
        CutoverMode::Never => false,
        CutoverMode::Prompt => {
            let question = format!(
                "cut over all {} databases now, in one fence? writes to the source stop (the \
                 syncs go on while you decide)",
                members.len()
            );
            let mut sessions: Vec<&mut Session> =
                members.iter_mut().map(|m| &mut m.session).collect();
            let yes = upgrade::ask_while_following(catalog, &mut sessions, question, confirm, env)
                .await?;
            clock.lap("waiting for the answer");
            yes
        }
    };
    let cut = if go {
        let copts = CutoverOptions {
            max_lag: base.max_lag,
            terminate: false,
            sequence_margin: 0,
            dry_run: false,
            // Each database's own sync back is named per member.
            rollback_sync: None,
            switch: switch.clone(),
            lift_fence: None,
            allow_schema_differences: base.allow_schema_differences,
            // Every database's rows were compared before its sync went on,
            // but the first one's may be hours old when the last copy ends
            // (then each is counted again, before the fence), as after a
            // prompt.
            rows_compared: matches!(base.cutover, CutoverMode::Auto)
                && first_verified.is_some_and(|t| t.elapsed() < VERIFY_TRUSTED),
            to: None,
            keep_others: None,
        };
        let server = ResolvedConn::resolve(&maintenance(&base.target), &none, env)
            .map_err(|source| crate::pg::PgError::Resolve { db: "target".into(), source })?;
        let report =
            cutover::cutover_server(catalog, &mut members, &copts, &base.name, &server, env)
                .await?;
        clock.lap("cutover");
        Some(report)
    } else {
        let pid = match crate::daemon::running_pid(catalog.path()) {
            Some(pid) => pid,
            None => {
                crate::daemon::start_detached(catalog.path(), &crate::daemon::listen_setting())?
            }
        };
        say(&format!(
            "every database's sync is in place and the daemon (pid {pid}) follows the sources; \
             run this upgrade again with --cutover auto to cut them all over in one fence"
        ));
        None
    };
    let name = &base.name;
    let next = match &cut {
        Some(_) => vec![format!(
            "pgleap teardown {name} removes pgleap's objects from every database (the old \
             server's databases stay fenced)"
        )],
        None => vec![
            "pgleap status shows every database's lag".into(),
            format!("pgleap ready {name} says when every database can be cut over"),
        ],
    };
    let databases = planned
        .into_iter()
        .zip(preflights)
        .map(|(p, preflight)| MovedDatabase {
            created: !p.exists_on_target,
            database: p.database,
            sync: p.opts.name,
            preflight,
        })
        .collect();
    let steps = upgrade::steps_of(&clock);
    Ok(ServerReport {
        databases,
        left_out,
        roles_created: created_roles.created,
        passwords_to_set: created_roles.passwords_to_set,
        role_warnings: created_roles.warnings,
        cutover: cut,
        steps,
        next,
    })
}

/// Moves the application of a server move back to the old server: every
/// database's sync back (armed by `upgrade --rollback`) cut over in one
/// fence on the new server, whose switch lifts the fences the cutover left
/// on the old one.
pub async fn rollback_server(
    catalog: &mut Catalog,
    name: &str,
    syncs: &[String],
    opts: &CutoverOptions,
    env: Env<'_>,
) -> Result<ServerCutoverReport> {
    let mut backs = Vec::new();
    for sync in syncs {
        let forward = SyncRoute::load(catalog, sync)?;
        let back = match catalog.rollback_sync_of(sync)? {
            Some(back) if forward.sync.retired => back,
            _ => {
                return Err(Error::invalid(
                    format!(
                        "database sync \"{sync}\" of \"{name}\" was not cut over with a sync \
                         back: there is nothing to roll back to"
                    ),
                    "only a move cut over by pgleap upgrade --rollback can be rolled back; \
                     nothing was fenced",
                ));
            }
        };
        backs.push((forward, SyncRoute::load(catalog, &back)?));
    }
    let mut databases = Vec::new();
    for (_, back) in &backs {
        databases.push(back.source.resolve(env)?.dbname);
    }
    let opts = CutoverOptions { switch: opts_switch(&opts.switch, &databases)?, ..opts.clone() };
    // A rollback killed half-way: finished or undone first, all alike.
    for (_, back) in &backs {
        let old = back.sole_target()?.clone();
        cutover::resume_unfinished(catalog, back, &old, &opts.switch, env).await?;
    }
    let deadline = Some(std::time::Instant::now() + std::time::Duration::from_secs(600));
    let mut members = Vec::new();
    for (forward, back) in backs {
        let old = back.sole_target()?.clone();
        let session = Session::open_retrying(catalog, &back, &old, 1, deadline, env).await?;
        let fence =
            crate::apply::Plan::load(&session.tgt, &forward.sync, &forward.relgroup).await?;
        members.push(Member { route: back, session, rollback_sync: None, lift_fence: Some(fence) });
    }
    // The switch command's server: the old one, at the first database.
    let server = members[0].route.sole_target()?.resolve(env)?;
    cutover::cutover_server(catalog, &mut members, &opts, name, &server, env).await
}

/// The syncs `name` stands for: itself when it is a sync, else those of
/// the server move it named (`NAME.DB`); `ready` and `teardown` take either.
pub fn syncs_named(catalog: &Catalog, name: &str) -> Result<Vec<String>> {
    if catalog.sync(name).is_ok() {
        return Ok(vec![name.to_string()]);
    }
    let prefix = format!("{name}.");
    let members: Vec<String> = catalog
        .syncs()?
        .into_iter()
        .map(|s| s.name)
        .filter(|s| s.starts_with(&prefix) && catalog.db(&format!("{s}_source")).is_ok())
        .collect();
    // Nothing of that name: the caller's own lookup says so.
    Ok(if members.is_empty() { vec![name.to_string()] } else { members })
}

/// The connection to a server's maintenance database: the one given, else
/// `postgres`.
fn maintenance(params: &ConnParams) -> ConnParams {
    let mut p = params.clone();
    if p.get("dbname").is_none() {
        // A key set by this code: it parses.
        let _ = p.set("dbname", "postgres");
    }
    p
}

fn conninfo(what: &str, e: crate::pg::ConninfoError) -> Error {
    Error::Conninfo { db: what.into(), source: e }
}

/// A refusal's text with its hint, for the server's one report.
fn refusal_text(e: &Error) -> String {
    match e {
        Error::Invalid { message, .. } => message.trim_start_matches("preflight: ").to_string(),
        other => other.to_string(),
    }
}

/// The databases to move, and those left out with the reason.
async fn choose(src: &Conn, which: &Databases) -> Result<(Vec<String>, Vec<String>)> {
    let rows = src.query(SOURCE_DATABASES, &[]).await?;
    let listed: Vec<(String, bool, bool, bool)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    let mut chosen = Vec::new();
    let mut left_out = Vec::new();
    match which {
        Databases::All => {
            for (name, template, allowed, can_connect) in &listed {
                let why = if *template || !allowed {
                    Some("a template")
                } else if name == "postgres" {
                    Some("the maintenance database (name it with --databases to move it)")
                } else if MANAGED.contains(&name.as_str()) {
                    Some("the managed service's own")
                } else if !can_connect {
                    Some("the role may not connect to it")
                } else {
                    None
                };
                match why {
                    Some(why) => left_out.push(format!("{name}: {why}")),
                    None => chosen.push(name.clone()),
                }
            }
            if chosen.is_empty() {
                return Err(Error::invalid(
                    "the source server has no database to move",
                    "name the databases with --databases (postgres is left out unless named)",
                ));
            }
        }
        Databases::Named(names) => {
            for name in names {
                match listed.iter().find(|l| &l.0 == name) {
                    None => {
                        return Err(Error::invalid(
                            format!("the source server has no database \"{name}\""),
                            "check --databases; nothing was created",
                        ));
                    }
                    Some((_, template, allowed, can_connect))
                        if *template || !allowed || !can_connect =>
                    {
                        return Err(Error::invalid(
                            format!("the role cannot connect to database \"{name}\" on the source"),
                            "grant it CONNECT (or leave the database out); nothing was created",
                        ));
                    }
                    Some(_) if !chosen.contains(name) => chosen.push(name.clone()),
                    Some(_) => {}
                }
            }
        }
    }
    Ok((chosen, left_out))
}

/// One database's options, and its catalog name `NAME.DB`.
fn plan_database(base: &UpgradeOptions, database: &str, exists: bool) -> Result<Planned> {
    let name = format!("{}.{database}", base.name);
    objects::check_name(crate::catalog::ObjectKind::Sync, &format!("{name}_source")).map_err(
        |_| {
            Error::invalid(
                format!(
                    "database \"{database}\" gives the catalog name \"{name}\", which is not one"
                ),
                "catalog names take letters, digits, '_', '.' and '-' (up to 63 with the \
                 \"_source\" suffix): move that database by itself (pgleap upgrade --name ...), \
                 or leave it out with --databases",
            )
        },
    )?;
    let mut opts = base.clone();
    opts.name = name;
    opts.source.set("dbname", database).map_err(|e| conninfo("source", e))?;
    opts.target.set("dbname", database).map_err(|e| conninfo("target", e))?;
    // Roles are created by the move itself; any still missing (named by a
    // grant since) are created NOLOGIN with the schema.
    opts.create_roles = true;
    // Each database has its own fence; the poolers are switched once, by
    // the server's cutover.
    opts.switch = SwitchPlan::default();
    Ok(Planned { database: database.to_string(), opts, exists_on_target: exists })
}

/// The switch of the whole server: each `--pgbouncer` has one entry per
/// database, named like it.
fn opts_switch(given: &SwitchPlan, databases: &[String]) -> Result<SwitchPlan> {
    let mut plan = given.clone();
    let mut bouncers = Vec::new();
    for b in &given.bouncers {
        if !b.db.is_empty() {
            return Err(Error::invalid(
                "--pgbouncer-db names one database; a server move switches the pooler's entry \
                 of every database, named like it",
                "leave --pgbouncer-db out",
            ));
        }
        for db in databases {
            bouncers.push(Bouncer { admin: b.admin.clone(), db: db.clone(), ini: b.ini.clone() });
        }
    }
    plan.bouncers = bouncers;
    Ok(plan)
}

/// A move cut over before (every sync retired): a cutover killed past its
/// switch point is finished, and the move reports itself done.
async fn finished_before(
    catalog: &mut Catalog,
    planned: &[Planned],
    base: &UpgradeOptions,
    switch: &SwitchPlan,
    env: Env<'_>,
) -> Result<Option<ServerReport>> {
    // A cutover killed half-way: finished past its switch point, else
    // undone (every sync is on the same side of it).
    for p in planned {
        if catalog.sync(&p.opts.name).is_ok() {
            let route = SyncRoute::load(catalog, &p.opts.name)?;
            let target = route.sole_target()?.clone();
            cutover::resume_unfinished(catalog, &route, &target, switch, env).await?;
        }
    }
    let retired = planned
        .iter()
        .filter(|p| catalog.sync(&p.opts.name).map(|s| s.retired).unwrap_or(false))
        .count();
    if retired == 0 {
        return Ok(None);
    }
    Err(Error::invalid(
        format!(
            "upgrade \"{}\" was already cut over ({retired} of {} databases)",
            base.name,
            planned.len()
        ),
        format!(
            "pgleap teardown {}.DB removes what is left of each; use another --name for a new run",
            base.name
        ),
    ))
}

/// A role the databases need, as the source has it.
struct SourceRole {
    name: String,
    inherit: bool,
    createrole: bool,
    createdb: bool,
    login: bool,
    connection_limit: i32,
    /// `name=value` settings of the role in every database.
    settings: Vec<String>,
}

/// The roles the target lacks, and the memberships among the roles of the
/// move.
struct Roles {
    missing: Vec<SourceRole>,
    memberships: Vec<(String, String, bool)>,
}

/// Reads from the source the roles `wanted` (those the databases' grants,
/// policies and settings name) and the roles they are members of or have
/// as members, transitively; keeps those the target lacks.
async fn read_roles(src: &Conn, tgt: &Conn, wanted: &BTreeSet<String>) -> Result<Roles> {
    let wanted: Vec<String> = wanted.iter().cloned().collect();
    let rows = src.query(ROLES, &[&wanted]).await?;
    let all: Vec<SourceRole> = rows
        .iter()
        .map(|r| SourceRole {
            name: r.get(0),
            inherit: r.get(1),
            createrole: r.get(2),
            createdb: r.get(3),
            login: r.get(4),
            connection_limit: r.get(5),
            settings: r.get(6),
        })
        .collect();
    let names: Vec<String> = all.iter().map(|r| r.name.clone()).collect();
    let present: Vec<String> =
        tgt.query(ROLES_PRESENT, &[&names]).await?.iter().map(|r| r.get(0)).collect();
    let memberships = src
        .query(MEMBERSHIPS, &[&names])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let missing = all.into_iter().filter(|r| !present.contains(&r.name)).collect();
    Ok(Roles { missing, memberships })
}

/// What creating the roles did.
struct CreatedRoles {
    created: Vec<String>,
    passwords_to_set: Vec<String>,
    warnings: Vec<String>,
}

/// Creates the missing roles NOLOGIN (a non-superuser cannot read their
/// passwords; a login role without one would be a role nobody logs in as
/// anyway), with their attributes the role may give, their settings and
/// memberships; what the target refuses of those is reported, not fatal.
async fn create_roles(
    tgt: &Conn,
    roles: &Roles,
    login: bool,
    say: &dyn Fn(&str),
) -> Result<CreatedRoles> {
    let mine: (bool, bool) = {
        let row = tgt.query_one(OWN_ATTRIBUTES, &[]).await?;
        (row.get(0), row.get(1))
    };
    let mut done =
        CreatedRoles { created: Vec::new(), passwords_to_set: Vec::new(), warnings: Vec::new() };
    for r in &roles.missing {
        let can_login = login && r.login;
        let mut sql = format!(
            "create role {} {} {} connection limit {}",
            quote_ident(&r.name),
            if can_login { "login" } else { "nologin" },
            if r.inherit { "inherit" } else { "noinherit" },
            r.connection_limit
        );
        if r.createdb && mine.0 {
            sql.push_str(" createdb");
        }
        if r.createrole && mine.1 {
            sql.push_str(" createrole");
        }
        tgt.batch_execute(&sql).await.map_err(|e| {
            Error::invalid(
                format!("cannot create role {} on the target: {}", r.name, e.message()),
                "create it there first (the roles created so far stay: they are harmless \
                 without LOGIN), then run upgrade again",
            )
        })?;
        done.created.push(r.name.clone());
        if r.login && !can_login {
            done.passwords_to_set.push(r.name.clone());
        }
        if (r.createdb && !mine.0) || (r.createrole && !mine.1) {
            done.warnings.push(format!(
                "role {} has{}{} on the source, which this role may not give",
                r.name,
                if r.createdb && !mine.0 { " CREATEDB" } else { "" },
                if r.createrole && !mine.1 { " CREATEROLE" } else { "" }
            ));
        }
        for setting in &r.settings {
            let (key, value) = setting.split_once('=').unwrap_or((setting, ""));
            // Set in the session first and stored FROM CURRENT, so the value
            // is parsed as the server parses the setting.
            let sql = format!(
                "do $pgleap$ begin perform set_config({}, {}, false); \
                 execute {}; end $pgleap$",
                quote_literal(key),
                quote_literal(value),
                quote_literal(&format!(
                    "alter role {} set {} from current",
                    quote_ident(&r.name),
                    quote_ident(key)
                ))
            );
            if let Err(e) = tgt.batch_execute(&sql).await {
                done.warnings.push(format!(
                    "role {}: setting {key} = {value} not set on the target: {}",
                    r.name,
                    e.message()
                ));
            }
        }
        say(&format!(
            "created role {} on the target ({}, no password){}",
            r.name,
            if can_login { "LOGIN" } else { "NOLOGIN" },
            if r.settings.is_empty() {
                String::new()
            } else {
                format!(", with its settings {}", r.settings.join(", "))
            }
        ));
    }
    for (role, member, admin) in &roles.memberships {
        let touched = done.created.contains(role) || done.created.contains(member);
        if !touched {
            continue;
        }
        let sql = format!(
            "grant {} to {}{}",
            quote_ident(role),
            quote_ident(member),
            if *admin { " with admin option" } else { "" }
        );
        match tgt.batch_execute(&sql).await {
            Ok(()) => say(&format!("granted role {role} to {member} on the target")),
            Err(e) => done.warnings.push(format!(
                "membership of {member} in {role} not granted on the target: {}",
                e.message()
            )),
        }
    }
    for w in &done.warnings {
        say(&format!("warning: {w}"));
    }
    if !done.passwords_to_set.is_empty() {
        say(&format!(
            "roles that log in on the source, created NOLOGIN: {}; an administrator sets each \
             one's password and LOGIN on the target (ALTER ROLE ... LOGIN PASSWORD ...)",
            done.passwords_to_set.join(", ")
        ));
    }
    Ok(done)
}

/// Creates the databases the target lacks, each with the source's
/// encoding and locale, owned by the role, with the source's database
/// privileges; if one fails, those created before it are dropped again.
async fn create_databases(
    src: &Conn,
    tgt: &Conn,
    missing: &[&Planned],
    say: &dyn Fn(&str),
) -> Result<()> {
    let mut created: Vec<String> = Vec::new();
    for p in missing {
        match create_database(src, tgt, &p.database).await {
            Ok(()) => {
                say(&format!("created database {} on the target", p.database));
                created.push(p.database.clone());
            }
            Err(e) => {
                for db in created.iter().rev() {
                    if let Err(d) =
                        tgt.batch_execute(&format!("drop database {}", quote_ident(db))).await
                    {
                        tracing::error!("could not drop database {db} created by this run: {d}");
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

async fn create_database(src: &Conn, tgt: &Conn, database: &str) -> Result<()> {
    let row = src.query_one(&database_locale(src.version().major()), &[&database]).await?;
    let (encoding, collate, ctype): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    let (provider, locale): (String, Option<String>) = (row.get(3), row.get(4));
    let mut sql = format!(
        "create database {} template template0 encoding {} lc_collate {} lc_ctype {}",
        quote_ident(database),
        quote_literal(&encoding),
        quote_literal(&collate),
        quote_literal(&ctype)
    );
    match (provider.as_str(), locale) {
        ("i", Some(l)) => {
            sql.push_str(&format!(" locale_provider icu icu_locale {}", quote_literal(&l)))
        }
        ("b", Some(l)) => {
            sql.push_str(&format!(" locale_provider builtin builtin_locale {}", quote_literal(&l)))
        }
        _ => {}
    }
    tgt.batch_execute(&sql).await.map_err(|e| {
        Error::invalid(
            format!("cannot create database {database} on the target: {}", e.message()),
            "create it there yourself (same encoding and locale as the source), then run \
             upgrade again; the databases this run created were dropped",
        )
    })?;
    // The database's privileges as the source has them (the default grants
    // PUBLIC CONNECT and TEMPORARY; a source that revoked them says so).
    let acl: Vec<(String, String)> =
        src.query(DATABASE_ACL, &[&database]).await?.iter().map(|r| (r.get(0), r.get(1))).collect();
    if let Some(first) = acl.first()
        && first.0 != "-"
    {
        let mut grants = format!("revoke all on database {} from public;", quote_ident(database));
        for (grantee, privilege) in &acl {
            let to = if grantee.is_empty() { "public".to_string() } else { quote_ident(grantee) };
            grants.push_str(&format!(
                " grant {privilege} on database {} to {to};",
                quote_ident(database)
            ));
        }
        if let Err(e) = tgt.batch_execute(&grants).await {
            tracing::warn!(
                "database {database}: its privileges were not all copied: {}",
                e.message()
            );
        }
    }
    Ok(())
}

// The catalog queries of this module, named.

const SOURCE_DATABASES: &str = "select datname::text, datistemplate, datallowconn,
        has_database_privilege(datname, 'CONNECT')
    from pg_database order by 1";

const DATABASES: &str = "select datname::text from pg_database";

const CAN_CREATE_DATABASE: &str =
    "select rolcreatedb or rolsuper from pg_roles where rolname = current_user";

const CAN_CREATE_ROLE: &str =
    "select rolcreaterole or rolsuper from pg_roles where rolname = current_user";

const OWN_ATTRIBUTES: &str =
    "select rolcreatedb or rolsuper, rolcreaterole or rolsuper from pg_roles
    where rolname = current_user";

/// The roles named, and transitively those they are members of and those
/// that are members of them: not the predefined `pg_` roles, superusers or
/// the migrating role itself.
const ROLES: &str = "with recursive wanted(oid) as (
        select oid from pg_roles where rolname = any($1)
      union
        select case when m.member = w.oid then m.roleid else m.member end
        from pg_auth_members m join wanted w on w.oid in (m.member, m.roleid)
    )
    select r.rolname::text, r.rolinherit, r.rolcreaterole, r.rolcreatedb, r.rolcanlogin,
           r.rolconnlimit, coalesce(r.rolconfig, '{}')::text[]
    from pg_roles r join wanted w on w.oid = r.oid
    where r.rolname !~ '^pg_' and not r.rolsuper and r.rolname <> current_user
    order by 1";

const ROLES_PRESENT: &str = "select rolname::text from pg_roles where rolname = any($1)";

/// Memberships among the roles named and between them and the migrating
/// role: (role, member, admin option).
const MEMBERSHIPS: &str = "select g.rolname::text, m.rolname::text, a.admin_option
    from pg_auth_members a
    join pg_roles g on g.oid = a.roleid
    join pg_roles m on m.oid = a.member
    where (g.rolname = any($1) or g.rolname = current_user)
      and (m.rolname = any($1) or m.rolname = current_user)
    order by 1, 2";

/// A database's privileges: (grantee, privilege), grantee '' for PUBLIC;
/// one row ('-', '') when the database has the default privileges.
const DATABASE_ACL: &str = "select coalesce(r.rolname::text, ''), a.privilege_type
    from pg_database d, aclexplode(d.datacl) a
    left join pg_roles r on r.oid = a.grantee
    where d.datname = $1 and a.grantee <> d.datdba
    union all
    select '-', '' from pg_database d where d.datname = $1 and d.datacl is null";

/// A database's encoding and locale: the provider and its locale exist
/// from 15 (ICU) and 17 (builtin, and the column renamed).
fn database_locale(major: u32) -> String {
    let (provider, locale) = match major {
        0..=14 => ("'c'::text", "null::text"),
        15 | 16 => ("datlocprovider::text", "daticulocale::text"),
        _ => ("datlocprovider::text", "datlocale::text"),
    };
    format!(
        "select pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text, \
         {provider}, {locale} from pg_database where datname = $1"
    )
}

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries(v: PgVersion) -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("server: databases", SOURCE_DATABASES),
        NamedQuery::new("server: databases present", DATABASES),
        NamedQuery::new("server: may create databases", CAN_CREATE_DATABASE),
        NamedQuery::new("server: may create roles", CAN_CREATE_ROLE),
        NamedQuery::new("server: own attributes", OWN_ATTRIBUTES),
        NamedQuery::new("server: roles", ROLES),
        NamedQuery::new("server: roles present", ROLES_PRESENT),
        NamedQuery::new("server: memberships", MEMBERSHIPS),
        NamedQuery::new("server: database privileges", DATABASE_ACL),
        NamedQuery::new("server: database locale", database_locale(v.major())),
    ]
}
