//! Whether a subscription may be accepted, asked of Postgres through the
//! pool: the role is allowed and exists, the tables are published, the
//! selected columns exist and the role may read them.
//!
//! A gateway that comes back registers all its clients' subscriptions at
//! once, and they ask the same few catalog questions: the answers are kept
//! for a couple of seconds ([`CATALOG_ANSWERS_TTL`]), so a burst costs
//! about one round trip per subscription (its filter value's cast) instead
//! of six.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool};

use crate::bus::Subscription;
use crate::catalog::{self, Catalog};
use crate::pgoutput::Oid;
use crate::rls::install::{self, Installed};
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

/// How long catalog answers are reused between validations: short enough
/// that a table published, a role created or a grant given is seen almost
/// at once, long enough to cover a burst of registrations.
const CATALOG_ANSWERS_TTL: Duration = Duration::from_secs(2);

/// Answers kept for [`CATALOG_ANSWERS_TTL`], then all forgotten at once.
struct Recent<K, V> {
    answers: HashMap<K, V>,
    since: Instant,
}

impl<K: Hash + Eq, V: Clone> Recent<K, V> {
    fn new() -> Self {
        Recent {
            answers: HashMap::new(),
            since: Instant::now(),
        }
    }

    fn get(&mut self, key: &K) -> Option<V> {
        if self.since.elapsed() > CATALOG_ANSWERS_TTL {
            self.answers.clear();
            self.since = Instant::now();
        }
        self.answers.get(key).cloned()
    }

    fn put(&mut self, key: K, value: V) {
        self.answers.insert(key, value);
    }
}

/// A filter's column, as `sql/subscription_filter_column.sql` describes it;
/// `None` when it does not exist or the role may not select it.
#[derive(Clone)]
struct FilterColumn {
    position: i64,
    type_oid: Oid,
    sql_type: String,
    collation: Oid,
}

/// Validates subscriptions against the database.
pub struct Validator {
    pool: Pool,
    catalog: Catalog,
    publication: String,
    allowed_roles: Vec<String>,
    /// Role → whether it is a superuser; `None`: it does not exist.
    roles: Recent<String, Option<bool>>,
    /// (schema, table) as given → the published tables they match.
    tables: Recent<(String, String), Vec<Oid>>,
    /// (table, column, role) → the filter's column.
    filter_columns: Recent<(Oid, String, String), Option<FilterColumn>>,
    /// (table, role) → each column and whether the role may select it.
    columns: Recent<(Oid, String), Vec<(String, bool)>>,
    /// Table → whether it has row level security enabled.
    secured: Recent<Oid, bool>,
    /// What the database has of `sql/rls.sql`.
    rls_sql: Recent<(), Installed>,
    /// The claims of the last subscription validated, as entries hold
    /// them: the subscriptions of one channel join share one map, and so
    /// their entries share one copy.
    last_claims: Option<SharedClaims>,
}

/// Claims as a message carried them and as entries hold them.
type SharedClaims = (
    Arc<serde_json::Map<String, serde_json::Value>>,
    Arc<serde_json::Value>,
    Arc<str>,
);

/// The pooled connection of one validation, taken when first needed: a
/// validation answered from [`Recent`] answers needs none (taking one
/// costs a round trip to reset the session).
async fn connection<'a>(pool: &Pool, slot: &'a mut Option<Object>) -> Result<&'a Object, Error> {
    let client = match slot.take() {
        Some(client) => client,
        None => pool.get().await?,
    };
    Ok(slot.insert(client))
}

impl Validator {
    /// Whether `role` is one subscriptions and private channels may act as
    /// (`allowed_roles`): a token naming another (the owner of
    /// `realtime.messages`, a superuser) is refused before any `SET ROLE`.
    pub fn allows_role(&self, role: &str) -> bool {
        self.allowed_roles.iter().any(|r| r == role)
    }

    /// A validator for subscriptions to `publication` by `allowed_roles`.
    pub fn new(pool: Pool, publication: String, allowed_roles: Vec<String>) -> Self {
        Validator {
            catalog: Catalog::new(pool.clone()),
            pool,
            publication,
            allowed_roles,
            roles: Recent::new(),
            tables: Recent::new(),
            filter_columns: Recent::new(),
            columns: Recent::new(),
            secured: Recent::new(),
            rls_sql: Recent::new(),
            last_claims: None,
        }
    }

