//! The switch: moving the application to the new server while pgleap holds
//! the fence, so that clients see a pause instead of errors.
//!
//! Through PgBouncer: before the fence, each pooler's database is PAUSEd
//! (in-flight transactions finish; new queries wait in the pooler). Inside
//! the fence, after the drain, the database's entry in the pooler's ini file
//! is pointed at the new server (host, port and dbname replaced, every other
//! byte of the file kept) and the pooler RELOADed; after the switch point it
//! is RESUMEd, and the waiting queries run on the new server. For anything
//! else (DNS, HAProxy, a config push) a user's command runs at the same
//! point, with the new server's connection settings in its environment.
//!
//! On a failure before the switch point, every pooler file rewritten is put
//! back and reloaded, and every pooler resumed: the old server takes the
//! writes again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::pg::{ConnParams, Console, Env, ResolvedConn, quote_ident};

/// One PgBouncer instance and the database entry that moves.
#[derive(Debug, Clone)]
pub struct Bouncer {
    /// Connection string of its admin console (dbname `pgbouncer`).
    pub admin: String,
    /// The database name clients use in the pooler.
    pub db: String,
    /// Its ini file; by default the one it reports (`SHOW CONFIG`).
    pub ini: Option<PathBuf>,
}

/// How the application is moved at cutover (and back at rollback).
#[derive(Debug, Clone, Default)]
pub struct SwitchPlan {
    pub bouncers: Vec<Bouncer>,
    /// A shell command run inside the fence, after the drain.
    pub command: Option<String>,
    /// How long PAUSE may wait for in-flight transactions.
    pub pause_timeout: Duration,
    /// How long the command may run.
    pub command_timeout: Duration,
}

/// A paused pooler, with what it takes to undo the switch.
struct Paused {
    console: Console,
    bouncer: Bouncer,
    ini: PathBuf,
    /// The file as it was, once pgleap has rewritten it.
    original: Option<String>,
}

/// Poolers paused for a switch in progress.
pub struct Switch {
    paused: Vec<Paused>,
}

impl Switch {
    /// Connects to every pooler and pauses its database. On a failure, the
    /// poolers paused so far are resumed.
    pub async fn pause(plan: &SwitchPlan, env: Env<'_>) -> Result<Switch> {
        let mut switch = Switch { paused: Vec::new() };
        for bouncer in &plan.bouncers {
            match pause_one(bouncer, plan.pause_timeout, env).await {
                Ok(p) => switch.paused.push(p),
                Err(e) => {
                    switch.abort(env).await;
                    return Err(e);
                }
            }
        }
        Ok(switch)
    }

    /// Points every pooler at `to`, and runs the command: inside the fence,
    /// after the drain.
    pub async fn repoint(
        &mut self,
        plan: &SwitchPlan,
        to: &ResolvedConn,
        sync: &str,
        target: &str,
    ) -> Result<()> {
        self.repoint_each(plan, to, sync, target, &|_| to).await
    }

