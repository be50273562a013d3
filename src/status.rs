//! What each sync is doing: the last rounds (from the catalog, written by
//! whoever ran them) and, live from the source, the changes still waiting
//! and how old the oldest is. Works whether or not the daemon runs.

use serde::Serialize;

use crate::apply::{self, Plan};
use crate::catalog::{Catalog, SyncState};
use crate::error::Result;
use crate::pg::Env;
use crate::route::SyncRoute;

#[derive(Debug, Serialize)]
pub struct SyncStatus {
    pub name: String,
    pub source: String,
    pub relgroup: String,
    pub autokick: bool,
    pub onetimecopy: String,
    /// Whether the sync carries the database's large objects.
    pub large_objects: bool,
    /// Seconds between two large-object passes of the daemon.
    pub lo_interval: u32,
    pub tables: Vec<String>,
    pub targets: Vec<TargetStatus>,
    /// Why pending changes and lag could not be read, if they could not.
    pub source_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TargetStatus {
    pub target: String,
    #[serde(flatten)]
    pub last: SyncState,
    pub pending: Option<i64>,
    pub lag_seconds: Option<f64>,
    /// After a cutover: where the writes go now.
    pub writes_go_to: Option<String>,
}

/// Status of the named sync, or of every sync.
pub async fn gather(
    catalog: &Catalog,
    only: Option<&str>,
    env: Env<'_>,
) -> Result<Vec<SyncStatus>> {
    let syncs = match only {
        Some(name) => vec![catalog.sync(name)?],
        None => catalog.syncs()?,
    };
    let mut out = Vec::new();
    for sync in syncs {
        let route = SyncRoute::resolve(catalog, sync)?;
        let sync = &route.sync;
        let source = route.source.name.clone();
        let cut_over = sync.retired && catalog.was_cut_over(&sync.name)?;
        let mut states = catalog.sync_states(&sync.name)?;
        if cut_over {
            for s in &mut states {
                s.state = "cut over".into();
            }
        }
        let live = async {
            let src = route.source.connect(env).await?;
            let plan = Plan::load(&src, sync, &route.relgroup).await?;
            let mut pending = Vec::new();
            for target in &route.targets {
                pending.push(apply::pending(&src, &plan, &target.name).await?);
            }
            Ok::<_, crate::Error>((plan, pending))
        }
        .await;
        let (tables, pending, source_error) = match live {
            Ok((plan, pending)) => {
                (plan.tables.iter().map(|t| t.display.clone()).collect(), Some(pending), None)
            }
            Err(e) => (Vec::new(), None, Some(e.to_string())),
        };
        let targets = route
            .targets
            .iter()
            .map(|t| t.name.as_str())
            .enumerate()
            .map(|(i, target)| TargetStatus {
                target: target.to_string(),
                last: states.iter().find(|s| s.target == target).cloned().unwrap_or_else(|| {
                    SyncState {
                        target: target.to_string(),
                        state: "new".into(),
                        ..Default::default()
                    }
                }),
                pending: pending.as_ref().map(|p| p[i].0),
                writes_go_to: cut_over.then(|| target.to_string()),
                lag_seconds: pending.as_ref().map(|p| p[i].1),
            })
            .collect();
        out.push(SyncStatus {
            name: sync.name.clone(),
            source,
            relgroup: sync.relgroup.clone(),
            autokick: sync.autokick,
            onetimecopy: sync.onetimecopy.as_str().into(),
            large_objects: route.relgroup.large_objects,
            lo_interval: sync.lo_interval,
            tables,
            targets,
            source_error,
        });
    }
    Ok(out)
}
