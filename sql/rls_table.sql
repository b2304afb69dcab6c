-- A table's row level security flags and owner (walcast::rls::Cache).
-- $1 schema, $2 table (names as in the catalog). No row: no such table.
SELECT c.relrowsecurity, c.relforcerowsecurity, c.relowner
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
