//! Large objects: copied with the initial copy, kept in sync by passes, and
//! compared by verify.
//!
//! No trigger can be put on `pg_largeobject`, and a table owner cannot read
//! that catalog, but any role can list `pg_largeobject_metadata` and read
//! the objects it owns or was granted (`lo_get`). So a pass works by state,
//! like the rest of pgleap: the source's list of readable objects (oid,
//! owner and privileges) is COPYed into a temp table on the target and
//! compared with what the target holds (`<schema>.large_objects`: per oid,
//! the owner and privileges and the content digest last written). Objects
//! gone from the source are unlinked, new ones and ones whose owner or
//! privileges changed are written; content changes leave no trace in the
//! metadata, so a pass also re-digests some objects on the source (all of
//! them in a full pass: at cutover and verify) and rewrites those whose
//! digest moved.
//!
//! A pass runs inside a batch's two transactions, so what it writes is the
//! source's state in the batch's snapshot and commits with the batch.
//! Content moves in chunks of [`CHUNK`] bytes (`lo_get` on the source,
//! `lo_put` on the target): memory stays bounded whatever the object's size.
//! The digest is computed by the server from the same chunks, so both
//! servers compute it identically.

use crate::error::Result;
use crate::pg::{NamedQuery, Sql, Tx, copy_between, quote_ident};

/// Bytes moved per `lo_get`/`lo_put`, and per digested piece.
pub const CHUNK: i32 = 256 * 1024;

/// How many objects an incremental pass re-digests.
const DIGESTS_PER_PASS: i64 = 64;

/// How many objects' digests one query asks the source for.
const DIGESTS_PER_QUERY: usize = 500;

/// `copy_units.table_name` of the initial copy's large-object units (not a
/// quoted table name, so it cannot collide with one).
pub const UNIT_NAME: &str = "pg_largeobject";

/// The objects (`m` in `pg_largeobject_metadata m`) the session's role may
/// read: its own (or its roles'), and those granted SELECT to it or PUBLIC.
const READABLE: &str = "(pg_has_role(m.lomowner, 'USAGE')
     or exists (select 1 from aclexplode(m.lomacl) a
                where a.privilege_type = 'SELECT'
                  and (a.grantee = 0 or pg_has_role(a.grantee, 'USAGE'))))";

/// An object's owner and privileges as text that compares across servers
/// (role names, not oids; grantors left out).
const META: &str = "pg_get_userbyid(m.lomowner) || ' ' || coalesce(
     (select string_agg(x, ',' order by x)
      from (select coalesce(r.rolname, 'PUBLIC') || '=' || a.privilege_type x
            from aclexplode(m.lomacl) a left join pg_roles r on r.oid = a.grantee) g), '')";

/// The digest of the object whose oid is `oid` (an SQL expression): md5 of
/// the md5s of its [`CHUNK`]-sized pieces, computed without holding the
/// object in memory.
fn digest(oid: &str) -> String {
    format!(
        "(select md5(coalesce((select string_agg(md5(lo_get({oid}, o, {CHUNK})), '' order by o)
                              from generate_series(0::int8, s.n - 1, {CHUNK}) o), ''))
          from (select lo_lseek64(lo_open({oid}, 262144), 0, 2) n) s)"
    )
}

/// The state table on a target; created by `target::prepare`.
pub fn state_table(schema: &str) -> String {
    format!(
        "create table if not exists {}.large_objects (
             sync text not null,
             lo oid not null,
             meta text not null,
             digest text not null,
             primary key (sync, lo))",
        quote_ident(schema)
    )
}

/// How much of the content a pass re-digests.
#[derive(Debug, Clone, Copy)]
pub enum Pass {
    /// Up to [`DIGESTS_PER_PASS`] objects above this oid (then from the
    /// start again).
    After(u32),
    /// Every object.
    Full,
}

/// What a pass did.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassStats {
    pub written: u64,
    pub unlinked: u64,
    pub bytes: u64,
    /// Where the next incremental pass goes on digesting.
    pub cursor: u32,
}

