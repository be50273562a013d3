//! A blocking SQL session for test setup and assertions, over the cluster's
//! unix socket (trust auth), so it works on TLS-only clusters too.

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::cluster::Cluster;

pub struct Sql {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Sql {
    pub fn try_connect(
        cluster: &Cluster,
        user: &str,
        dbname: &str,
    ) -> Result<Sql, tokio_postgres::Error> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&cluster.socket_dir)
            .port(cluster.port)
            .user(user)
            .dbname(dbname)
            .options("-c TimeZone=UTC -c DateStyle=ISO -c extra_float_digits=3");
        let client = rt.block_on(async {
            let (client, conn) = config.connect(NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, tokio_postgres::Error>(client)
        })?;
        Ok(Sql { rt, client })
    }

    /// Runs one or more statements; panics with the server's message.
    pub fn exec(&self, sql: &str) {
        if let Err(e) = self.try_exec(sql) {
            panic!("{sql}\n  failed: {e}");
        }
    }

    pub fn try_exec(&self, sql: &str) -> Result<(), String> {
        self.rt.block_on(self.client.batch_execute(sql)).map_err(|e| match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => e.to_string(),
        })
    }

    /// Every row of a query, every value as text (NULL as None), in the
    /// order the server returns them.
    pub fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let messages = self.rt.block_on(self.client.simple_query(sql)).unwrap_or_else(|e| match e
            .as_db_error()
        {
            Some(db) => panic!("{sql}\n  failed: {}", db.message()),
            None => panic!("{sql}\n  failed: {e}"),
        });
        messages
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => {
                    Some((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect()
    }

    /// The single value of a one-row, one-column query.
    pub fn value(&self, sql: &str) -> String {
        let rows = self.rows(sql);
        assert_eq!(rows.len(), 1, "{sql} returned {} rows", rows.len());
        rows[0][0].clone().unwrap_or_default()
    }
}
