-- The column a filter names, as the filter compiler needs it
-- (walcast::control). $1 table oid, $2 column name, $3 role.
-- position: its index among the table's live columns, which is its index
-- in the rows pgoutput sends (publications without column lists).
SELECT (SELECT count(*) FROM pg_catalog.pg_attribute b
        WHERE b.attrelid = a.attrelid AND b.attnum > 0 AND NOT b.attisdropped AND b.attnum < a.attnum) AS position,
       a.atttypid,
       pg_catalog.format_type(a.atttypid, -1) AS sql_type,
       a.attcollation,
       pg_catalog.has_column_privilege($3, a.attrelid, a.attnum, 'SELECT') AS selectable
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped
  AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $3)
