//! What RLS decisions need that does not change per change, cached:
//! a table's RLS flags and owner, a role's bypass attributes, whether a role
//! acts as a table's owner, and the columns a role may select.
//!
//! Nothing here expires by itself; the daemon invalidates:
//! * [`Cache::invalidate_table`] on a pgoutput `Relation` message (sent
//!   after the table's catalog entry changed: `ALTER TABLE … ROW LEVEL
//!   SECURITY`, `GRANT`/`REVOKE` on it or its columns, `ALTER TABLE … OWNER`);
//! * [`Cache::invalidate_all`] on a timer, for what no `Relation` message
//!   announces: `ALTER ROLE … BYPASSRLS`, role membership, dropped roles.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;

use super::Error;

/// A table by schema and name, as in the catalog (not quoted).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
}

impl TableName {
    /// `schema.name`.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }
}

/// How a role's view of a table is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The table has RLS disabled: no policy applies to anyone.
    RlsDisabled,
    /// The role bypasses RLS on this table: a superuser, a `BYPASSRLS`
    /// role, or one with its owner's privileges while RLS is not `FORCE`d.
    Bypass,
    /// Policies apply: ask [`check`](super::check).
    Policies,
}

/// One column of a table and whether a role may select it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// `has_column_privilege(role, table, column, 'SELECT')`.
    pub selectable: bool,
}

#[derive(Debug, Clone, Copy)]
struct TableFlags {
    enabled: bool,
    forced: bool,
    owner: u32,
}

#[derive(Debug, Clone, Copy)]
struct RoleFlags {
    superuser: bool,
    bypass_rls: bool,
}

/// The cache, reading through the pool on a miss.
pub struct Cache {
    pool: Pool,
    tables: HashMap<TableName, TableFlags>,
    roles: HashMap<String, RoleFlags>,
    /// (role, owner oid) → the role has the owner's privileges.
    owners: HashMap<(String, u32), bool>,
    columns: HashMap<(String, TableName), Arc<[Column]>>,
}

impl Cache {
    /// An empty cache over `pool`.
    pub fn new(pool: Pool) -> Self {
        Cache {
            pool,
            tables: HashMap::new(),
            roles: HashMap::new(),
            owners: HashMap::new(),
            columns: HashMap::new(),
        }
    }

    /// Whether `table` has row level security enabled (`relrowsecurity`).
    pub async fn rls_enabled(&mut self, table: &TableName) -> Result<bool, Error> {
        Ok(self.table(table).await?.enabled)
    }

    /// How `role`'s view of `table` is decided: [`Access::Policies`] means
    /// a [`check`](super::check) is needed.
    pub async fn access(&mut self, role: &str, table: &TableName) -> Result<Access, Error> {
        let flags = self.table(table).await?;
        if !flags.enabled {
            return Ok(Access::RlsDisabled);
        }
        let attributes = self.role(role).await?;
        if attributes.superuser || attributes.bypass_rls {
            return Ok(Access::Bypass);
        }
        if !flags.forced && self.acts_as_owner(role, flags.owner).await? {
            return Ok(Access::Bypass);
        }
        Ok(Access::Policies)
    }

    /// The live columns of `table`, in order, with whether `role` may select
    /// each.
    pub async fn columns(&mut self, role: &str, table: &TableName) -> Result<Arc<[Column]>, Error> {
        let key = (role.to_owned(), table.clone());
        if let Some(columns) = self.columns.get(&key) {
            return Ok(columns.clone());
        }
        // A role or table that does not exist is an error, not "no columns".
        self.table(table).await?;
        self.role(role).await?;
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(include_str!("../../sql/rls_columns.sql"))
            .await?;
        let rows = client
            .query(&statement, &[&table.schema, &table.name, &role])
            .await?;
        let columns: Arc<[Column]> = rows
            .iter()
            .map(|row| Column {
                name: row.get(0),
                selectable: row.get(1),
            })
            .collect();
        self.columns.insert(key, columns.clone());
        Ok(columns)
    }

    /// Forgets what is cached about `table` (a `Relation` message announced
    /// it): its flags and owner, and every role's columns of it.
    pub fn invalidate_table(&mut self, table: &TableName) {
        self.tables.remove(table);
        self.columns.retain(|(_, t), _| t != table);
    }

    /// Forgets what is cached about roles: attributes, ownership and column
    /// privileges (roles change without a `Relation` message).
    pub fn invalidate_roles(&mut self) {
        self.roles.clear();
        self.owners.clear();
        self.columns.clear();
    }

    /// Forgets everything (the periodic refresh).
    pub fn invalidate_all(&mut self) {
        self.tables.clear();
        self.invalidate_roles();
    }

    async fn table(&mut self, table: &TableName) -> Result<TableFlags, Error> {
        if let Some(flags) = self.tables.get(table) {
            return Ok(*flags);
        }
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(include_str!("../../sql/rls_table.sql"))
            .await?;
        let row = client
            .query_opt(&statement, &[&table.schema, &table.name])
            .await?
            .ok_or_else(|| Error::NoSuchTable {
                schema: table.schema.clone(),
                name: table.name.clone(),
            })?;
        let flags = TableFlags {
            enabled: row.get(0),
            forced: row.get(1),
            owner: row.get(2),
        };
        self.tables.insert(table.clone(), flags);
        Ok(flags)
    }

    async fn role(&mut self, role: &str) -> Result<RoleFlags, Error> {
        if let Some(flags) = self.roles.get(role) {
            return Ok(*flags);
        }
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(include_str!("../../sql/rls_role.sql"))
            .await?;
        let row = client
            .query_opt(&statement, &[&role])
            .await?
            .ok_or_else(|| Error::NoSuchRole(role.to_owned()))?;
        let flags = RoleFlags {
            superuser: row.get(0),
            bypass_rls: row.get(1),
        };
        self.roles.insert(role.to_owned(), flags);
        Ok(flags)
    }

    async fn acts_as_owner(&mut self, role: &str, owner: u32) -> Result<bool, Error> {
        let key = (role.to_owned(), owner);
        if let Some(owns) = self.owners.get(&key) {
            return Ok(*owns);
        }
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(include_str!("../../sql/rls_owner.sql"))
            .await?;
        let owns: bool = client
            .query_opt(&statement, &[&role, &owner])
            .await?
            .ok_or_else(|| Error::NoSuchRole(role.to_owned()))?
            .get(0);
        self.owners.insert(key, owns);
        Ok(owns)
    }
}
