-- The statement timeout of one RLS check's transaction (walcast::rls).
-- $1: e.g. '500ms'. Transaction-local: it ends with the check.
SELECT pg_catalog.set_config('statement_timeout', $1, true)