    /// Points each pooler database at its own new database (`to_of` of its
    /// name: a server move), and runs the command once with `to`.
    pub async fn repoint_each<'t>(
        &mut self,
        plan: &SwitchPlan,
        to: &'t ResolvedConn,
        sync: &str,
        target: &str,
        to_of: &dyn Fn(&str) -> &'t ResolvedConn,
    ) -> Result<()> {
        if let Some(command) = &plan.command {
            run_command(command, plan.command_timeout, to, sync, target).await?;
        }
        for p in &mut self.paused {
            let to = to_of(&p.bouncer.db);
            let text = std::fs::read_to_string(&p.ini).map_err(|e| ini_error(&p.ini, e))?;
            let host = to.hosts.first().cloned().unwrap_or_default();
            let port = to.ports.first().copied().unwrap_or(5432);
            let rewritten =
                rewrite_entry(&text, &p.bouncer.db, &host, port, &to.dbname).map_err(|why| {
                    Error::invalid(
                        format!("pgbouncer ini {}: {why}", p.ini.display()),
                        format!(
                            "give the database \"{}\" its own line in [databases] \
                             (name = host=... port=... dbname=...)",
                            p.bouncer.db
                        ),
                    )
                })?;
            write_in_place(&p.ini, &rewritten)?;
            p.original = Some(text);
            p.console.command("RELOAD").await?;
            // Server connections to the old server are closed once released.
            p.console.command(&format!("RECONNECT {}", console_word(&p.bouncer.db))).await?;
        }
        Ok(())
    }

    /// Lets the waiting queries go (to the new server, once repointed).
    pub async fn resume(self) -> Result<()> {
        for p in &self.paused {
            p.console.command(&format!("RESUME {}", console_word(&p.bouncer.db))).await?;
        }
        Ok(())
    }

    /// Undoes a switch: files put back and reloaded, every pooler resumed on
    /// the old server. Best effort, and says what it could not do.
    pub async fn abort(self, env: Env<'_>) {
        // Last rewritten first: two databases of one pooler share its file,
        // and the first one's original is the file before either rewrite.
        for p in self.paused.into_iter().rev() {
            if let Some(original) = &p.original {
                if let Err(e) = write_in_place(&p.ini, original) {
                    tracing::error!("cannot put back {}: {e}", p.ini.display());
                }
                if let Err(e) = p.console.command("RELOAD").await {
                    tracing::error!("cannot reload {}: {e}", p.console.name());
                }
            }
            resume_anyway(&p.bouncer, &p.console, env).await;
        }
    }
}

/// Resumes the poolers' databases a killed cutover may have left paused
/// (a rerun is given the same poolers). Best effort: a database that is
/// not paused is left as it is.
pub async fn resume_left_paused(plan: &SwitchPlan, env: Env<'_>) {
    for bouncer in &plan.bouncers {
        match inspect(bouncer, env).await {
            Ok((console, _)) => resume_anyway(bouncer, &console, env).await,
            Err(e) => tracing::error!("cannot reach a pooler to resume it: {e}"),
        }
    }
}

/// Checks, without pausing anything, that every pooler answers, has the
/// database, and has an ini file pgleap may rewrite (a dry run's part).
pub async fn check(plan: &SwitchPlan, env: Env<'_>) -> Result<()> {
    for bouncer in &plan.bouncers {
        let (_, ini) = inspect(bouncer, env).await?;
        std::fs::OpenOptions::new().append(true).open(&ini).map_err(|e| ini_error(&ini, e))?;
    }
    Ok(())
}

/// Connects to one pooler's console, finds its ini file, and pauses the
/// database; a PAUSE that does not finish in time is called off.
async fn pause_one(bouncer: &Bouncer, timeout: Duration, env: Env<'_>) -> Result<Paused> {
    let (console, ini) = inspect(bouncer, env).await?;
    let name = console.name().to_string();
    let pause = format!("PAUSE {}", console_word(&bouncer.db));
    match tokio::time::timeout(timeout, console.command(&pause)).await {
        Ok(result) => result?,
        Err(_) => {
            resume_anyway(bouncer, &console, env).await;
            return Err(Error::invalid(
                format!(
                    "{name}: PAUSE {} did not finish within {timeout:?}: transactions stayed open",
                    bouncer.db
                ),
                "nothing was switched; retry when long transactions have ended, or raise \
                 --pause-timeout",
            ));
        }
    }
    tracing::info!(pooler = name, db = bouncer.db, "paused");
    Ok(Paused { console, bouncer: bouncer.clone(), ini, original: None })
}