    /// `claims` as entries hold them (value and text), shared with the
    /// previous subscription's when they are the same map.
    fn claims_of(
        &mut self,
        claims: &Arc<serde_json::Map<String, serde_json::Value>>,
    ) -> (Arc<serde_json::Value>, Arc<str>) {
        if let Some((map, value, text)) = &self.last_claims
            && Arc::ptr_eq(map, claims)
        {
            return (value.clone(), text.clone());
        }
        let value = Arc::new(serde_json::Value::Object((**claims).clone()));
        let text: Arc<str> = Arc::from(value.to_string());
        self.last_claims = Some((claims.clone(), value.clone(), text.clone()));
        (value, text)
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
        let mut client: Option<Object> = None;
        let superuser = match self.roles.get(&s.role) {
            Some(known) => known,
            None => {
                let row = connection(&self.pool, &mut client)
                    .await?
                    .query_opt(
                        "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = $1",
                        &[&s.role],
                    )
                    .await?;
                let superuser = row.map(|row| row.get::<_, bool>(0));
                self.roles.put(s.role.clone(), superuser);
                superuser
            }
        };
        match superuser {
            None => return reject(format!("role {:?} does not exist", s.role)),
            Some(true) => {
                return reject(format!(
                    "role {:?} is a superuser and may not subscribe",
                    s.role
                ));
            }
            Some(false) => {}
        }
        let wildcard = s.schema == "*" || s.table == "*";
        let names = (s.schema.clone(), s.table.clone());
        let tables = match self.tables.get(&names) {
            Some(tables) => tables,
            None => {
                let rows = connection(&self.pool, &mut client)
                    .await?
                    .query(
                        include_str!("../../sql/subscription_tables.sql"),
                        &[
                            &self.publication,
                            &like_pattern(&s.schema),
                            &like_pattern(&s.table),
                        ],
                    )
                    .await?;
                let tables: Vec<Oid> = rows.iter().map(|r| r.get(0)).collect();
                self.tables.put(names, tables.clone());
                tables
            }
        };
        if tables.is_empty() || s.schema.is_empty() || s.table.is_empty() {
            return reject(unable_to_subscribe(s));
        }
        // A table with row level security needs sql/rls.sql to be checked:
        // without it every change would be denied, so the subscription is
        // refused now, saying what to run.
        let mut secured = false;
        for table in &tables {
            let enabled = match self.secured.get(table) {
                Some(enabled) => enabled,
                None => {
                    let enabled = connection(&self.pool, &mut client)
                        .await?
                        .query_opt(
                            "SELECT relrowsecurity FROM pg_catalog.pg_class WHERE oid = $1",
                            &[table],
                        )
                        .await?
                        .is_some_and(|row| row.get::<_, bool>(0));
                    self.secured.put(*table, enabled);
                    enabled
                }
            };
            secured |= enabled;
        }
        if secured {
            let found = match self.rls_sql.get(&()) {
                Some(found) => found,
                None => {
                    let client = connection(&self.pool, &mut client).await?;
                    let found = install::installed(client).await?;
                    self.rls_sql.put((), found.clone());
                    found
                }
            };
            if let Some(problem) = found.problem() {
                return reject(problem);
            }
        }
        let parsed = match filter::parse(s.filter.as_deref().unwrap_or("")) {
            Ok(parsed) => parsed,
            Err(e) => return reject(e.to_string()),
        };
        let mut filters = Vec::with_capacity(tables.len());
        for table in &tables {
            let mut compiled = Vec::with_capacity(parsed.len());
            for f in &parsed {
                let key = (*table, f.column.clone(), s.role.clone());
                let found = match self.filter_columns.get(&key) {
                    Some(found) => found,
                    None => {
                        let found = connection(&self.pool, &mut client)
                            .await?
                            .query_opt(
                                include_str!("../../sql/subscription_filter_column.sql"),
                                &[table, &f.column, &s.role],
                            )
                            .await?
                            .filter(|row| row.get::<_, bool>(4))
                            .map(|row| FilterColumn {
                                position: row.get(0),
                                type_oid: row.get(1),
                                sql_type: row.get(2),
                                collation: row.get(3),
                            });
                        self.filter_columns.put(key, found.clone());
                        found
                    }
                };
                let Some(found) = found else {
                    return reject(format!("invalid column for filter {}", f.column));
                };
                let ty = self.catalog.type_info(found.type_oid).await?;
                let column = subscription::Column {
                    index: usize::try_from(found.position).unwrap_or(usize::MAX),
                    ty: &ty,
                    sql_type: &found.sql_type,
                    collation: found.collation,
                };
                let client = connection(&self.pool, &mut client).await?;
                match subscription::compile(client, f, &column).await {
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
                let key = (*table, s.role.clone());
                let columns = match self.columns.get(&key) {
                    Some(columns) => columns,
                    None => {
                        let columns: Vec<(String, bool)> = connection(&self.pool, &mut client)
                            .await?
                            .query(
                                include_str!("../../sql/subscription_columns.sql"),
                                &[table, &s.role],
                            )
                            .await?
                            .iter()
                            .map(|c| (c.get(0), c.get(1)))
                            .collect();
                        self.columns.put(key, columns.clone());
                        columns
                    }
                };
                for wanted in select {
                    let allowed = columns.iter().any(|(name, may)| name == wanted && *may);
                    if !allowed {
                        return reject(format!("invalid column for select {wanted}"));
                    }
                }
            }
        }
        let (claims, claims_text) = self.claims_of(&s.claims);
        let entry = Entry {
            gateway: Arc::from(gateway),
            id: Arc::from(s.id.as_str()),
            events: Events::parse(&s.event),
            role: Arc::from(s.role.as_str()),
            claims,
            claims_text,
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
