-- walcast: batched Row Level Security checks.
--
-- walcast.visible_keys answers, for one table and many subscriber groups
-- at once, which candidate rows each group may see: one call per batch of
-- changes instead of one query per change per subscriber (Supabase's way).
-- The call carries the candidate rows' primary keys once (as text, one row
-- of the array per key column), and the groups: a (role, claims) pair and
-- which of those rows it is a candidate for (NULL: all of them — every
-- unfiltered subscriber of the table — so the keys are neither sent nor
-- parsed once per group). For each group, in order, the function
--   1. sets the role and request.jwt.claims transaction-locally, exactly as
--      a PostgREST request would (set_config(..., true) = SET LOCAL);
--   2. runs ONE query: which of the group's candidate keys exist in the
--      table as that role, so the table's policies decide;
--   3. puts the role and claims back to what they were before the group.
-- Each group runs in its own BEGIN ... EXCEPTION block (a subtransaction):
-- a policy that raises (say, a claim that is not a uuid cast to uuid), a
-- role that does not exist or that the caller may not SET ROLE to, or a
-- missing privilege fails that group only, with its SQLSTATE and message;
-- the subtransaction's rollback also undoes the group's settings. A
-- statement timeout or cancel is not caught (WHEN OTHERS excludes them):
-- it ends the whole call, and the caller denies every group.
--
-- The keys are cast to the key column's type once per call (a one-column
-- key, the usual case), not once per group: walcast.visible_keys_as is
-- polymorphic so the typed array can be held between groups.
--
-- Many groups: with 8 or more unfiltered groups and a one-column key of a
-- fixed-width type with a default btree order (integers, uuid, date,
-- timestamps, ...), the keys are also sorted once per call (distinct, in
-- that order). An unfiltered group may then ask "which rows I can see have
-- one of these keys" -- t.id = $2[width_bucket(t.id, $2)], a binary search
-- per row -- instead of unnesting and hashing every candidate again: with
-- an indexed owner = sub policy that is the index-only scan of the group's
-- own rows and nothing else, 2 to 4 times less work per group. Whether it
-- does is decided per role and call by the planner's own estimates of both
-- forms (EXPLAIN, at the role's first unfiltered group): when the rows a
-- role can see cannot be found cheaply (a policy on an unindexed column, a
-- public flag), probing the candidates stays. Those groups return the
-- visible keys, and one join per call turns them into positions. A key
-- column in a collation other than its type's default is never searched
-- so (the sort and the search must agree). A group whose search raises (a
-- policy failing on a row that is no candidate) is answered by probing
-- instead, and so are its role's later groups. The setting
-- walcast.rls_sorted_keys overrides the choice: auto (default), on
-- (whenever the key type allows), off.
--
-- Security:
--   * SECURITY INVOKER (the default, spelt out): SET ROLE is checked
--     against the session user, so the login role (sql/role.sql) must be
--     a member of every subscriber role; a SECURITY DEFINER function could
--     not SET ROLE at all. For the same reason walcast.visible_keys_as,
--     which runs the query text it is given, grants nothing its caller
--     could not do with that text directly.
--   * No search_path is pinned on the functions, on purpose: a SET clause
--     would also apply to the policies and the functions they call, which
--     must see the session's search_path as they would for the subscriber.
--     Everything here is schema-qualified instead.
--   * Names are never trusted: the table is looked up in pg_class by
--     schema and name, each key column in pg_attribute, and spliced only
--     through format('%I'); key types come from format_type() of the
--     catalog, never from the caller. Roles, claims and key values are data
--     only: set_config() values and the queries' parameters.
--   * A NULL role or 'none' is refused: set_config('role', NULL or 'none')
--     would mean "no role", i.e. the login role's own view of the table.
--   * Run it in a READ ONLY transaction (walcast does): policies then
--     cannot write either.
--
-- Returns one row per group, in order: group_no (1-based), visible (the
-- 1-based positions, among the group's candidates, of those it may see, in
-- no particular order; NULL when the group failed), error_code and
-- error_message (NULL unless it failed).
--
-- Idempotent: the schema and type are created if missing, the functions
-- replaced; the previous version's walcast.rls_group type and its
-- visible_keys overload are dropped. Executable by the walcast login role
-- (the custom setting walcast.role, default walcast, as in sql/role.sql)
-- when it exists; not by PUBLIC.

CREATE SCHEMA IF NOT EXISTS walcast;

-- The previous version's shape (every group carried its own keys): its
-- type, and with it that version's function, go.
DO $walcast$
BEGIN
  IF EXISTS (
    SELECT FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname = 'walcast' AND t.typname = 'rls_group'
  ) THEN
    DROP TYPE walcast.rls_group CASCADE;
    RAISE NOTICE 'dropped the previous walcast.visible_keys and its type walcast.rls_group';
  END IF;
END
$walcast$;

-- One subscriber group: its role, its claims (JSON text), and the 1-based
-- positions of its candidates among the call's keys, NULL for all of them.
DO $walcast$
BEGIN
  IF NOT EXISTS (
    SELECT FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname = 'walcast' AND t.typname = 'rls_subject'
  ) THEN
    CREATE TYPE walcast.rls_subject AS (role text, claims text, candidates integer[]);
    RAISE NOTICE 'created type walcast.rls_subject';
  ELSE
    RAISE NOTICE 'type walcast.rls_subject exists; left unchanged';
  END IF;
END
$walcast$;

-- An earlier version kept the keys as a multirange, with range types of
-- its own for uuid and text: they go.
DO $walcast$
BEGIN
  IF pg_catalog.to_regtype('walcast.uuid_range') IS NOT NULL THEN
    DROP TYPE walcast.uuid_range CASCADE;
    RAISE NOTICE 'dropped type walcast.uuid_range (no longer used)';
  END IF;
  IF pg_catalog.to_regtype('walcast.text_range') IS NOT NULL THEN
    DROP TYPE walcast.text_range CASCADE;
    RAISE NOTICE 'dropped type walcast.text_range (no longer used)';
  END IF;
END
$walcast$;

-- Earlier versions' loops go; this one has other arguments, so CREATE OR
-- REPLACE would leave them as overloads.
DO $walcast$
BEGIN
  IF pg_catalog.to_regprocedure('walcast.visible_keys_as(anyarray, text, text, walcast.rls_subject[])') IS NOT NULL THEN
    DROP FUNCTION walcast.visible_keys_as(anyarray, text, text, walcast.rls_subject[]);
    RAISE NOTICE 'dropped the previous walcast.visible_keys_as';
  END IF;
  IF pg_catalog.to_regprocedure('walcast.visible_keys_as(anyarray, anycompatiblemultirange, text, text, text, text, walcast.rls_subject[])') IS NOT NULL THEN
    DROP FUNCTION walcast.visible_keys_as(anyarray, anycompatiblemultirange, text, text, text, text, walcast.rls_subject[]);
    RAISE NOTICE 'dropped the previous walcast.visible_keys_as (key ranges)';
  END IF;
END
$walcast$;

-- The loop over the groups. keys: the call's candidate keys, typed (a
-- one-dimensional array of the key column's type) or, for a key of several
-- columns, as text (key column × candidate). all_query answers for every
-- candidate ($1: keys) with positions, some_query for the positions $2.
-- sort_query ($1: keys) sorts the keys for a search, or is NULL when the
-- key type cannot be searched so or it does not pay (few groups);
-- search_query ($2: the sorted keys) then answers for every candidate
-- with the visible keys themselves, which the caller turns into positions
-- once for all groups.
CREATE OR REPLACE FUNCTION walcast.visible_keys_as(
  keys anyarray,
  sort_query text,
  search_query text,
  all_query text,
  some_query text,
  groups walcast.rls_subject[]
) RETURNS TABLE (group_no integer, visible integer[], visible_keys anyarray, error_code text, error_message text)
LANGUAGE plpgsql
VOLATILE
SECURITY INVOKER
AS $function$
DECLARE
  role_before text := pg_catalog.current_setting('role');
  claims_before text := pg_catalog.current_setting('request.jwt.claims', true);
  grp walcast.rls_subject;
  sorted_keys keys%TYPE;
  -- Per role, whether its unfiltered groups search the sorted keys: decided
  -- at the role's first such group by the planner's estimates of both forms.
  planned_roles text[] := '{}';
  planned_search boolean[] := '{}';
  role_index integer;
  plan json;
  search_cost float8;
  all_cost float8;
  use_search boolean;
BEGIN
  IF sort_query IS NOT NULL THEN
    EXECUTE sort_query INTO sorted_keys USING keys;
  END IF;
  group_no := 0;
  FOREACH grp IN ARRAY groups LOOP
    group_no := group_no OPERATOR(pg_catalog.+) 1;
    visible := NULL;
    visible_keys := NULL;
    error_code := NULL;
    error_message := NULL;
    BEGIN
      IF grp.role IS NULL OR grp.role OPERATOR(pg_catalog.=) 'none' THEN
        RAISE EXCEPTION 'walcast.visible_keys: % is not a subscriber role',
          coalesce(pg_catalog.quote_literal(grp.role), 'NULL') USING ERRCODE = '22023';
      END IF;
      PERFORM pg_catalog.set_config('role', grp.role, true);
      PERFORM pg_catalog.set_config('request.jwt.claims', grp.claims, true);
      IF grp.candidates IS NULL THEN
        role_index := NULL;
        IF sorted_keys IS NOT NULL THEN
          role_index := pg_catalog.array_position(planned_roles, grp.role);
          IF role_index IS NULL THEN
            IF pg_catalog.current_setting('walcast.rls_sorted_keys', true) OPERATOR(pg_catalog.=) 'on' THEN
              use_search := true;
            ELSE
              BEGIN
                EXECUTE pg_catalog.concat('EXPLAIN (FORMAT JSON) ', search_query) INTO plan USING keys, sorted_keys;
                search_cost := pg_catalog.json_extract_path_text(plan, '0', 'Plan', 'Total Cost')::pg_catalog.float8;
                EXECUTE pg_catalog.concat('EXPLAIN (FORMAT JSON) ', all_query) INTO plan USING keys;
                all_cost := pg_catalog.json_extract_path_text(plan, '0', 'Plan', 'Total Cost')::pg_catalog.float8;
                use_search := search_cost OPERATOR(pg_catalog.<=) all_cost;
              EXCEPTION WHEN OTHERS THEN
                -- Whatever keeps the search from being planned (a revoked
                -- function, say) leaves this role to probing; the group's
                -- own query below then says what is wrong, if anything.
                use_search := false;
              END;
            END IF;
            planned_roles := pg_catalog.array_append(planned_roles, grp.role);
            planned_search := pg_catalog.array_append(planned_search, use_search);
            role_index := pg_catalog.cardinality(planned_roles);
          END IF;
        END IF;
        IF role_index IS NOT NULL AND planned_search[role_index] THEN
          BEGIN
            EXECUTE search_query INTO visible_keys USING keys, sorted_keys;
          EXCEPTION WHEN OTHERS THEN
            -- The search reads every row the role can see, and a
            -- policy may raise on one that is no candidate: the group's
            -- answer is its candidates' (this block's rollback keeps the
            -- role and claims), and the role's later groups probe too.
            visible_keys := NULL;
            planned_search[role_index] := false;
            EXECUTE all_query INTO visible USING keys;
          END;
        ELSE
          EXECUTE all_query INTO visible USING keys;
        END IF;
      ELSIF pg_catalog.cardinality(grp.candidates) OPERATOR(pg_catalog.>) 0 THEN
        EXECUTE some_query INTO visible USING keys, grp.candidates;
      END IF;
      IF visible_keys IS NULL THEN
        visible := coalesce(visible, '{}');
      END IF;
      PERFORM pg_catalog.set_config('role', role_before, true);
      PERFORM pg_catalog.set_config('request.jwt.claims', claims_before, true);
    EXCEPTION WHEN OTHERS THEN
      -- The subtransaction is rolled back: role and claims are as before.
      visible := NULL;
      visible_keys := NULL;
      GET STACKED DIAGNOSTICS error_code = RETURNED_SQLSTATE, error_message = MESSAGE_TEXT;
    END;
    RETURN NEXT;
  END LOOP;