/// Connects to a pooler's console, finds its ini file, and checks that it
/// has the database.
async fn inspect(bouncer: &Bouncer, env: Env<'_>) -> Result<(Console, PathBuf)> {
    let name = format!("pgbouncer {}", redacted(&bouncer.admin));
    let params = ConnParams::parse(&bouncer.admin)
        .map_err(|source| Error::Conninfo { db: name.clone(), source })?;
    let console = Console::connect(&name, &params, env).await?;
    let ini = match &bouncer.ini {
        Some(path) => path.clone(),
        None => console
            .show("SHOW CONFIG")
            .await?
            .into_iter()
            .find(|row| row.get("key").map(String::as_str) == Some("conffile"))
            .and_then(|row| row.get("value").cloned())
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| {
                Error::invalid(
                    format!("{name} does not say where its ini file is"),
                    "give it with --pgbouncer-ini PATH",
                )
            })?,
    };
    let known = console.show("SHOW DATABASES").await?;
    if !known.iter().any(|row| row.get("name") == Some(&bouncer.db)) {
        return Err(Error::invalid(
            format!("{name} has no database \"{}\"", bouncer.db),
            "give the name clients connect to with --pgbouncer-db",
        ));
    }
    Ok((console, ini))
}

/// Resumes a database, on a new console connection if the first one is
/// stuck in a PAUSE that timed out.
async fn resume_anyway(bouncer: &Bouncer, console: &Console, env: Env<'_>) {
    let resume = format!("RESUME {}", console_word(&bouncer.db));
    let fresh = match ConnParams::parse(&bouncer.admin) {
        Ok(params) => Console::connect(console.name(), &params, env).await.ok(),
        Err(_) => None,
    };
    let result = match &fresh {
        Some(c) => c.command(&resume).await,
        None => console.command(&resume).await,
    };
    // "not paused" is what a failed PAUSE leaves: nothing to undo.
    if let Err(e) = result
        && !e.message().contains("not paused")
    {
        tracing::error!("{}: {resume} failed: {e}; resume it by hand", console.name());
    }
}

/// A database name as the admin console reads it: plain, or quoted.
fn console_word(name: &str) -> String {
    if !name.is_empty()
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        name.to_string()
    } else {
        quote_ident(name)
    }
}

/// The connection string without a password, for messages.
fn redacted(conninfo: &str) -> String {
    match ConnParams::parse(conninfo) {
        Ok(p) => p.without_password().to_conninfo_string(),
        Err(_) => "(unparsable connection string)".into(),
    }
}

fn ini_error(path: &Path, e: std::io::Error) -> Error {
    Error::invalid(
        format!("pgbouncer ini {}: {e}", path.display()),
        "pgleap must be able to read and write the pooler's ini file (--pgbouncer-ini PATH)",
    )
}

/// Replaces the file's content through a new file renamed over it, so the
/// pooler never reads half a file; the mode is kept.
fn write_in_place(path: &Path, content: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.pgleap-{}", std::process::id()));
    let result = (|| {
        let meta = std::fs::metadata(path)?;
        std::fs::write(&tmp, content)?;
        std::fs::set_permissions(&tmp, meta.permissions())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let _ = std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()));
        }
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| ini_error(path, e))
}

/// Runs the user's switch command with the new server's settings (never a
/// password) in its environment.
async fn run_command(
    command: &str,
    timeout: Duration,
    to: &ResolvedConn,
    sync: &str,
    target: &str,
) -> Result<()> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env_remove("PGPASSWORD")
        .env("PGHOST", to.hosts.join(","))
        .env("PGPORT", to.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","))
        .env("PGDATABASE", &to.dbname)
        .env("PGUSER", &to.user)
        .env("PGLEAP_SYNC", sync)
        .env("PGLEAP_TARGET", target)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let failed = |why: String| {
        Error::invalid(
            format!("the switch command failed: {why}"),
            "nothing was switched: the source was unfenced and takes writes again; fix the \
             command (it gets PGHOST, PGPORT, PGDATABASE, PGUSER of the new server) and retry",
        )
    };
    let output = match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => return Err(failed(format!("still running after {timeout:?}"))),
        Ok(Err(e)) => return Err(failed(format!("cannot run it: {e}"))),
        Ok(Ok(out)) => out,
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(failed(format!("{}: {}", output.status, stderr.trim())));
    }
    Ok(())
}

