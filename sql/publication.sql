-- walcast: the publication whose tables walcast streams.
--
-- Creates the publication empty if it is missing and leaves an existing one
-- alone (its tables and options are the operator's). Safe to run again.
--
-- Name: the custom setting `walcast.publication`, default `supabase_realtime`
-- (the name Supabase Realtime uses). `walcast setup --publication NAME` sets
-- it; with psql: PGOPTIONS='-c walcast.publication=NAME' psql -f sql/publication.sql
--
-- Then choose what to stream:
--   ALTER PUBLICATION supabase_realtime ADD TABLE public.todos;
-- Tables without a primary key need REPLICA IDENTITY FULL (or an index) for
-- UPDATE and DELETE to work once they are published; `walcast check` says so.

DO $walcast$
DECLARE
  publication_name text := coalesce(
    nullif(current_setting('walcast.publication', true), ''),
    'supabase_realtime');
BEGIN
  IF EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = publication_name) THEN
    RAISE NOTICE 'publication % exists; left unchanged', quote_ident(publication_name);
  ELSE
    EXECUTE format('CREATE PUBLICATION %I', publication_name);
    RAISE NOTICE 'created publication % (empty: add tables with ALTER PUBLICATION % ADD TABLE ...)',
      quote_ident(publication_name), quote_ident(publication_name);
  END IF;
END
$walcast$;