/// Brings the target's large objects, inside `ttx`, to the source's state
/// in `stx`'s snapshot (for the objects this pass looks at).
pub async fn pass(
    stx: &Tx<'_>,
    ttx: &Tx<'_>,
    schema: &str,
    sync: &str,
    mode: Pass,
) -> Result<PassStats> {
    let state = format!("{}.large_objects", quote_ident(schema));
    let mut stats = PassStats::default();
    ttx.batch_execute(
        "create temp table if not exists pgleap_lo (lo oid primary key, meta text not null)
             on commit drop;
         truncate pg_temp.pgleap_lo",
    )
    .await?;
    copy_between(
        stx,
        &format!("copy ({}) to stdout", readable_metadata_sql("true")),
        ttx,
        "copy pg_temp.pgleap_lo (lo, meta) from stdin",
        &|_| {},
    )
    .await?;
    let gone = ttx
        .query(
            &format!(
                "delete from {state} s where s.sync = $1
                   and not exists (select 1 from pg_temp.pgleap_lo l where l.lo = s.lo)
                 returning s.lo"
            ),
            &[&sync],
        )
        .await?;
    for row in &gone {
        let lo: u32 = row.get(0);
        ttx.execute(UNLINK, &[&lo]).await?;
        stats.unlinked += 1;
    }
    let changed = ttx
        .query(
            &format!(
                "select l.lo, l.meta from pg_temp.pgleap_lo l
                 left join {state} s on s.sync = $1 and s.lo = l.lo
                 where s.lo is null or s.meta <> l.meta
                 order by l.lo"
            ),
            &[&sync],
        )
        .await?;
    for row in &changed {
        stats.bytes += write(stx, ttx, &state, sync, row.get(0), row.get(1)).await?;
        stats.written += 1;
    }
    let (after, limit) = match mode {
        Pass::After(cursor) => (cursor, DIGESTS_PER_PASS),
        Pass::Full => (0, i64::MAX),
    };
    let candidates = ttx
        .query(
            &format!(
                "select s.lo, s.meta, s.digest from {state} s
                 where s.sync = $1 and s.lo > $2 order by s.lo limit $3"
            ),
            &[&sync, &after, &limit],
        )
        .await?;
    // Digested on the source a slice of objects per round trip: a full
    // pass runs inside the cutover's fence, where a round trip per object
    // was most of its time.
    for slice in candidates.chunks(DIGESTS_PER_QUERY) {
        let oids: Vec<u32> = slice.iter().map(|r| r.get(0)).collect();
        let on_source: std::collections::HashMap<u32, String> = stx
            .query(&source_digests_sql(), &[&oids])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for row in slice {
            let (lo, meta, digest): (u32, String, String) = (row.get(0), row.get(1), row.get(2));
            stats.cursor = lo;
            if on_source.get(&lo) != Some(&digest) {
                stats.bytes += write(stx, ttx, &state, sync, lo, &meta).await?;
                stats.written += 1;
            }
        }
    }
    if (candidates.len() as i64) < limit {
        // The end of the list: the next pass starts again from the start.
        stats.cursor = 0;
    }
    Ok(stats)
}

/// The digest of one object on the source, if it still exists there.
async fn source_digest(stx: &Tx<'_>, lo: u32) -> Result<Option<String>> {
    let row = stx.query_opt(&source_digests_sql(), &[&vec![lo]]).await?;
    Ok(row.map(|r| r.get(1)))
}

/// Writes one object to the target as the source has it: content (in
/// chunks), privileges for the roles the target has, owner; and records
/// it. Returns the bytes written.
async fn write(
    stx: &Tx<'_>,
    ttx: &Tx<'_>,
    state: &str,
    sync: &str,
    lo: u32,
    meta: &str,
) -> Result<u64> {
    ttx.execute(UNLINK, &[&lo]).await?;
    ttx.execute("select lo_create($1)", &[&lo]).await?;
    let bytes = copy_content(stx, ttx, lo).await?;
    copy_privileges(stx, ttx, lo).await?;
    let digest = source_digest(stx, lo).await?.unwrap_or_default();
    ttx.execute(
        &format!(
            "insert into {state} (sync, lo, meta, digest) values ($1, $2, $3, $4)
             on conflict (sync, lo) do update set meta = excluded.meta, digest = excluded.digest"
        ),
        &[&sync, &lo, &meta, &digest],
    )
    .await?;
    Ok(bytes)
}

/// Streams an object's content in [`CHUNK`]-sized pieces.
async fn copy_content(stx: &Tx<'_>, ttx: &Tx<'_>, lo: u32) -> Result<u64> {
    let mut offset: i64 = 0;
    loop {
        let piece: Vec<u8> =
            stx.query_one("select lo_get($1, $2, $3)", &[&lo, &offset, &CHUNK]).await?.get(0);
        if piece.is_empty() {
            return Ok(offset as u64);
        }
        ttx.execute("select lo_put($1, $2, $3)", &[&lo, &offset, &piece]).await?;
        offset += piece.len() as i64;
        if piece.len() < CHUNK as usize {
            return Ok(offset as u64);
        }
    }
}