/// The ini text with the `[databases]` entry `db` pointed at host, port and
/// dbname; its other settings (user, pool_size, ...) and every other byte
/// of the file stay as they are.
fn rewrite_entry(
    ini: &str,
    db: &str,
    host: &str,
    port: u16,
    dbname: &str,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(ini.len() + 64);
    let mut section = String::new();
    let mut found = false;
    for line in ini.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let ending = &line[body.len()..];
        let trimmed = body.trim();
        if trimmed.starts_with('[') && trimmed.ends_with(']') {
            section = trimmed[1..trimmed.len() - 1].trim().to_ascii_lowercase();
        } else if section == "databases"
            && !trimmed.starts_with(';')
            && !trimmed.starts_with('#')
            && let Some((key, value)) = body.split_once('=')
            && key.trim().trim_matches('"') == db
        {
            let mut pairs = parse_pairs(value)?;
            for (k, v) in
                [("host", host.to_string()), ("port", port.to_string()), ("dbname", dbname.into())]
            {
                match pairs.iter_mut().find(|(pk, _)| pk == k) {
                    Some(pair) => pair.1 = quote_value(&v),
                    None => pairs.push((k.to_string(), quote_value(&v))),
                }
            }
            let value: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("{key}= {}{ending}", value.join(" ")));
            found = true;
            continue;
        }
        out.push_str(line);
    }
    if !found {
        return Err(format!("no entry for database \"{db}\" in [databases]"));
    }
    Ok(out)
}

/// `key=value` pairs of a pooler entry, values kept as written (quoted or
/// not).
fn parse_pairs(value: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut rest = value.trim_start();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .ok_or_else(|| format!("cannot read the entry \"{}\"", value.trim()))?;
        let after = after.trim_start();
        let end = if let Some(quoted) = after.strip_prefix('\'') {
            let mut i = 0;
            let bytes = quoted.as_bytes();
            loop {
                match bytes.get(i) {
                    None => return Err(format!("unterminated quote in \"{}\"", value.trim())),
                    Some(b'\\') => i += 2,
                    Some(b'\'') => break i + 2,
                    Some(_) => i += 1,
                }
            }
        } else {
            after.find(char::is_whitespace).unwrap_or(after.len())
        };
        pairs.push((key.trim().to_string(), after[..end].to_string()));
        rest = after[end..].trim_start();
    }
    Ok(pairs)
}

fn quote_value(v: &str) -> String {
    if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INI: &str = "; the pooler\n[databases]\nother = host=a port=1 dbname=o\n\
                       app = host=old.example port=5432 dbname=app user=app_user pool_size=20 password='it''s'\n\
                       \n[pgbouncer]\nlisten_port = 6432\napp = not a database\n";

    #[test]
    fn rewrites_only_the_host_port_and_dbname_of_one_entry() {
        let ini = INI.replace("'it''s'", "'it\\'s'");
        let out = rewrite_entry(&ini, "app", "10.0.0.9", 6543, "app_new").unwrap();
        let expected = ini.replace(
            "app = host=old.example port=5432 dbname=app",
            "app = host=10.0.0.9 port=6543 dbname=app_new",
        );
        assert_eq!(out, expected);
    }

    #[test]
    fn adds_missing_keys_and_quotes_values_that_need_it() {
        let ini = "[databases]\r\napp = dbname=x\r\n";
        let out = rewrite_entry(ini, "app", "/run/my socket", 5432, "y").unwrap();
        assert_eq!(out, "[databases]\r\napp = dbname=y host='/run/my socket' port=5432\r\n");
    }

    #[test]
    fn refuses_an_entry_that_is_not_there() {
        assert!(rewrite_entry(INI, "missing", "h", 1, "d").unwrap_err().contains("missing"));
        assert!(rewrite_entry("[databases]\n* = host=x\n", "app", "h", 1, "d").is_err());
    }
}
