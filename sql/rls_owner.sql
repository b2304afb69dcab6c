-- Whether a role has the privileges of a table's owner (walcast::rls::Cache):
-- then RLS does not apply to it unless the table FORCEs it, as for the
-- owner itself. $1 role name, $2 owner oid. No row: no such role.
SELECT pg_catalog.pg_has_role(r.oid, $2::pg_catalog.oid, 'USAGE')
FROM pg_catalog.pg_roles r
WHERE r.rolname = $1
