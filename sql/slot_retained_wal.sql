-- WAL the replication slot keeps on the server, in bytes (walcast::metrics).
-- $1: slot name. NULL when the slot has no restart_lsn (invalidated); no
-- row when it does not exist. On a standby the replay position stands in
-- for the current one.
SELECT pg_catalog.pg_wal_lsn_diff(
         CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()
              ELSE pg_catalog.pg_current_wal_lsn() END,
         s.restart_lsn)::bigint
FROM pg_catalog.pg_replication_slots s
WHERE s.slot_name = $1