END
$function$;

COMMENT ON FUNCTION walcast.visible_keys_as(anyarray, text, text, text, text, walcast.rls_subject[]) IS
  'walcast: the per-group loop of walcast.visible_keys (internal; see sql/rls.sql)';

CREATE OR REPLACE FUNCTION walcast.visible_keys(
  schema_name text,
  table_name text,
  key_columns text[],
  keys text[],
  groups walcast.rls_subject[]
) RETURNS TABLE (group_no integer, visible integer[], error_code text, error_message text)
LANGUAGE plpgsql
VOLATILE
SECURITY INVOKER
AS $function$
DECLARE
  rel oid;
  rel_sql text;                  -- "schema"."table", quoted
  ncols integer := pg_catalog.cardinality(key_columns);
  n integer := coalesce(pg_catalog.array_length(keys, 2), 0);
  col record;
  key_type text;                 -- the one key column's type
  unnest_args text := '';        -- pg_catalog.unnest(($1[1:1])::bigint[]), ...
  key_names text := '';          -- k1, k2, ...
  all_conditions text := '';     -- t."id" = c.k1 AND ...
  some_conditions text := '';    -- t."id" = ($1[1][s.p])::bigint AND ...
  all_query text;
  some_query text;
  searchable boolean;            -- the one key column can be searched sorted
  sort_query text;
  search_query text;
  search_mode text;              -- walcast.rls_sorted_keys: auto, on or off
  role_before text := pg_catalog.current_setting('role');