/// Grants what the source grants on the object (to roles the target has),
/// then gives it to its owner, if the target has that role and this role
/// may.
async fn copy_privileges(stx: &Tx<'_>, ttx: &Tx<'_>, lo: u32) -> Result<()> {
    let row = stx.query_one(OWNER_AND_GRANTS, &[&lo]).await?;
    let (owner, grants): (String, Vec<String>) = (row.get(0), row.get(1));
    for grant in &grants {
        let Some((role, privilege)) = grant.split_once('=') else { continue };
        let grantee = if role.is_empty() {
            "public".to_string()
        } else if role_exists(ttx, role).await? {
            quote_ident(role)
        } else {
            tracing::warn!(
                "large object {lo}: role {role} does not exist on the target; its {privilege} grant is left out"
            );
            continue;
        };
        let privilege = if privilege == "UPDATE" { "update" } else { "select" };
        ttx.batch_execute(&format!("grant {privilege} on large object {lo} to {grantee}")).await?;
    }
    let me: String = ttx.query_one("select current_user::text", &[]).await?.get(0);
    if owner != me {
        if role_exists(ttx, &owner).await? {
            ttx.batch_execute(&format!("alter large object {lo} owner to {}", quote_ident(&owner)))
                .await?;
        } else {
            tracing::warn!(
                "large object {lo}: owner {owner} does not exist on the target; it stays {me}'s"
            );
        }
    }
    Ok(())
}

async fn role_exists(c: &impl Sql, role: &str) -> Result<bool> {
    Ok(c.query_one(ROLE_EXISTS, &[&role]).await?.get(0))
}

/// Splits the readable objects into oid ranges of about `per_unit` objects
/// for the initial copy; one unit (`true`) when there are few.
pub async fn unit_predicates(stx: &Tx<'_>, per_unit: i64) -> Result<Vec<String>> {
    let bounds = stx.query(&unit_bounds_sql(), &[&per_unit]).await?;
    let bounds: Vec<u32> = bounds.iter().map(|r| r.get(0)).collect();
    if bounds.len() <= 1 {
        return Ok(vec!["true".to_string()]);
    }
    let mut out = Vec::new();
    for (i, lo) in bounds.iter().enumerate() {
        out.push(match bounds.get(i + 1) {
            _ if i == 0 => format!("m.oid < {}", bounds[1]),
            Some(next) => format!("m.oid >= {lo} and m.oid < {next}"),
            None => format!("m.oid >= {lo}"),
        });
    }
    Ok(out)
}

/// Copies the readable objects matching `predicate` (one initial-copy
/// unit). Returns (objects, bytes).
pub async fn copy_unit(
    stx: &Tx<'_>,
    ttx: &Tx<'_>,
    schema: &str,
    sync: &str,
    predicate: &str,
) -> Result<(u64, u64)> {
    let state = format!("{}.large_objects", quote_ident(schema));
    let rows =
        stx.query(&format!("{} order by m.oid", readable_metadata_sql(predicate)), &[]).await?;
    let mut bytes = 0;
    for row in &rows {
        bytes += write(stx, ttx, &state, sync, row.get(0), row.get(1)).await?;
    }
    Ok((rows.len() as u64, bytes))
}

/// Objects the role cannot read on the source: (count, the first oids).
pub async fn unreadable(c: &impl Sql) -> Result<(i64, Vec<u32>)> {
    let row = c.query_one(&unreadable_sql(), &[]).await?;
    Ok((row.get(0), row.get(1)))
}

/// Whether the database has any large object.
pub async fn any(c: &impl Sql) -> Result<bool> {
    Ok(c.query_one(ANY, &[]).await?.get(0))
}

/// Number of buckets verify sums objects into.
const BUCKETS: i64 = 64;
/// How many differing oids verify names.
const SHOWN: usize = 10;

