//! Values too large to travel whole (#28): a row of a COPY is one protocol
//! message, which the client library reads whole into its buffer (and the
//! target's COPY encodes whole again), so a 64 MB bytea (128 MB as COPY
//! text) cost pgleap half a gigabyte of memory, and a bytea over 512 MB
//! cannot be copied in COPY's text format at all (its text passes the
//! server's 1 GB limit; pg_dump fails on it the same way).
//!
//! A bytea, text or varchar value longer than [`threshold`] bytes travels
//! as an empty value in the row's COPY; the row is also marked with where
//! it lives on the source (`tableoid:ctid`, stable within the transaction
//! that read it), and the value follows in slices of [`threshold`] bytes
//! (a quarter of that in characters for text), each one read by
//! `substring` in the same source transaction and appended to a temp table
//! on the target, then assembled there by `string_agg` into the row. So
//! pgleap holds one slice at a time, whatever the value's size; the
//! servers hold the whole value, as they do for any write of it.
//!
//! The batch's staging table carries the mark in a column of its own; the
//! initial copy sends such rows through a temp table shaped like the
//! staging one, then inserts them. Other types (json, arrays, ...) still
//! travel whole, as does a keyless table's change (its row image comes
//! from the delta).

use crate::error::Result;
use crate::pg::{Sql, Tx};

/// How a column's large values are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// bytea: `substring` counts bytes.
    Bytes,
    /// text, varchar: `substring` counts characters (at most four bytes
    /// each).
    Text,
}

/// Values longer than this many bytes move in slices of this size:
/// `PGLEAP_SLICE_BYTES` (tests use a small one), else 8 MiB (16 MiB as
/// COPY text, a few times that in pgleap's memory at most).
pub fn threshold() -> i64 {
    std::env::var("PGLEAP_SLICE_BYTES").ok().and_then(|s| s.parse().ok()).unwrap_or(8 << 20)
}

/// The column that marks a row whose large values follow in slices: the
/// source row's `tableoid:ctid`, NULL for a row that travelled whole.
pub const MARK: &str = "_pgleap_sliced";

/// Whether `expr` (a sliceable column of table alias `t`) is large.
fn large(expr: &str) -> String {
    format!("coalesce(octet_length({expr}) > {}, false)", threshold())
}

/// What a COPY out selects for sliceable column `expr`: itself, or the
/// empty value of its type when it is large (the slices follow).
pub fn carried(expr: &str, kind: Kind) -> String {
    let empty = match kind {
        Kind::Bytes => "'\\x'::bytea",
        Kind::Text => "''",
    };
    format!("case when {} then {empty} else {expr} end", large(expr))
}

/// `expr` (a sliceable column) in a form whose text two servers compare:
/// itself, or when large its md5 (`md5:` and 32 hex digits): a row's text
/// holding a bytea over 512 MB passes the server's 1 GB limit, so verify
/// and the fence's comparison of applied rows could not read it whole.
pub fn comparable(expr: &str) -> String {
    format!("case when {} then 'md5:' || md5({expr}) else {expr}::text end", large(expr))
}

/// A table's columns whose values may move in slices (quoted names).
pub type Sliceable = [(String, Kind)];

/// Whether a row (alias `alias`) has a large value in one of `columns`.
pub fn any_large(columns: &Sliceable, alias: &str) -> String {
    if columns.is_empty() {
        return "false".into();
    }
    let each: Vec<String> = columns.iter().map(|(c, _)| large(&format!("{alias}.{c}"))).collect();
    each.join(" or ")
}

/// The mark a COPY out selects for a row (alias `alias`): where the row
/// lives on the source when it has a large value in one of `columns`, else
/// NULL.
pub fn mark(columns: &Sliceable, alias: &str) -> String {
    if columns.is_empty() {
        return "null::text".into();
    }
    format!(
        "case when {} then {alias}.tableoid::text || ':' || {alias}.ctid::text end",
        any_large(columns, alias)
    )
}

/// Fills the large values of the rows of `dest` (a temp table on the
/// target with [`MARK`] and the table's columns) that a COPY carried
/// empty, those of `marks`: each read from the row of `rel` its mark
/// names, in `stx` (the snapshot the row was read in), in slices. Returns
/// how many values.
pub async fn fill(
    stx: &Tx<'_>,
    ttx: &Tx<'_>,
    columns: &Sliceable,
    rel: &str,
    dest: &str,
    marks: &[String],
) -> Result<u64> {
    if columns.is_empty() || marks.is_empty() {
        return Ok(0);
    }
    // Left empty after each value (a failed transaction's rows roll back):
    // no ON COMMIT action, which would cost every commit (see
    // `apply::create_staging`).
    ttx.batch_execute("create temp table if not exists pgleap_slices (n int, b bytea)").await?;
    let slice = threshold();
    let mut filled = 0;
    let here = "tableoid = $1 and ctid = $2::text::tid";
    let lengths: Vec<String> =
        columns.iter().map(|(c, _)| format!("coalesce(octet_length({c}), 0)::int8")).collect();
    let lengths = format!("select {} from {rel} where {here}", lengths.join(", "));
    for mark in marks {
        let Some((oid, ctid)) = mark.split_once(':') else { continue };
        let oid: u32 = oid.parse().unwrap_or_default();
        let row = stx.query_one(&lengths, &[&oid, &ctid]).await?;
        for (i, (column, kind)) in columns.iter().enumerate() {
            if row.get::<_, i64>(i) <= slice {
                continue;
            }
            let slice = i32::try_from(slice).unwrap_or(i32::MAX);
            // Text is cut by characters (never inside one), of up to four
            // bytes each, and travels as the database's own bytes (as COPY
            // carries it: a SQL_ASCII database's need not be valid UTF-8).
            let (step, piece) = match kind {
                Kind::Bytes => (slice, format!("substring({column} from $3::int4 for $4::int4)")),
                Kind::Text => (
                    (slice / 4).max(1),
                    format!(
                        "convert_to(substring({column} from $3::int4 for $4::int4),
                                    current_setting('server_encoding'))"
                    ),
                ),
            };
            let read = format!("select {piece} from {rel} where {here}");
            let mut n: i32 = 0;
            let mut from: i32 = 1;
            loop {
                let got: Vec<u8> = stx.query_one(&read, &[&oid, &ctid, &from, &step]).await?.get(0);
                if got.is_empty() {
                    break;
                }
                ttx.execute("insert into pgleap_slices (n, b) values ($1, $2)", &[&n, &got])
                    .await?;
                n += 1;
                from += step;
            }
            let whole = "(select string_agg(b, '\\x'::bytea order by n) from pgleap_slices)";
            let value = match kind {
                Kind::Bytes => whole.to_string(),
                Kind::Text => format!("convert_from({whole}, current_setting('server_encoding'))"),
            };
            ttx.execute(
                &format!("update {dest} set {column} = {value} where {MARK} = $1"),
                &[mark],
            )
            .await?;
            ttx.batch_execute("truncate pgleap_slices").await?;
            filled += 1;
        }
    }
    tracing::info!(table = rel, values = filled, "large values moved in slices");
    Ok(filled)
}