BEGIN
  IF ncols IS NULL OR ncols = 0 THEN
    RAISE EXCEPTION 'walcast.visible_keys: no key columns' USING ERRCODE = '22023';
  END IF;
  IF n > 0 AND pg_catalog.array_length(keys, 1) <> ncols THEN
    RAISE EXCEPTION 'walcast.visible_keys: keys have % rows, the table key has % columns',
      pg_catalog.array_length(keys, 1), ncols USING ERRCODE = '22023';
  END IF;

  SELECT c.oid, pg_catalog.format('%I.%I', ns.nspname, c.relname) INTO rel, rel_sql
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace ns ON ns.oid = c.relnamespace
  WHERE ns.nspname = schema_name AND c.relname = table_name AND c.relkind IN ('r', 'p');
  IF NOT FOUND THEN
    RAISE EXCEPTION 'walcast.visible_keys: table %.% does not exist',
      pg_catalog.quote_ident(schema_name), pg_catalog.quote_ident(table_name)
      USING ERRCODE = '42P01';
  END IF;

  FOR k IN 1..ncols LOOP
    SELECT a.attname, a.atttypid, a.attcollation,
           pg_catalog.format_type(a.atttypid, a.atttypmod) AS sql_type INTO col
    FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = rel AND a.attname = key_columns[k] AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'walcast.visible_keys: column % of % does not exist',
        pg_catalog.quote_ident(key_columns[k]), rel_sql USING ERRCODE = '42703';
    END IF;
    -- Casts apply to the candidates, never to the table's column: the
    -- conditions compare typed columns with the type's own (leakproof)
    -- equality, so they may be index or hash conditions. A cast on the
    -- column (t.id::text = ...) is not leakproof: Postgres would have to
    -- apply the policies first and could never probe the primary key.
    key_type := col.sql_type;
    unnest_args := unnest_args
      || pg_catalog.format('%spg_catalog.unnest(($1[%s:%s])::%s[])', CASE WHEN k > 1 THEN ', ' END, k, k, col.sql_type);
    key_names := key_names || pg_catalog.format('k%s, ', k);
    all_conditions := all_conditions
      || pg_catalog.format('%st.%I = c.k%s', CASE WHEN k > 1 THEN ' AND ' END, col.attname, k);
    some_conditions := some_conditions
      || pg_catalog.format('%st.%I = ($1[%s][s.p])::%s', CASE WHEN k > 1 THEN ' AND ' END, col.attname, k, col.sql_type);
  END LOOP;

  -- The candidates drive a semi-join; with the policies' quals added, the
  -- planner chooses primary-key probes (few candidates) or a hash of the
  -- rows the role may see (many).
  IF ncols = 1 THEN
    -- Typed once for all groups: $1 is key_type[].
    all_query := pg_catalog.format(
      'SELECT pg_catalog.array_agg(c.i) FROM pg_catalog.unnest($1) WITH ORDINALITY AS c(k1, i) '
      'WHERE EXISTS (SELECT FROM %s t WHERE %s)', rel_sql, all_conditions);
    some_query := pg_catalog.format(
      'SELECT pg_catalog.array_agg(s.i) FROM pg_catalog.unnest($2) WITH ORDINALITY AS s(p, i) '
      'WHERE EXISTS (SELECT FROM %s t WHERE t.%I = $1[s.p])', rel_sql, key_columns[1]);

    -- Many unfiltered groups: the keys sorted once and searched (see the
    -- top). Only for a fixed-width key type (the search steps through the
    -- sorted array by index) with a default btree order, in its type's own
    -- collation (the sort and width_bucket must compare alike): others,
    -- text among them, keep the positional form.
    searchable := EXISTS (
      SELECT FROM pg_catalog.pg_type ty
      JOIN pg_catalog.pg_opclass oc
        ON oc.opcintype OPERATOR(pg_catalog.=) (CASE WHEN ty.typtype OPERATOR(pg_catalog.=) 'd'
                                                THEN ty.typbasetype ELSE ty.oid END)
      JOIN pg_catalog.pg_am am ON am.oid OPERATOR(pg_catalog.=) oc.opcmethod
      WHERE ty.oid OPERATOR(pg_catalog.=) col.atttypid
        AND ty.typlen OPERATOR(pg_catalog.>) 0
        -- width_bucket steps through the array by typlen, ignoring
        -- alignment: a length that is not a multiple of it (timetz 12 on
        -- 8, macaddr 6 on 4) would be searched at the wrong places.
        AND ty.typlen OPERATOR(pg_catalog.%) (CASE ty.typalign WHEN 'c' THEN 1 WHEN 's' THEN 2
                                                WHEN 'i' THEN 4 ELSE 8 END) OPERATOR(pg_catalog.=) 0
        AND am.amname OPERATOR(pg_catalog.=) 'btree' AND oc.opcdefault
        AND col.attcollation OPERATOR(pg_catalog.=) ty.typcollation);
    search_mode := coalesce(nullif(pg_catalog.current_setting('walcast.rls_sorted_keys', true), ''), 'auto');
    IF NOT search_mode OPERATOR(pg_catalog.=) ANY (ARRAY['auto', 'on', 'off']) THEN
      RAISE EXCEPTION 'walcast.visible_keys: walcast.rls_sorted_keys is %, expected auto, on or off',
        pg_catalog.quote_literal(search_mode) USING ERRCODE = '22023';
    END IF;
    IF searchable AND (search_mode OPERATOR(pg_catalog.=) 'on' OR search_mode OPERATOR(pg_catalog.=) 'auto' AND (
      SELECT pg_catalog.count(*) FROM pg_catalog.unnest(groups) AS g WHERE g.candidates IS NULL
    ) OPERATOR(pg_catalog.>=) 8) THEN
      sort_query :=
        'SELECT ARRAY(SELECT DISTINCT k FROM pg_catalog.unnest($1) AS k WHERE k IS NOT NULL ORDER BY k)';
      -- width_bucket: how many sorted keys are <= t.id, so the key at that
      -- index equals t.id exactly when t.id is one of them. The first and
      -- last key turn most of a group's rows away with two comparisons;
      -- IS TRUE keeps them from becoming primary-key range conditions,
      -- which would make the planner evaluate the policy per candidate.
      search_query := pg_catalog.format(
        'SELECT pg_catalog.array_agg(t.%1$I) FROM %2$s t '
        'WHERE (t.%1$I OPERATOR(pg_catalog.>=) $2[1]) IS TRUE '
        'AND (t.%1$I OPERATOR(pg_catalog.<=) $2[pg_catalog.cardinality($2)]) IS TRUE '
        'AND t.%1$I OPERATOR(pg_catalog.=) $2[pg_catalog.width_bucket(t.%1$I, $2)]',
        key_columns[1], rel_sql);
    END IF;

    -- keys[1:1] is still two-dimensional (1 × n), and $1[p] needs one
    -- dimension: flattened and cast here, once. Groups answered with keys
    -- get their positions here too, in one join for all of them.
    RETURN QUERY EXECUTE pg_catalog.format(
      'WITH c AS MATERIALIZED ('
      '  SELECT ARRAY(SELECT pg_catalog.unnest($1[1:1]))::%1$s[] AS keys), '
      'r AS MATERIALIZED ('
      '  SELECT v.* FROM c, walcast.visible_keys_as(c.keys, $2, $3, $4, $5, $6) AS v), '
      'm AS ('
      '  SELECT r.group_no, pg_catalog.array_agg(DISTINCT k.i::integer) AS visible '
      '  FROM r CROSS JOIN LATERAL pg_catalog.unnest(r.visible_keys) AS v(key) '
      '  JOIN (SELECT k.key, k.i FROM c, pg_catalog.unnest(c.keys) WITH ORDINALITY AS k(key, i)) AS k '
      '    ON k.key OPERATOR(pg_catalog.=) v.key '
      '  GROUP BY r.group_no) '
      'SELECT r.group_no, '
      '  coalesce(r.visible, m.visible, CASE WHEN r.visible_keys IS NOT NULL THEN ''{}''::integer[] END), '
      '  r.error_code, r.error_message '
      'FROM r LEFT JOIN m ON m.group_no OPERATOR(pg_catalog.=) r.group_no '
      'ORDER BY r.group_no',
      key_type)
      USING keys, sort_query, search_query, all_query, some_query, groups;
  ELSE
    all_query := pg_catalog.format(
      'SELECT pg_catalog.array_agg(c.i) FROM ROWS FROM (%s) WITH ORDINALITY AS c(%si) '
      'WHERE EXISTS (SELECT FROM %s t WHERE %s)',
      unnest_args, key_names, rel_sql, all_conditions);
    some_query := pg_catalog.format(
      'SELECT pg_catalog.array_agg(s.i) FROM pg_catalog.unnest($2) WITH ORDINALITY AS s(p, i) '
      'WHERE EXISTS (SELECT FROM %s t WHERE %s)', rel_sql, some_conditions);
    RETURN QUERY
      SELECT v.group_no, v.visible, v.error_code, v.error_message
      FROM walcast.visible_keys_as(keys, NULL, NULL, all_query, some_query, groups) AS v;
  END IF;

  -- Belt and braces: never return with a subscriber's role or claims.
  IF NOT coalesce(pg_catalog.current_setting('role') OPERATOR(pg_catalog.=) role_before, false) THEN
    RAISE EXCEPTION 'walcast.visible_keys: role was not restored' USING ERRCODE = 'XX000';
  END IF;
