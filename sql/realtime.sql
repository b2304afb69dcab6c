-- walcast: Supabase's `realtime` schema for Broadcast from Database and
-- private channels, for plain Postgres.
--
-- What it holds, as Supabase Realtime defines it:
--   realtime.messages          the messages table, partitioned by day on
--                              inserted_at, row level security enabled (the
--                              policies on it decide who may read and write
--                              a private channel's topic);
--   realtime.topic()           the topic being authorized or sent to (the
--                              setting realtime.topic), for those policies;
--   realtime.send(...)         inserts a broadcast (JSON payload);
--   realtime.send_binary(...)  inserts a broadcast (bytes);
--   realtime.broadcast_changes(...)  a row trigger's helper: sends the
--                              row's change as a broadcast;
--   the grants anon, authenticated and service_role have on them;
--   the publication supabase_realtime_messages_publication, which the daemon
--                              streams beside its own (`walcast check`).
--
-- Never replaces what exists: on a Supabase database everything here is
-- already there and is left as it is. Each object is created only when
-- missing, and each step says what it did.
--
-- Ownership: the table and functions belong to supabase_realtime_admin
-- (created NOLOGIN NOINHERIT if missing, as on Supabase), and walcast's
-- login role (the setting walcast.role, default walcast) is made a member
-- so that it may SET ROLE to it for two things only: creating and dropping
-- the daily partitions, and the authorization probe's rolled-back insert.
--
-- Partitions are created and dropped by walcast (setup and the daemon),
-- not here: see src/messages/partitions.rs.
--
-- Run after sql/role.sql. Safe to run again.

DO $walcast$
DECLARE
  role_name text := coalesce(nullif(current_setting('walcast.role', true), ''), 'walcast');
  subscriber text;
  subscribers text[] := ARRAY[]::text[];
BEGIN
  IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'supabase_realtime_admin') THEN
    RAISE NOTICE 'role supabase_realtime_admin exists';
  ELSE
    CREATE ROLE supabase_realtime_admin NOLOGIN NOINHERIT;
    RAISE NOTICE 'created role supabase_realtime_admin (NOLOGIN NOINHERIT; owns realtime.messages)';
  END IF;
  IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = role_name) THEN
    IF pg_catalog.pg_has_role(role_name, 'supabase_realtime_admin', 'MEMBER') THEN
      RAISE NOTICE 'role % is a member of supabase_realtime_admin', quote_ident(role_name);
    ELSE
      EXECUTE format('GRANT supabase_realtime_admin TO %I', role_name);
      RAISE NOTICE 'granted supabase_realtime_admin to % (for partitions and authorization probes)',
        quote_ident(role_name);
    END IF;
  ELSE
    RAISE NOTICE 'role % does not exist; run sql/role.sql first', quote_ident(role_name);
  END IF;

  IF EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = 'realtime') THEN
    RAISE NOTICE 'schema realtime exists';
  ELSE
    CREATE SCHEMA realtime;
    RAISE NOTICE 'created schema realtime';
  END IF;

  FOREACH subscriber IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = subscriber) THEN
      subscribers := subscribers || subscriber;
    END IF;
  END LOOP;
  IF pg_catalog.cardinality(subscribers) > 0 THEN
    EXECUTE format('GRANT USAGE ON SCHEMA realtime TO %s',
      (SELECT string_agg(quote_ident(s), ', ') FROM unnest(subscribers) s));
    RAISE NOTICE 'granted usage on schema realtime to %', array_to_string(subscribers, ', ');
  END IF;
  -- The partitions are created in it.
  GRANT USAGE, CREATE ON SCHEMA realtime TO supabase_realtime_admin;

  IF pg_catalog.to_regclass('realtime.messages') IS NOT NULL THEN
    RAISE NOTICE 'table realtime.messages exists; left unchanged';
  ELSE
    CREATE TABLE realtime.messages (
      topic text NOT NULL,
      extension text NOT NULL,
      payload jsonb,
      event text,
      private boolean DEFAULT false,
      updated_at timestamp NOT NULL DEFAULT now(),
      inserted_at timestamp NOT NULL DEFAULT now(),
      id uuid NOT NULL DEFAULT gen_random_uuid(),
      binary_payload bytea,
      CONSTRAINT messages_payload_exclusive CHECK (payload IS NULL OR binary_payload IS NULL) NOT VALID,
      PRIMARY KEY (id, inserted_at)
    ) PARTITION BY RANGE (inserted_at);
    -- Replay reads a private topic's newest broadcasts.
    CREATE INDEX messages_inserted_at_topic_index ON ONLY realtime.messages (inserted_at DESC, topic)
      WHERE extension = 'broadcast' AND private IS TRUE;
    ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;
    ALTER TABLE realtime.messages OWNER TO supabase_realtime_admin;
    RAISE NOTICE 'created table realtime.messages (partitioned by day, row level security enabled, no policies yet: private channels are refused until you add some)';
  END IF;
  IF pg_catalog.cardinality(subscribers) > 0 THEN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON realtime.messages TO %s',
      (SELECT string_agg(quote_ident(s), ', ') FROM unnest(subscribers) s));
    RAISE NOTICE 'granted select, insert, update on realtime.messages to %', array_to_string(subscribers, ', ');
  END IF;

  IF pg_catalog.to_regprocedure('realtime.topic()') IS NOT NULL THEN
    RAISE NOTICE 'function realtime.topic() exists; left unchanged';
  ELSE
    CREATE FUNCTION realtime.topic() RETURNS text
      LANGUAGE sql STABLE
      AS $fn$ SELECT nullif(current_setting('realtime.topic', true), '')::text $fn$;
    ALTER FUNCTION realtime.topic() OWNER TO supabase_realtime_admin;
    RAISE NOTICE 'created function realtime.topic()';
  END IF;

  -- Not SECURITY DEFINER, as on Supabase: the insert runs as the caller,
  -- so the INSERT policies on realtime.messages decide, with
  -- realtime.topic() set to the topic. A failure is a WARNING, never an
  -- error that aborts the caller's transaction.
  IF pg_catalog.to_regprocedure('realtime.send(jsonb, text, text, boolean)') IS NOT NULL THEN
    RAISE NOTICE 'function realtime.send(jsonb, text, text, boolean) exists; left unchanged';
  ELSE
    CREATE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean DEFAULT true)
      RETURNS void LANGUAGE plpgsql
      AS $fn$
      DECLARE
        message_id uuid := gen_random_uuid();
      BEGIN
        BEGIN
          -- Clients read the message's id from the payload too.
          IF NOT payload ? 'id' THEN
            payload := jsonb_set(payload, '{id}', to_jsonb(message_id));
          END IF;
          PERFORM set_config('realtime.topic', topic, true);
          INSERT INTO realtime.messages (id, payload, event, topic, private, extension)
            VALUES (message_id, payload, event, topic, private, 'broadcast');
        EXCEPTION WHEN OTHERS THEN
          RAISE WARNING 'WarnSendingBroadcastMessage: %', SQLERRM;
        END;
      END
      $fn$;
    ALTER FUNCTION realtime.send(jsonb, text, text, boolean) OWNER TO supabase_realtime_admin;
    RAISE NOTICE 'created function realtime.send(payload, event, topic, private)';
  END IF;

  IF pg_catalog.to_regprocedure('realtime.send_binary(bytea, text, text, boolean)') IS NOT NULL THEN
    RAISE NOTICE 'function realtime.send_binary(bytea, text, text, boolean) exists; left unchanged';
  ELSE
    CREATE FUNCTION realtime.send_binary(payload bytea, event text, topic text, private boolean DEFAULT true)
      RETURNS void LANGUAGE plpgsql
      AS $fn$
      BEGIN
        BEGIN
          PERFORM set_config('realtime.topic', topic, true);
          INSERT INTO realtime.messages (id, binary_payload, event, topic, private, extension)
            VALUES (gen_random_uuid(), payload, event, topic, private, 'broadcast');
        EXCEPTION WHEN OTHERS THEN
          RAISE WARNING 'WarnSendingBroadcastMessage: %', SQLERRM;
        END;
      END
      $fn$;
    ALTER FUNCTION realtime.send_binary(bytea, text, text, boolean) OWNER TO supabase_realtime_admin;
    RAISE NOTICE 'created function realtime.send_binary(payload, event, topic, private)';
  END IF;

  -- Unlike send, this raises: a trigger that cannot describe its row
  -- should fail loudly.
  IF pg_catalog.to_regprocedure('realtime.broadcast_changes(text, text, text, text, text, record, record, text)') IS NOT NULL THEN
    RAISE NOTICE 'function realtime.broadcast_changes(...) exists; left unchanged';
  ELSE
    CREATE FUNCTION realtime.broadcast_changes(
      topic_name text, event_name text, operation text, table_name text, table_schema text,
      new record, old record, level text DEFAULT 'ROW')
      RETURNS void LANGUAGE plpgsql
      AS $fn$
      DECLARE
        row_data jsonb;
      BEGIN
        IF level = 'STATEMENT' THEN
          RAISE EXCEPTION 'function can only be triggered for each row, not for each statement';
        END IF;
        IF operation NOT IN ('INSERT', 'UPDATE', 'DELETE') THEN
          RAISE EXCEPTION 'Unexpected operation type: %', operation;
        END IF;
        -- A trigger's OLD is NULL on INSERT and its NEW on DELETE.
        row_data := jsonb_build_object('old_record', old, 'record', new,
          'operation', operation, 'table', table_name, 'schema', table_schema);
        PERFORM realtime.send(row_data, event_name, topic_name);
      EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'Failed to process the row: %', SQLERRM;
      END
      $fn$;
    ALTER FUNCTION realtime.broadcast_changes(text, text, text, text, text, record, record, text)
      OWNER TO supabase_realtime_admin;
    RAISE NOTICE 'created function realtime.broadcast_changes(...)';
  END IF;

  IF EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = 'supabase_realtime_messages_publication') THEN
    RAISE NOTICE 'publication supabase_realtime_messages_publication exists; left unchanged';
  ELSE
    CREATE PUBLICATION supabase_realtime_messages_publication FOR TABLE realtime.messages;
    RAISE NOTICE 'created publication supabase_realtime_messages_publication for table realtime.messages';
  END IF;
END
$walcast$;
