-- Least-privilege role for `source.kind: outbox`.
--
-- No SUPERUSER, no REPLICATION, and no privilege at all on the application's tables: the capture
-- trigger function is SECURITY DEFINER (it writes the outbox as its owner), so the bridge only
-- reads and deletes outbox rows and writes its own bookkeeping tables.
--
-- Run as a superuser (or a role with CREATEROLE) connected to the application's database, before
-- or after setup (either order works):
--   1. this file (creates the role; grants on the bridge's objects if setup already ran);
--   2. setup, as the owner of the mapped tables (creating triggers requires ownership):
--        onesignal-bridge setup --config FILE --print-sql | psql "$OWNER_DSN"
--      with source.dsn naming this role: setup grants the same privileges to the user in
--      source.dsn;
--   3. point source.dsn at this role and verify with `onesignal-bridge check --config FILE`,
--      which names any missing privilege with the GRANT that fixes it.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'onesignal_bridge_outbox') THEN
        CREATE ROLE onesignal_bridge_outbox WITH LOGIN NOSUPERUSER NOREPLICATION NOCREATEDB
            NOCREATEROLE NOBYPASSRLS PASSWORD 'change-me';
    END IF;
END $$;

DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO onesignal_bridge_outbox', current_database());
END $$;

-- What the bridge does with each object:
--   outbox          SELECT (claim), DELETE (once applied or dead-lettered)
--   wakeup          SELECT, UPDATE (raise and lower the "waiting for a notification" flag)
--   dead_letters    INSERT (+ the id sequence) while running; SELECT, UPDATE, DELETE for `dlq`
--   subscriptions   SELECT, INSERT, UPDATE, DELETE (email/SMS subscription ids it learned)
--   leaders         SELECT, INSERT, UPDATE (who led last and whether it stopped cleanly: fencing)
-- LISTEN, advisory locks (leader election) and reading the catalogs need no grant.
DO $$
BEGIN
    IF to_regclass('onesignal_bridge.outbox') IS NOT NULL THEN
        GRANT USAGE ON SCHEMA onesignal_bridge TO onesignal_bridge_outbox;
        GRANT SELECT, DELETE ON onesignal_bridge.outbox TO onesignal_bridge_outbox;
        GRANT SELECT, UPDATE ON onesignal_bridge.wakeup TO onesignal_bridge_outbox;
        GRANT SELECT, INSERT, UPDATE, DELETE ON onesignal_bridge.dead_letters TO onesignal_bridge_outbox;
        GRANT USAGE ON SEQUENCE onesignal_bridge.dead_letters_id_seq TO onesignal_bridge_outbox;
        GRANT SELECT, INSERT, UPDATE, DELETE ON onesignal_bridge.subscriptions TO onesignal_bridge_outbox;
        GRANT SELECT, INSERT, UPDATE ON onesignal_bridge.leaders TO onesignal_bridge_outbox;
    END IF;
END $$;
