-- walcast: optional helpers for plain Postgres, mirroring Supabase's
-- auth.uid(), auth.role() and auth.jwt(), so RLS policies written for
-- Supabase (e.g. USING (owner_id = auth.uid())) work unchanged.
--
-- They read the JWT claims of the current request from the setting
-- `request.jwt.claims` (a JSON object), which walcast sets (transaction-local)
-- before it checks a row as a subscriber, as PostgREST does; the older
-- per-claim settings `request.jwt.claim.sub` / `.role` are honoured first,
-- as Supabase's functions do.
--
-- Never clobbers: the schema and each function are created only if missing
-- (same name and signature), so on a real Supabase database, where `auth`
-- belongs to Supabase Auth, its functions are kept as they are (the USAGE
-- grants at the end are ones Supabase already makes). To replace an older
-- version of these helpers, drop the function first.
--
-- Run after sql/role.sql (it grants USAGE on schema auth to anon and
-- authenticated when they exist). Safe to run again.

DO $walcast$
BEGIN
  IF EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = 'auth') THEN
    RAISE NOTICE 'schema auth exists';
  ELSE
    CREATE SCHEMA auth;
    RAISE NOTICE 'created schema auth';
  END IF;

  IF pg_catalog.to_regprocedure('auth.uid()') IS NOT NULL THEN
    RAISE NOTICE 'function auth.uid() exists; left unchanged';
  ELSE
    CREATE FUNCTION auth.uid() RETURNS uuid
      LANGUAGE sql STABLE
      AS $fn$
        SELECT coalesce(
          nullif(current_setting('request.jwt.claim.sub', true), ''),
          (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
        )::uuid
      $fn$;
    COMMENT ON FUNCTION auth.uid() IS 'the sub claim of the request''s JWT (created by walcast, mirrors Supabase)';
    RAISE NOTICE 'created function auth.uid()';
  END IF;

  IF pg_catalog.to_regprocedure('auth.role()') IS NOT NULL THEN
    RAISE NOTICE 'function auth.role() exists; left unchanged';
  ELSE
    CREATE FUNCTION auth.role() RETURNS text
      LANGUAGE sql STABLE
      AS $fn$
        SELECT coalesce(
          nullif(current_setting('request.jwt.claim.role', true), ''),
          (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
        )::text
      $fn$;
    COMMENT ON FUNCTION auth.role() IS 'the role claim of the request''s JWT (created by walcast, mirrors Supabase)';
    RAISE NOTICE 'created function auth.role()';
  END IF;

  IF pg_catalog.to_regprocedure('auth.jwt()') IS NOT NULL THEN
    RAISE NOTICE 'function auth.jwt() exists; left unchanged';
  ELSE
    CREATE FUNCTION auth.jwt() RETURNS jsonb
      LANGUAGE sql STABLE
      AS $fn$
        SELECT coalesce(
          nullif(current_setting('request.jwt.claim', true), ''),
          nullif(current_setting('request.jwt.claims', true), '')
        )::jsonb
      $fn$;
    COMMENT ON FUNCTION auth.jwt() IS 'the request''s JWT claims (created by walcast, mirrors Supabase)';
    RAISE NOTICE 'created function auth.jwt()';
  END IF;

  -- RLS policies run with the privileges of the role being checked, so the
  -- subscriber roles need to reach the functions. EXECUTE is PUBLIC's by default.
  IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
    GRANT USAGE ON SCHEMA auth TO anon;
  END IF;
  IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
    GRANT USAGE ON SCHEMA auth TO authenticated;
  END IF;
END
$walcast$;