END
$function$;

COMMENT ON FUNCTION walcast.visible_keys(text, text, text[], text[], walcast.rls_subject[]) IS
  'walcast: which candidate keys each (role, claims) group may see in a table, one query per group, a failing group contained; see sql/rls.sql';

DO $walcast$
DECLARE
  role_name text := coalesce(nullif(current_setting('walcast.role', true), ''), 'walcast');
BEGIN
  REVOKE ALL ON FUNCTION walcast.visible_keys(text, text, text[], text[], walcast.rls_subject[]) FROM PUBLIC;
  REVOKE ALL ON FUNCTION walcast.visible_keys_as(anyarray, text, text, text, text, walcast.rls_subject[]) FROM PUBLIC;
  IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = role_name) THEN
    EXECUTE format('GRANT USAGE ON SCHEMA walcast TO %I', role_name);
    EXECUTE format('GRANT USAGE ON TYPE walcast.rls_subject TO %I', role_name);
    EXECUTE format(
      'GRANT EXECUTE ON FUNCTION walcast.visible_keys(text, text, text[], text[], walcast.rls_subject[]) TO %I',
      role_name);
    EXECUTE format(
      'GRANT EXECUTE ON FUNCTION walcast.visible_keys_as(anyarray, text, text, text, text, walcast.rls_subject[]) TO %I',
      role_name);
    RAISE NOTICE 'role % may call walcast.visible_keys', quote_ident(role_name);
  ELSE
    RAISE NOTICE 'role % does not exist; walcast.visible_keys is not granted to it (run sql/role.sql first)',
      quote_ident(role_name);
  END IF;
END
$walcast$;
