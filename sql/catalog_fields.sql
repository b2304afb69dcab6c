-- The fields of a composite type, in order (walcast::catalog). $1: typrelid.
SELECT a.attname::text, a.atttypid
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
