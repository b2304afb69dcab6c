//! What the daemon knows of the tenant database's catalog: how each column
//! type renders as JSON, and each table's primary key.
//!
//! Built-in types are known statically ([`types::builtin`]); others (enums,
//! domains, composites, ranges, extension types, arrays of them) are looked
//! up once through the pool and cached. pgoutput's `Type` and `Relation`
//! messages invalidate what they describe, since they are sent when a type
//! or table may have changed.

mod builtin;
mod types;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use deadpool_postgres::Pool;
use tracing::debug;

pub use types::{Encoding, Field, Oid, TypeInfo, builtin};

/// Composite types nest; real ones are shallow, and Postgres forbids cycles.
const MAX_DEPTH: usize = 32;

/// Why the catalog could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be had from the pool.
    #[error("catalog lookup: no connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A catalog query failed.
    #[error("catalog lookup: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// Types nest deeper than any real one does.
    #[error("type {0} nests deeper than {MAX_DEPTH} levels")]
    TooDeep(Oid),
}

impl Error {
    /// Whether asking again later may succeed (the database is reachable
    /// again); a type nesting too deep will not change.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Error::TooDeep(_))
    }
}

/// The catalog cache, reading through the pool.
pub struct Catalog {
    pool: Pool,
    types: HashMap<Oid, Arc<TypeInfo>>,
    row_security: HashMap<Oid, bool>,
    selectable: HashMap<(Arc<str>, Oid), Arc<[bool]>>,
    policy_columns: HashMap<Oid, PolicyColumns>,
}

/// What a change's image must carry for a table's SELECT policies to be
/// evaluated on it (`walcast.policy_columns`, `sql/rls.sql`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyColumns {
    /// These columns (perhaps none), by name.
    Columns(Arc<[String]>),
    /// A policy reads a system column: no image can decide, every row is
    /// looked up.
    SystemColumns,
    /// Not known (`sql/rls.sql` is missing or older): send every column.
    Unknown,
}

impl Catalog {
    /// An empty cache over `pool`.
    pub fn new(pool: Pool) -> Self {
        Catalog {
            pool,
            types: HashMap::new(),
            row_security: HashMap::new(),
            selectable: HashMap::new(),
            policy_columns: HashMap::new(),
        }
    }

    /// Forgets what is cached about `oid` (a `Type` message announced it).
    pub fn invalidate(&mut self, oid: Oid) {
        self.types.remove(&oid);
    }

    /// Forgets every cached non-built-in type, RLS flag, privilege and
    /// policy column list (a
    /// `Relation` message: a table or one of its types may have been
    /// altered; also run on a timer, since GRANTs leave no trace in the WAL).
    pub fn invalidate_all(&mut self) {
        self.types.clear();
        self.row_security.clear();
        self.selectable.clear();
        self.policy_columns.clear();
    }

    /// Whether row level security is enabled on table `relid`
    /// (`relrowsecurity`): then its INSERTs and UPDATEs are checked, and its
    /// DELETEs show only the key (Supabase's rule). Whether a role's view is
    /// subject to the policies at all (superuser, `BYPASSRLS`, the owner
    /// unless `FORCE`d) is decided per role by `walcast.visible_rows`
    /// (`sql/rls.sql`), the one place those rules live.
    pub async fn row_security(&mut self, relid: Oid) -> Result<bool, Error> {
        if let Some(enabled) = self.row_security.get(&relid) {
            return Ok(*enabled);
        }
        let client = self.pool.get().await?;
        let enabled = client
            .query_opt(
                "SELECT relrowsecurity FROM pg_catalog.pg_class WHERE oid = $1",
                &[&relid],
            )
            .await?
            .is_some_and(|row| row.get(0));
        self.row_security.insert(relid, enabled);
        Ok(enabled)
    }

    /// For each of `columns` (a table's published columns, in order), whether
    /// `role` may select it. A column the catalog no longer has is not
    /// selectable.
    pub async fn selectable(
        &mut self,
        role: &Arc<str>,
        relid: Oid,
        columns: &[&str],
    ) -> Result<Arc<[bool]>, Error> {
        if let Some(cached) = self.selectable.get(&(role.clone(), relid)) {
            return Ok(cached.clone());
        }
        let client = self.pool.get().await?;
        let rows = client
            .query(
                include_str!("../../sql/subscription_columns.sql"),
                &[&relid, &role.as_ref()],
            )
            .await?;
        let allowed: Arc<[bool]> = columns
            .iter()
            .map(|name| {
                rows.iter()
                    .any(|r| r.get::<_, &str>(0) == *name && r.get::<_, bool>(1))
            })
            .collect();
        self.selectable
            .insert((role.clone(), relid), allowed.clone());
        Ok(allowed)
    }

