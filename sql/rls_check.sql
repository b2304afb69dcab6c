-- One batched RLS check (walcast::rls; the function is in sql/rls.sql).
-- $1 schema, $2 table, $3 key column names, $4 the candidate keys (key
-- column × row), $5 the image columns, $6 the images (column × row; NULL:
-- no images), $7 and $8 the (row, column) pairs the WAL did not carry, $9
-- the groups.
SELECT group_no, visible, by_image, by_fallback, error_code, error_message
FROM walcast.visible_rows($1, $2, $3, $4, $5, $6, $7, $8, $9)
