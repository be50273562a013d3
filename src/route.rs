//! What the catalog's names stand for: a database's connection settings
//! ([`DbConn`]) and everything one sync's steps need ([`SyncRoute`]: the
//! sync, its relgroup, its source and its targets), read once.

use std::path::PathBuf;

use crate::catalog::{Catalog, RelGroup, Sync};
use crate::error::{Error, Result};
use crate::pg::{Conn, ConnParams, Env, PasswordSource, PgError, ResolvedConn};

/// A database's connection details, taken from the catalog once, so that
/// parallel workers can open connections without holding the catalog.
#[derive(Clone)]
pub struct DbConn {
    pub name: String,
    params: ConnParams,
    password: PasswordSource,
}

impl DbConn {
    pub fn from_catalog(catalog: &Catalog, name: &str) -> Result<DbConn> {
        let db = catalog.db(name)?;
        let params = ConnParams::parse(&db.conninfo)
            .map_err(|source| Error::Conninfo { db: name.into(), source })?;
        let password = PasswordSource {
            stored: catalog.stored_password(name)?,
            file: db.password_file.map(PathBuf::from),
        };
        Ok(DbConn { name: name.to_string(), params, password })
    }

    pub async fn connect(&self, env: Env<'_>) -> Result<Conn> {
        Ok(Conn::connect(&self.name, &self.params, &self.password, env).await?)
    }

    /// Where the settings lead (host, port, dbname, user), without
    /// connecting.
    pub fn resolve(&self, env: Env<'_>) -> Result<ResolvedConn> {
        Ok(ResolvedConn::resolve(&self.params, &self.password, env)
            .map_err(|source| PgError::Resolve { db: self.name.clone(), source })?)
    }

    /// For a child process (pg_dump, pg_restore): the connection string,
    /// which never holds a password, and the password for its environment.
    pub fn for_child(&self, env: Env<'_>) -> Result<(String, Option<String>)> {
        let resolved = self.resolve(env)?;
        Ok((self.params.to_conninfo_string(), resolved.password().map(str::to_string)))
    }
}

/// A sync resolved through the catalog: sync → relgroup, and sync →
/// dbgroup → source and targets.
#[derive(Clone)]
pub struct SyncRoute {
    pub sync: Sync,
    pub relgroup: RelGroup,
    pub source: DbConn,
    pub targets: Vec<DbConn>,
}

impl SyncRoute {
    /// Resolves the sync of this name.
    pub fn load(catalog: &Catalog, name: &str) -> Result<SyncRoute> {
        Self::resolve(catalog, catalog.sync(name)?)
    }

    /// Resolves a sync record (one that may not be in the catalog yet).
    pub fn resolve(catalog: &Catalog, sync: Sync) -> Result<SyncRoute> {
        let relgroup = catalog.relgroup(&sync.relgroup)?;
        let dbgroup = catalog.dbgroup(&sync.dbgroup)?;
        let source = DbConn::from_catalog(catalog, dbgroup.source())?;
        let targets = dbgroup
            .targets()
            .map(|t| DbConn::from_catalog(catalog, t))
            .collect::<Result<Vec<_>>>()?;
        Ok(SyncRoute { sync, relgroup, source, targets })
    }

    pub fn name(&self) -> &str {
        &self.sync.name
    }

    pub fn target(&self, name: &str) -> Result<&DbConn> {
        self.targets.iter().find(|t| t.name == name).ok_or_else(|| {
            Error::invalid(
                format!("database \"{name}\" is not a target of sync \"{}\"", self.sync.name),
                format!("pgleap sync show {} lists its targets", self.sync.name),
            )
        })
    }

    /// The one target, for the steps that move the application to it.
    pub fn sole_target(&self) -> Result<&DbConn> {
        match self.targets.as_slice() {
            [t] => Ok(t),
            _ => Err(Error::invalid(
                format!(
                    "sync \"{}\" has {} targets where one is needed",
                    self.sync.name,
                    self.targets.len()
                ),
                "for a cutover, name the target with --to NAME",
            )),
        }
    }

    /// Refuses a sync that cutover (or teardown) retired.
    pub fn check_active(&self) -> Result<()> {
        if self.sync.retired {
            return Err(Error::invalid(
                format!(
                    "sync \"{}\" was cut over (or is being torn down): it no longer replicates",
                    self.sync.name
                ),
                format!("pgleap teardown {} removes what is left of it", self.sync.name),
            ));
        }
        if let Some(reason) = &self.sync.paused {
            return Err(Error::Paused { sync: self.sync.name.clone(), reason: reason.clone() });
        }
        Ok(())
    }
}
