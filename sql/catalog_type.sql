-- One type, as the encoder needs it (walcast::catalog). $1: type oid.
-- json_cast: to_jsonb renders user types (oid >= 16384) that are neither
-- arrays nor composites through their cast to json, if one exists.
SELECT t.typname::text,
       t.typtype::text,
       t.typdelim::text,
       CASE WHEN t.typsubscript = 'pg_catalog.array_subscript_handler'::regproc THEN t.typelem ELSE 0 END AS element,
       t.typbasetype,
       t.typrelid,
       EXISTS (
         SELECT 1 FROM pg_catalog.pg_cast c
         WHERE c.castsource = t.oid AND c.casttarget = 'pg_catalog.json'::regtype AND c.castmethod = 'f'
       ) AS json_cast,
       pg_catalog.format_type(t.oid, NULL) AS sql_name
FROM pg_catalog.pg_type t
WHERE t.oid = $1
