//! The role walcast connects as: allowed to replicate, not a superuser,
//! and able to `SET ROLE` to the subscriber roles it checks RLS as.

use tokio_postgres::Client;

use super::{Finding, id};

/// The subscriber roles RLS is checked as, as on Supabase.
const SUBSCRIBER_ROLES: [&str; 2] = ["anon", "authenticated"];

/// The connecting role's attributes, its name quoted for fixes.
const ROLE: &str = "
SELECT pg_catalog.quote_ident(r.rolname), r.rolsuper, r.rolreplication
FROM pg_catalog.pg_roles r
WHERE r.rolname = current_user";

/// For each role in `$1`: does it exist, and may the current role become
/// it (PostgreSQL 16 separated the SET option from membership).
const SUBSCRIBERS: &str = "
SELECT s.name, pg_catalog.quote_ident(s.name), r.oid IS NOT NULL,
       r.oid IS NOT NULL AND pg_catalog.pg_has_role(current_user, r.oid,
         CASE WHEN pg_catalog.current_setting('server_version_num')::int >= 160000
              THEN 'SET' ELSE 'MEMBER' END)
FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS s(name, position)
LEFT JOIN pg_catalog.pg_roles r ON r.rolname = s.name
ORDER BY s.position";

/// Appends the role's findings. Returns whether the role may replicate.
pub(super) async fn check(
    client: &Client,
    out: &mut Vec<Finding>,
) -> Result<bool, tokio_postgres::Error> {
    let row = client.query_one(ROLE, &[]).await?;
    let role: String = row.try_get(0)?;
    let superuser: bool = row.try_get(1)?;
    let replication: bool = row.try_get(2)?;
    out.push(privileges(&role, superuser, replication));

    let names: Vec<&str> = SUBSCRIBER_ROLES.to_vec();
    for row in client.query(SUBSCRIBERS, &[&names]).await? {
        let name: String = row.try_get(0)?;
        let quoted: String = row.try_get(1)?;
        let exists: bool = row.try_get(2)?;
        let member: bool = row.try_get(3)?;
        out.push(subscriber(&role, &quoted, exists, member, superuser).subject(name));
    }
    Ok(superuser || replication)
}

fn privileges(role: &str, superuser: bool, replication: bool) -> Finding {
    if superuser {
        Finding::warning(
            id::ROLE_PRIVILEGES,
            format!("walcast runs as superuser {role}; use the least-privileged role from sql/role.sql"),
        )
        .fix("walcast setup --role walcast (or psql -f sql/role.sql), ALTER ROLE walcast PASSWORD '...', and connect as walcast")
    } else if replication {
        Finding::ok(
            id::ROLE_PRIVILEGES,
            format!("role {role} has REPLICATION and is not a superuser"),
        )
    } else {
        Finding::error(
            id::ROLE_PRIVILEGES,
            format!("role {role} lacks REPLICATION; it cannot open the replication connection"),
        )
        .fix(format!(
            "ALTER ROLE {role} REPLICATION; (as a superuser), or walcast setup --role {role}"
        ))
    }
}

fn subscriber(role: &str, name: &str, exists: bool, member: bool, superuser: bool) -> Finding {
    if !exists {
        Finding::warning(
            id::ROLE_SUBSCRIBER,
            format!("role {name} does not exist; walcast checks row level security as {name}"),
        )
        .fix("walcast setup (sql/role.sql creates anon and authenticated)")
    } else if superuser {
        Finding::ok(
            id::ROLE_SUBSCRIBER,
            format!("{role} may SET ROLE {name} (as a superuser)"),
        )
    } else if member {
        Finding::ok(id::ROLE_SUBSCRIBER, format!("{role} may SET ROLE {name}"))
    } else {
        Finding::warning(
            id::ROLE_SUBSCRIBER,
            format!("{role} is not a member of {name}, so it cannot SET ROLE {name} to check row level security"),
        )
        .fix(format!("GRANT {name} TO {role};"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    #[test]
    fn a_superuser_is_a_warning_and_no_replication_an_error() {
        let finding = privileges("postgres", true, true);
        assert_eq!(finding.level, Level::Warning);
        assert_eq!(
            finding.message,
            "walcast runs as superuser postgres; use the least-privileged role from sql/role.sql"
        );
        assert_eq!(privileges("walcast", false, true).level, Level::Ok);
        assert_eq!(privileges("walcast", false, false).level, Level::Error);
    }

    #[test]
    fn a_missing_membership_says_what_to_grant() {
        let finding = subscriber("walcast", "anon", true, false, false);
        assert_eq!(finding.level, Level::Warning);
        assert_eq!(finding.fix.as_deref(), Some("GRANT anon TO walcast;"));
    }
}
