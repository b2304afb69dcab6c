-- A table's live columns and whether a role may select each
-- (walcast::control). $1 table oid, $2 role name.
SELECT a.attname::text, pg_catalog.has_column_privilege($2, a.attrelid, a.attnum, 'SELECT')
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
  -- A role dropped since: no rows, rather than an error from has_column_privilege.
  AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $2)
ORDER BY a.attnum
