-- A table's live columns, in order, and whether a role may SELECT each
-- (walcast::rls::Cache). $1 schema, $2 table, $3 role name.
SELECT a.attname::text, pg_catalog.has_column_privilege(r.oid, c.oid, a.attnum, 'SELECT')
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
CROSS JOIN pg_catalog.pg_roles r
WHERE n.nspname = $1 AND c.relname = $2 AND r.rolname = $3
ORDER BY a.attnum
