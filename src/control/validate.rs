//! Whether a subscription may be accepted, asked of Postgres through the
//! pool: the role is allowed and exists, the tables are published, the
//! selected columns exist and the role may read them.

use std::sync::Arc;

use deadpool_postgres::Pool;

use crate::bus::Subscription;
use crate::catalog::{self, Catalog};
use crate::pgoutput::Oid;
use crate::subscription::{self as subscription, CompileError, filter};
use crate::subscription::{Entry, Events};

/// The verdict on one subscription.
#[derive(Debug)]
pub enum Verdict {
    /// Accept: match it against these tables.
    Accepted {
        /// Ready to register.
        entry: Arc<Entry>,
        /// The published tables it covers (wildcards expanded).
        tables: Vec<Oid>,
    },
    /// Refuse, with a message for the client (Supabase's where it has one).
    Rejected(String),
}

/// Why validation could not decide (the database is unreachable).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection.
    #[error("validating a subscription: no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A query failed.
    #[error("validating a subscription: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// The catalog could not be read.
    #[error("validating a subscription: {0}")]
    Catalog(#[from] catalog::Error),
    /// A filter could not be compiled for lack of the database.
    #[error("validating a subscription: {0}")]
    Compile(CompileError),
}

/// Validates subscriptions against the database.
pub struct Validator {
    pool: Pool,
    catalog: Catalog,
    publication: String,
    allowed_roles: Vec<String>,
}

impl Validator {
    /// A validator for subscriptions to `publication` by `allowed_roles`.
    pub fn new(pool: Pool, publication: String, allowed_roles: Vec<String>) -> Self {
        Validator {
            catalog: Catalog::new(pool.clone()),
            pool,
            publication,
            allowed_roles,
        }
    }

    /// Decides on `subscription` of `gateway`.
    pub async fn validate(
        &mut self,
        gateway: &str,
        subscription: &Subscription,
    ) -> Result<Verdict, Error> {
        let s = subscription;
        let reject = |message: String| Ok(Verdict::Rejected(message));
        if s.id.is_empty() {
            return reject("subscription id must not be empty".into());
        }
        if !self.allowed_roles.contains(&s.role) {
            return reject(format!(
                "role {:?} may not subscribe (allowed roles: {})",
                s.role,
                self.allowed_roles.join(", ")
            ));
        }
        if let Some(claimed) = s.claims.get("role").and_then(|r| r.as_str())
            && claimed != s.role
        {
            return reject(format!(
                "role {:?} is not the claims' role {claimed:?}",
                s.role
            ));
        }
        let client = self.pool.get().await?;
        let role = client
            .query_opt(
                "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = $1",
                &[&s.role],
            )
            .await?;
        match role {
            None => return reject(format!("role {:?} does not exist", s.role)),
            Some(row) if row.get::<_, bool>(0) => {
                return reject(format!(
                    "role {:?} is a superuser and may not subscribe",
                    s.role
                ));
            }
            Some(_) => {}
        }
        let wildcard = s.schema == "*" || s.table == "*";
        let rows = client
            .query(
                include_str!("../../sql/subscription_tables.sql"),
                &[
                    &self.publication,
                    &like_pattern(&s.schema),
                    &like_pattern(&s.table),
                ],
            )
            .await?;
        if rows.is_empty() || s.schema.is_empty() || s.table.is_empty() {
            return reject(unable_to_subscribe(s));
        }
        let tables: Vec<Oid> = rows.iter().map(|r| r.get(0)).collect();
        let parsed = match filter::parse(s.filter.as_deref().unwrap_or("")) {
            Ok(parsed) => parsed,
            Err(e) => return reject(e.to_string()),
        };
        let mut filters = Vec::with_capacity(tables.len());
        for table in &tables {
            let mut compiled = Vec::with_capacity(parsed.len());
            for f in &parsed {
                let Some(row) = client
                    .query_opt(
                        include_str!("../../sql/subscription_filter_column.sql"),
                        &[table, &f.column, &s.role],
                    )
                    .await?
                    .filter(|row| row.get::<_, bool>(4))
                else {
                    return reject(format!("invalid column for filter {}", f.column));
                };
                let position: i64 = row.get(0);
                let ty = self.catalog.type_info(row.get(1)).await?;
                let sql_type: String = row.get(2);
                let column = subscription::Column {
                    index: usize::try_from(position).unwrap_or(usize::MAX),
                    ty: &ty,
                    sql_type: &sql_type,
                    collation: row.get(3),
                };
                match subscription::compile(&client, f, &column).await {
                    Ok(filter) => compiled.push(filter),
                    Err(e) if e.is_transient() => return Err(Error::Compile(e)),
                    Err(e) => return reject(e.to_string()),
                }
            }
            filters.push((*table, compiled));
        }
        if let Some(select) = &s.select {
            if wildcard {
                return reject(
                    "Column selection is not supported for wildcard subscriptions".into(),
                );
            }
            for table in &tables {
                let columns = client
                    .query(
                        include_str!("../../sql/subscription_columns.sql"),
                        &[table, &s.role],
                    )
                    .await?;
                for wanted in select {
                    let allowed = columns
                        .iter()
                        .any(|c| c.get::<_, String>(0) == *wanted && c.get::<_, bool>(1));
                    if !allowed {
                        return reject(format!("invalid column for select {wanted}"));
                    }
                }
            }
        }
        let entry = Entry {
            gateway: Arc::from(gateway),
            id: Arc::from(s.id.as_str()),
            events: Events::parse(&s.event),
            role: Arc::from(s.role.as_str()),
            claims: serde_json::Value::Object(s.claims.clone()),
            claims_text: Arc::from(serde_json::Value::Object(s.claims.clone()).to_string()),
            select: s.select.clone(),
            filters,
        };
        Ok(Verdict::Accepted {
            entry: Arc::new(entry),
            tables,
        })
    }
}

/// Supabase's message for parameters that match no published table.
fn unable_to_subscribe(s: &Subscription) -> String {
    let select = match &s.select {
        Some(columns) => format!("{columns:?}"),
        None => "nil".to_owned(),
    };
    format!(
        "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [event: {}, schema: {}, table: {}, filters: [{}], select: {select}]",
        s.event,
        s.schema,
        s.table,
        s.filter.as_deref().unwrap_or("")
    )
}

/// A LIKE pattern in which only `*` is a wildcard.
fn like_pattern(name: &str) -> String {
    let mut pattern = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '*' => pattern.push('%'),
            '%' | '_' | '\\' => {
                pattern.push('\\');
                pattern.push(c);
            }
            c => pattern.push(c),
        }
    }
    pattern
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_star_is_a_wildcard() {
        assert_eq!(like_pattern("*"), "%");
        assert_eq!(like_pattern("my_table"), "my\\_table");
        assert_eq!(like_pattern("50%\\"), "50\\%\\\\");
    }
}
