-- One batched RLS check (walcast::rls; the function is in sql/rls.sql).
-- $1 schema, $2 table, $3 key column names, $4 the candidate keys (key
-- column × row), $5 the groups.
SELECT group_no, visible, error_code, error_message
FROM walcast.visible_keys($1, $2, $3, $4, $5)
