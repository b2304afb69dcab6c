-- The settings of one RLS check's transaction (walcast::rls), both
-- transaction-local: they end with the check.
-- $1: statement_timeout, e.g. '500ms'.
-- $2: walcast.rls_sorted_keys: auto, on or off (see sql/rls.sql, "Many groups").
SELECT pg_catalog.set_config('statement_timeout', $1, true),
       pg_catalog.set_config('walcast.rls_sorted_keys', $2, true)
