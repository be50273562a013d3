//! The relgroup's sequences carried to a target: after each batch, only
//! ever forward; at the cutover, exactly (plus a margin).
//!
//! Sequences are not transactional: a batch's snapshot does not bound
//! them, and setting one is not undone by a rollback. So they travel
//! outside the batch's transactions, by slices of the sequences in one
//! statement each: a transaction naming every sequence of a
//! schema-per-tenant database (thousands) would hold a lock on each, past
//! what the server's lock table holds (see
//! [`crate::pg::Sql::tables_per_transaction`]).

use crate::error::Result;
use crate::pg::{Conn, Sql, quote_literal};

/// A sequence's state: (last_value, is_called).
pub type Value = (i64, bool);

/// Each sequence's (last_value, is_called) on `src`, in order.
pub async fn read(src: &Conn, sequences: &[String]) -> Result<Vec<Value>> {
    let mut out = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(src.tables_per_statement()) {
        let arms: Vec<String> = chunk
            .iter()
            .enumerate()
            .map(|(i, seq)| format!("select {i} i, last_value, is_called from {seq}"))
            .collect();
        let sql = format!(
            "select last_value, is_called from ({}) x order by i",
            arms.join(" union all ")
        );
        for r in src.query_prepared(&sql, &[]).await? {
            out.push((r.get(0), r.get(1)));
        }
    }
    Ok(out)
}

/// Moves each of the target's sequences to the source's `values` where
/// that moves it forward: past its own (last_value, is_called) in the
/// direction of its increment. A round that runs after the cutover has
/// moved the application to the target (the daemon's last round of a sync
/// being retired) must not set a sequence back under values drawn there
/// since; a source sequence reset backwards is therefore not followed (the
/// cutover's [`set_exact`] is exact).
pub async fn carry_forward(src: &Conn, tgt: &Conn, sequences: &[String]) -> Result<()> {
    if sequences.is_empty() {
        return Ok(());
    }
    let values = read(src, sequences).await?;
    let pairs: Vec<(&String, &Value)> = sequences.iter().zip(&values).collect();
    for chunk in pairs.chunks(tgt.tables_per_statement()) {
        let arms: Vec<String> = chunk
            .iter()
            .map(|(seq, (value, called))| {
                let name = quote_literal(seq);
                format!(
                    "select setval({name}::regclass, {value}, {called})
                     from pg_sequence s, (select last_value, is_called from {seq}) cur
                     where s.seqrelid = {name}::regclass
                       and case when s.seqincrement > 0
                                then ({value}::int8, {called}) > (cur.last_value, cur.is_called)
                                else ({value}::int8, not {called}) < (cur.last_value, not cur.is_called)
                           end"
                )
            })
            .collect();
        tgt.batch_execute(&arms.join(" union all ")).await?;
    }
    Ok(())
}

/// Sets the target's sequences to the source's exact values plus `margin`;
/// returns how many.
pub async fn set_exact(src: &Conn, tgt: &Conn, sequences: &[String], margin: i64) -> Result<usize> {
    let values = read(src, sequences).await?;
    let pairs: Vec<(&String, &Value)> = sequences.iter().zip(&values).collect();
    for chunk in pairs.chunks(tgt.tables_per_statement()) {
        let names: Vec<&str> = chunk.iter().map(|(s, _)| s.as_str()).collect();
        let lasts: Vec<i64> = chunk.iter().map(|(_, (v, _))| v + margin).collect();
        // Exact without a margin: a sequence never drawn from hands out
        // its start value next on the target too.
        let called: Vec<bool> = chunk.iter().map(|(_, (_, c))| *c || margin != 0).collect();
        tgt.execute(
            "select count(setval(name::regclass, last, called))
             from unnest($1::text[], $2::int8[], $3::bool[]) x (name, last, called)",
            &[&names, &lasts, &called],
        )
        .await?;
    }
    Ok(values.len())
}