    /// The columns table `relid` (`schema`.`table`) must carry in a change's
    /// image for its SELECT policies to be evaluated on it. A stale answer
    /// (a policy created since) costs nothing but a lookup: the check sees
    /// the column missing from the image and looks the row up.
    pub async fn policy_columns(
        &mut self,
        relid: Oid,
        schema: &str,
        table: &str,
    ) -> Result<PolicyColumns, Error> {
        if let Some(known) = self.policy_columns.get(&relid) {
            return Ok(known.clone());
        }
        let client = self.pool.get().await?;
        let known = match client
            .query_one("SELECT walcast.policy_columns($1, $2)", &[&schema, &table])
            .await
        {
            Ok(row) => match row.try_get::<_, Option<Vec<String>>>(0)? {
                Some(columns) => PolicyColumns::Columns(columns.into()),
                None => PolicyColumns::SystemColumns,
            },
            // Missing, older, or the table just went: the check will say.
            Err(e) if e.as_db_error().is_some() => PolicyColumns::Unknown,
            Err(e) => return Err(e.into()),
        };
        self.policy_columns.insert(relid, known.clone());
        Ok(known)
    }

    /// The type `oid`: built in, cached, or read from the catalog.
    pub async fn type_info(&mut self, oid: Oid) -> Result<Arc<TypeInfo>, Error> {
        if let Some(info) = builtin(oid).or_else(|| self.types.get(&oid).cloned()) {
            return Ok(info);
        }
        let client = self.pool.get().await?;
        let info = Box::pin(resolve(&client, oid, 0)).await?;
        self.types.insert(oid, info.clone());
        Ok(info)
    }

    /// `to_jsonb(text::ty)` computed by the server, for types whose JSON
    /// only the server knows (a user type's cast to json, possibly nested
    /// in an array or composite).
    pub async fn render_json(&self, ty: &TypeInfo, text: &[u8]) -> Result<Bytes, Error> {
        let client = self.pool.get().await?;
        // `sql_name` comes from format_type(): quoted by Postgres itself.
        let sql = format!("SELECT to_jsonb($1::text::{})::text", ty.sql_name);
        let statement = client.prepare_cached(&sql).await?;
        let text = String::from_utf8_lossy(text);
        let row = client.query_one(&statement, &[&text.as_ref()]).await?;
        Ok(Bytes::from(row.get::<_, String>(0)))
    }

    /// The oid of `realtime.messages` when `relid` is one of its
    /// partitions (their changes count as the table's: its policies decide
    /// who sees them, a partition has none).
    pub async fn messages_parent(&self, relid: Oid) -> Result<Option<Oid>, Error> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT p.oid FROM pg_catalog.pg_inherits i \
                 JOIN pg_catalog.pg_class p ON p.oid = i.inhparent \
                 JOIN pg_catalog.pg_namespace n ON n.oid = p.relnamespace \
                 WHERE i.inhrelid = $1 AND n.nspname = 'realtime' AND p.relname = 'messages'",
                &[&relid],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The names of the primary key columns of table `relid` (empty if it
    /// has none).
    pub async fn primary_key(&self, relid: Oid) -> Result<Vec<String>, Error> {
        let client = self.pool.get().await?;
        let rows = client
            .query(include_str!("../../sql/catalog_primary_key.sql"), &[&relid])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

async fn resolve(
    client: &tokio_postgres::Client,
    oid: Oid,
    depth: usize,
) -> Result<Arc<TypeInfo>, Error> {
    if let Some(info) = builtin(oid) {
        return Ok(info);
    }
    if depth > MAX_DEPTH {
        return Err(Error::TooDeep(oid));
    }
    let Some(row) = client
        .query_opt(include_str!("../../sql/catalog_type.sql"), &[&oid])
        .await?
    else {
        // Dropped since the change was made: its text is all we have.
        debug!(
            oid,
            "type no longer in the catalog; rendering values as text"
        );
        return Ok(Arc::new(TypeInfo {
            oid,
            name: Arc::from(oid.to_string()),
            sql_name: Arc::from("text"),
            delimiter: b',',
            encoding: Encoding::Text,
        }));
    };
    let name: String = row.get(0);
    let typtype: String = row.get(1);
    let delimiter = row.get::<_, String>(2).bytes().next().unwrap_or(b',');
    let element: Oid = row.get(3);
    let base: Oid = row.get(4);
    let relid: Oid = row.get(5);
    let json_cast: bool = row.get(6);
    let sql_name: String = row.get(7);
    let encoding = if element != 0 {
        Encoding::Array(Box::pin(resolve(client, element, depth + 1)).await?)
    } else {
        match typtype.as_str() {
            // A domain renders as its base type.
            "d" => Box::pin(resolve(client, base, depth + 1))
                .await?
                .encoding
                .clone(),
            "c" => {
                let rows = client
                    .query(include_str!("../../sql/catalog_fields.sql"), &[&relid])
                    .await?;
                let mut fields = Vec::with_capacity(rows.len());
                for row in rows {
                    let field_type: Oid = row.get(1);
                    fields.push(Field {
                        name: row.get(0),
                        ty: Box::pin(resolve(client, field_type, depth + 1)).await?,
                    });
                }
                Encoding::Composite(fields)
            }
            _ if json_cast => Encoding::JsonCast,
            _ => types::scalar_encoding(oid),
        }
    };
    Ok(Arc::new(TypeInfo {
        oid,
        name: Arc::from(name),
        sql_name: Arc::from(sql_name),
        delimiter,
        encoding,
    }))
}
