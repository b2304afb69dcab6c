-- Whether a role bypasses row level security everywhere (walcast::rls::Cache).
-- $1 role name. No row: no such role.
SELECT r.rolsuper, r.rolbypassrls
FROM pg_catalog.pg_roles r
WHERE r.rolname = $1
