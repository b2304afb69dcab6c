-- walcast: the least-privileged role the daemon logs in as.
--
-- What the role gets, and why:
--   LOGIN, REPLICATION  to open the replication connection and hold a slot;
--   NOT superuser, no CREATEDB, CREATEROLE or BYPASSRLS (a new role only;
--                       an existing role keeps its other attributes, and a
--                       superuser is refused rather than demoted);
--   NOINHERIT           it holds no table privileges of its own: it reads
--                       rows only after SET ROLE to a subscriber role, so RLS
--                       applies exactly as it does to that subscriber;
--   membership in anon and authenticated (created NOLOGIN NOINHERIT if
--                       missing, as on Supabase), so it can SET ROLE to them;
--   CONNECT on this database. The system catalogs are readable by every
--                       role; nothing else is granted.
--
-- No password is set here. Set one afterwards, e.g. in psql:
--   \password walcast
-- or ALTER ROLE walcast PASSWORD '...'; (psql's \password keeps it out of
-- the server log). pg_hba.conf must allow the role for this database *and*
-- on a `replication` line.
--
-- Name: the custom setting `walcast.role`, default `walcast`. `walcast setup
-- --role NAME` sets it; with psql: PGOPTIONS='-c walcast.role=NAME' psql -f sql/role.sql
--
-- Run as a superuser (on Postgres 16 and later, a role with CREATEROLE that
-- itself has REPLICATION and ADMIN on anon and authenticated also works).
-- Safe to run again: every step checks first.

DO $walcast$
DECLARE
  role_name text := coalesce(nullif(current_setting('walcast.role', true), ''), 'walcast');
  subscriber text;
  existing pg_catalog.pg_roles%ROWTYPE;
BEGIN
  IF role_name IN ('anon', 'authenticated') THEN
    RAISE EXCEPTION 'walcast cannot log in as %: it must be a separate role that may SET ROLE to it',
      quote_ident(role_name);
  END IF;
  SELECT * INTO existing FROM pg_catalog.pg_roles WHERE rolname = role_name;
  IF NOT FOUND THEN
    EXECUTE format(
      'CREATE ROLE %I LOGIN REPLICATION NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS',
      role_name);
    RAISE NOTICE 'created role % (LOGIN REPLICATION NOINHERIT; set its password: ALTER ROLE % PASSWORD ...)',
      quote_ident(role_name), quote_ident(role_name);
  ELSIF existing.rolsuper THEN
    RAISE EXCEPTION 'role % is a superuser; walcast must not run as one', quote_ident(role_name)
      USING HINT = 'choose another role name (walcast setup --role NAME), or ALTER ROLE ... NOSUPERUSER yourself';
  ELSIF existing.rolcanlogin AND existing.rolreplication THEN
    RAISE NOTICE 'role % exists with LOGIN REPLICATION; left unchanged', quote_ident(role_name);
  ELSE
    EXECUTE format('ALTER ROLE %I LOGIN REPLICATION', role_name);
    RAISE NOTICE 'role % exists; added LOGIN REPLICATION', quote_ident(role_name);
  END IF;

  FOREACH subscriber IN ARRAY ARRAY['anon', 'authenticated'] LOOP
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = subscriber) THEN
      EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT', subscriber);
      RAISE NOTICE 'created role % (NOLOGIN NOINHERIT)', quote_ident(subscriber);
    END IF;
    IF EXISTS (
      SELECT FROM pg_catalog.pg_auth_members m
        JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
        JOIN pg_catalog.pg_roles r ON r.oid = m.member
      WHERE g.rolname = subscriber AND r.rolname = role_name
    ) THEN
      RAISE NOTICE 'role % is already a member of %', quote_ident(role_name), quote_ident(subscriber);
    ELSE
      EXECUTE format('GRANT %I TO %I', subscriber, role_name);
      RAISE NOTICE 'granted % to % (it may SET ROLE %)',
        quote_ident(subscriber), quote_ident(role_name), quote_ident(subscriber);
    END IF;
  END LOOP;

  IF pg_catalog.has_database_privilege(role_name, pg_catalog.current_database(), 'CONNECT') THEN
    RAISE NOTICE 'role % may connect to database %', quote_ident(role_name),
      quote_ident(pg_catalog.current_database());
  ELSE
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', pg_catalog.current_database(), role_name);
    RAISE NOTICE 'granted CONNECT on database % to %',
      quote_ident(pg_catalog.current_database()), quote_ident(role_name);
  END IF;
END
$walcast$;
