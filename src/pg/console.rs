//! A pooler's admin console (PgBouncer's `pgbouncer` database): commands
//! and SHOW listings over the simple query protocol, which is all it
//! speaks, on a connection without pgleap's session settings.

use std::collections::HashMap;

use tokio_postgres::{Client, SimpleQueryMessage};

use super::conninfo::{ConnParams, Env, PasswordSource, ResolvedConn};
use super::{PgError, Startup};

pub struct Console {
    client: Client,
    /// Names the pooler in errors, as the user gave it (no password).
    name: String,
}

impl Console {
    pub async fn connect(
        name: &str,
        params: &ConnParams,
        env: Env<'_>,
    ) -> Result<Console, PgError> {
        let resolved = ResolvedConn::resolve(params, &PasswordSource::default(), env)
            .map_err(|source| PgError::Resolve { db: name.into(), source })?;
        let client = super::connect(&resolved, Startup::Plain)
            .await
            .map_err(|source| PgError::Connect { db: name.into(), source })?;
        Ok(Console { client, name: name.to_string() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs one admin command (`PAUSE db`, `RELOAD`, ...).
    pub async fn command(&self, sql: &str) -> Result<(), PgError> {
        self.client.batch_execute(sql).await.map_err(|source| PgError::Query {
            db: self.name.clone(),
            context: Some(sql.to_string()),
            source,
        })
    }

    /// The rows of a `SHOW ...` listing, by column name.
    pub async fn show(&self, sql: &str) -> Result<Vec<HashMap<String, String>>, PgError> {
        let messages = self.client.simple_query(sql).await.map_err(|source| PgError::Query {
            db: self.name.clone(),
            context: Some(sql.to_string()),
            source,
        })?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(
                    row.columns()
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (c.name().to_string(), row.get(i).unwrap_or("").to_string()))
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }
}