/// Compares the readable large objects of two servers (oid, owner,
/// privileges, content digest): (source count, target count, differing
/// oids). Sums per bucket cross the wire; only differing buckets are read
/// object by object.
pub async fn compare(src: &impl Sql, tgt: &impl Sql) -> Result<(i64, i64, Vec<String>)> {
    let per_bucket = per_bucket_sql();
    let (a, b) =
        futures_util::future::try_join(src.query(&per_bucket, &[]), tgt.query(&per_bucket, &[]))
            .await?;
    let rows = |v: &[tokio_postgres::Row]| -> Vec<(i64, i64, String)> {
        v.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
    };
    let (a, b) = (rows(&a), rows(&b));
    let count = |v: &[(i64, i64, String)]| v.iter().map(|x| x.1).sum::<i64>();
    let mut buckets: Vec<i64> = a.iter().filter(|x| !b.contains(x)).map(|x| x.0).collect();
    buckets.extend(b.iter().filter(|x| !a.contains(x)).map(|x| x.0));
    buckets.sort_unstable();
    buckets.dedup();
    let mut differing = Vec::new();
    for bucket in buckets {
        let objects = bucket_objects_sql(bucket);
        let (ra, rb) =
            futures_util::future::try_join(src.query(&objects, &[]), tgt.query(&objects, &[]))
                .await?;
        let pairs = |v: &[tokio_postgres::Row]| -> Vec<(String, String)> {
            v.iter().map(|r| (r.get(0), r.get(1))).collect()
        };
        let (ra, rb) = (pairs(&ra), pairs(&rb));
        for (oid, _) in
            ra.iter().filter(|r| !rb.contains(r)).chain(rb.iter().filter(|r| !ra.contains(r)))
        {
            if !differing.contains(oid) && differing.len() < SHOWN {
                differing.push(oid.clone());
            }
        }
    }
    differing.sort();
    Ok((count(&a), count(&b), differing))
}

// The catalog queries of this module, named.

const UNLINK: &str = "select lo_unlink(m.oid) from pg_largeobject_metadata m where m.oid = $1";

const OWNER_AND_GRANTS: &str = "select pg_get_userbyid(m.lomowner),
        coalesce((select array_agg(coalesce(r.rolname, '') || '=' || a.privilege_type)
                  from aclexplode(m.lomacl) a left join pg_roles r on r.oid = a.grantee
                  where a.grantee <> m.lomowner), '{}')
     from pg_largeobject_metadata m where m.oid = $1";

const ROLE_EXISTS: &str = "select exists (select 1 from pg_roles where rolname = $1)";

const ANY: &str = "select exists (select 1 from pg_largeobject_metadata)";

/// The readable objects matching `predicate`, with their metadata.
fn readable_metadata_sql(predicate: &str) -> String {
    format!("select m.oid, {META} from pg_largeobject_metadata m where {READABLE} and {predicate}")
}

fn source_digests_sql() -> String {
    format!(
        "select m.oid, {} from pg_largeobject_metadata m where m.oid = any($1::oid[])",
        digest("m.oid")
    )
}

fn unit_bounds_sql() -> String {
    format!(
        "select min(oid) from (
             select m.oid, (row_number() over (order by m.oid) - 1) / $1 part
             from pg_largeobject_metadata m where {READABLE}) x
         group by part order by 1"
    )
}

fn unreadable_sql() -> String {
    format!(
        "select count(*), coalesce((array_agg(m.oid order by m.oid))[1:10], '{{}}')
         from pg_largeobject_metadata m where not {READABLE}"
    )
}

fn per_bucket_sql() -> String {
    format!(
        "select (m.oid::int8 % {BUCKETS})::int8 b, count(*),
                md5(string_agg(m.oid::text || ' ' || {META} || ' ' || {d}, ',' order by m.oid))
         from pg_largeobject_metadata m where {READABLE} group by 1 order by 1",
        d = digest("m.oid")
    )
}

fn bucket_objects_sql(bucket: i64) -> String {
    format!(
        "select m.oid::text, {META} || ' ' || {d} from pg_largeobject_metadata m
         where {READABLE} and m.oid::int8 % {BUCKETS} = {bucket} order by 1",
        d = digest("m.oid")
    )
}

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries() -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("large objects: unlink", UNLINK),
        NamedQuery::new("large objects: owner and grants", OWNER_AND_GRANTS),
        NamedQuery::new("large objects: role exists", ROLE_EXISTS),
        NamedQuery::new("large objects: any", ANY),
        NamedQuery::new("large objects: readable metadata", readable_metadata_sql("true")),
        NamedQuery::new("large objects: source digests", source_digests_sql()),
        NamedQuery::new("large objects: copy unit bounds", unit_bounds_sql()),
        NamedQuery::new("large objects: unreadable", unreadable_sql()),
        NamedQuery::new("large objects: verify buckets", per_bucket_sql()),
        NamedQuery::new("large objects: verify one bucket", bucket_objects_sql(0)),
    ]
}
