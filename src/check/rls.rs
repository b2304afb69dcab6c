//! The SQL the RLS checks call (`sql/rls.sql`): installed, of the version
//! this walcast speaks, and callable by the role.

use tokio_postgres::Client;

use super::{Finding, id};
use crate::rls::install::{self, Installed, SQL_VERSION};

/// Whether a published table has row level security enabled: then a
/// missing `sql/rls.sql` refuses its subscriptions (an error), otherwise it
/// matters only once one has (a warning).
const ANY_SECURED: &str = "
SELECT EXISTS (
  SELECT FROM pg_catalog.pg_publication_tables pt
  JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname
  JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
  WHERE pt.pubname = $1 AND c.relrowsecurity)";

/// Appends the finding on `sql/rls.sql`.
pub(super) async fn check(
    client: &Client,
    publication: &str,
    out: &mut Vec<Finding>,
) -> Result<(), tokio_postgres::Error> {
    let found = install::installed(client).await?;
    let Some(problem) = found.problem() else {
        out.push(Finding::ok(
            id::RLS_SQL,
            format!(
                "sql/rls.sql version {SQL_VERSION} is installed and this role may call walcast.visible_rows"
            ),
        ));
        return Ok(());
    };
    let secured: bool = client
        .query_one(ANY_SECURED, &[&publication])
        .await?
        .try_get(0)?;
    let finding = if secured {
        Finding::error(
            id::RLS_SQL,
            format!(
                "{problem}; subscriptions to published tables with row level security are refused until then"
            ),
        )
    } else {
        Finding::warning(id::RLS_SQL, problem)
    };
    let fix = match found {
        Installed::NotCallable => {
            "walcast setup --admin-url ... grants it to the role (setting walcast.role names it)"
        }
        _ => {
            "walcast setup --admin-url 'postgres://ADMIN@HOST/DB' (applies sql/rls.sql), or psql -f sql/rls.sql as an administrator"
        }
    };
    out.push(finding.fix(fix));
    Ok(())
}
