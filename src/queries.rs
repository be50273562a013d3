//! Every catalog query pgleap builds, gathered from the modules that send
//! them, for `pgleap db check-queries`: each is prepared (parsed and
//! planned, never run) on a server, as built for that server's version.
//! A release whose catalog differs from what pgleap expects (a column
//! renamed, a function gone) is found here, before a migration, not
//! half-way through one; the test suite runs it on every supported major.
//!
//! Queries over pgleap's own tables or a user's tables (built from their
//! names) are not catalog queries: they are proven by the tests that run
//! the job on every major.

use crate::catalog::Catalog;
use crate::error::Result;
use crate::pg::{Env, NamedQuery, Sql};
use crate::route::DbConn;

/// What `db check-queries` found: the server's version, how many catalog
/// queries were prepared, and those the server refused with its message.
pub struct QueryCheck {
    pub server_version: String,
    pub prepared: usize,
    pub refused: Vec<(String, String)>,
}

/// Prepares every catalog query pgleap builds for this database's server
/// version.
pub async fn check(catalog: &Catalog, name: &str, env: Env<'_>) -> Result<QueryCheck> {
    let conn = DbConn::from_catalog(catalog, name)?.connect(env).await?;
    let v = conn.version();
    let queries: Vec<NamedQuery> = [
        crate::inventory::catalog_queries(v),
        crate::capture::catalog_queries(v),
        crate::decoding::catalog_queries(),
        crate::large_objects::catalog_queries(),
        crate::apply::catalog_queries(v),
        crate::target::catalog_queries(v),
        crate::fidelity::catalog_queries(v),
        crate::dump::catalog_queries(),
        crate::schema::catalog_queries(v),
        crate::evolve::catalog_queries(v),
        crate::copy::catalog_queries(),
        crate::objects::catalog_queries(),
        crate::cutover::catalog_queries(),
        crate::upgrade::catalog_queries(),
        crate::server::catalog_queries(v),
        crate::status::catalog_queries(v),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut refused = Vec::new();
    for q in &queries {
        if let Err(e) = conn.prepare_only(&q.sql).await {
            refused.push((q.name.clone(), e.message()));
        }
    }
    Ok(QueryCheck { server_version: v.to_string(), prepared: queries.len(), refused })
}
