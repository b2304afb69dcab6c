-- The published tables a subscription names (walcast::control).
-- $1 publication, $2 schema pattern, $3 table pattern: LIKE patterns in
-- which only `*` (sent as `%`) is a wildcard; `%`, `_` and `\` arrive
-- escaped with `\`.
SELECT c.oid, pt.schemaname::text, pt.tablename::text
FROM pg_catalog.pg_publication_tables pt
JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname
JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
WHERE pt.pubname = $1 AND pt.schemaname LIKE $2 AND pt.tablename LIKE $3
ORDER BY 2, 3
