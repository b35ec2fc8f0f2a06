-- onesignal-bridge: trigger-fed outbox for `source.kind: outbox`.
--
-- For databases where the bridge may not use logical replication (wal_level = replica, or no
-- REPLICATION privilege). Ordinary triggers append each change of a mapped table to
-- onesignal_bridge.outbox in the same transaction as the change; the bridge drains the table,
-- applies the changes to OneSignal and deletes each row only after it was applied or
-- dead-lettered. See docs/outbox.md.
--
-- `onesignal-bridge setup --config FILE` runs this file, then installs the triggers on each mapped
-- table with onesignal_bridge.install_trigger (see the end of this file); `--print-sql` prints
-- exactly that. `onesignal-bridge teardown --config FILE` removes triggers, functions and outbox.
-- Run it as the owner of the mapped tables (or a superuser). Idempotent.

CREATE SCHEMA IF NOT EXISTS onesignal_bridge;

-- One row per captured change.
--   id          write order. Drawn from the sequence inside the trigger, i.e. while the writing
--               transaction holds the lock on the changed row: a transaction that changes a row
--               after another one committed a change to it always gets a higher id. The bridge
--               applies committed rows in id order. The sequence must keep CACHE 1: with a cache,
--               each session would draw ids from its own range and id order would no longer be
--               the order of writes.
--   txid        the writing transaction (xid8), for diagnosis.
--   created_at  start of the writing transaction (now()): the age metric is measured from it.
--   table_name  "schema.table" of the changed table.
--   op          I(nsert) U(pdate) D(elete) T(runcate).
--   new_row     the row after the change (INSERT, UPDATE) as jsonb; old_row the row before it
--               (UPDATE, DELETE). Only the captured columns (the trigger's arguments) when the
--               trigger names any. A key that is absent was not captured; a key with null is
--               SQL NULL.
CREATE TABLE IF NOT EXISTS onesignal_bridge.outbox (
    id         bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    txid       xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at timestamptz NOT NULL DEFAULT now(),
    table_name text NOT NULL,
    op         "char" NOT NULL CHECK (op IN ('I', 'U', 'D', 'T')),
    new_row    jsonb,
    old_row    jsonb
);

-- The bridge's wake-up flag: `waiting` is true while the draining bridge has caught up and sleeps
-- until notified. The trigger sends pg_notify only then, and at most once per transaction: a
-- notifying transaction takes a cluster-wide lock at commit that serialises it with every other
-- notifying commit, which a busy outbox (the bridge is draining anyway) must not pay for.
CREATE TABLE IF NOT EXISTS onesignal_bridge.wakeup (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),
    waiting boolean NOT NULL DEFAULT false
);
INSERT INTO onesignal_bridge.wakeup DEFAULT VALUES ON CONFLICT DO NOTHING;

-- The generic trigger function: one for every mapped table. Its arguments name the columns NOT to
-- capture (install_trigger computes them from the columns to capture: removing keys from the
-- row's jsonb is several times cheaper per row than picking keys). An UPDATE that changes none of
-- the captured columns adds no row.
-- SECURITY DEFINER: the application's roles need no privilege on the outbox (they could otherwise
-- forge changes); search_path is pinned so that a caller cannot redirect what the body resolves.
-- The first captured row of a transaction reads the wake-up flag (a transaction-local setting
-- remembers that it did) and, if the bridge waits, sends one pg_notify; a bulk write of N rows
-- sends at most one notification, not N.
CREATE OR REPLACE FUNCTION onesignal_bridge.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    n jsonb;
    o jsonb;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO onesignal_bridge.outbox (table_name, op)
        VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'T');
    ELSE
        IF TG_OP <> 'DELETE' THEN
            n := to_jsonb(NEW);
            IF TG_NARGS > 0 THEN
                n := n - TG_ARGV;
            END IF;
        END IF;
        IF TG_OP <> 'INSERT' THEN
            o := to_jsonb(OLD);
            IF TG_NARGS > 0 THEN
                o := o - TG_ARGV;
            END IF;
            IF n = o THEN
                RETURN NULL;  -- an UPDATE that changed nothing the bridge captures
            END IF;
        END IF;
        INSERT INTO onesignal_bridge.outbox (table_name, op, new_row, old_row)
        VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, substr(TG_OP, 1, 1), n, o);
    END IF;
    IF current_setting('onesignal_bridge.wake_checked', true) IS DISTINCT FROM 'on' THEN
        PERFORM set_config('onesignal_bridge.wake_checked', 'on', true);  -- until the transaction ends
        IF EXISTS (SELECT 1 FROM onesignal_bridge.wakeup WHERE waiting) THEN
            PERFORM pg_notify('onesignal_bridge_outbox', '');
        END IF;
    END IF;
    RETURN NULL;
END
$fn$;

REVOKE ALL ON FUNCTION onesignal_bridge.capture() FROM PUBLIC;

-- Install (or replace) the two triggers on one table. `columns`: the columns to capture (the
-- primary key is always added: it names rows in logs and dead letters); NULL captures whole rows.
-- Columns added to the table later are captured too until this runs again (setup does).
CREATE OR REPLACE FUNCTION onesignal_bridge.install_trigger(tbl regclass, columns text[] DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    skip text := '';
BEGIN
    IF columns IS NOT NULL THEN
        SELECT coalesce(string_agg(quote_literal(a.attname), ', ' ORDER BY a.attnum), '') INTO skip
        FROM pg_attribute a
        WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attname <> ALL (columns)
          AND NOT EXISTS (SELECT 1 FROM pg_index i
                          WHERE i.indrelid = tbl AND i.indisprimary AND a.attnum = ANY (i.indkey));
    END IF;
    EXECUTE format('CREATE OR REPLACE TRIGGER onesignal_bridge_capture'
                   ' AFTER INSERT OR UPDATE OR DELETE ON %s'
                   ' FOR EACH ROW EXECUTE FUNCTION onesignal_bridge.capture(%s)', tbl, skip);
    EXECUTE format('CREATE OR REPLACE TRIGGER onesignal_bridge_truncate'
                   ' AFTER TRUNCATE ON %s'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION onesignal_bridge.capture()', tbl);
END
$fn$;

-- Remove the triggers from one table.
CREATE OR REPLACE FUNCTION onesignal_bridge.remove_trigger(tbl regclass)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS onesignal_bridge_capture ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS onesignal_bridge_truncate ON %s', tbl);
END
$fn$;

REVOKE ALL ON FUNCTION onesignal_bridge.install_trigger(regclass, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION onesignal_bridge.remove_trigger(regclass) FROM PUBLIC;

-- Then, per mapped table (setup generates these from the configuration), e.g.:
--   SELECT onesignal_bridge.install_trigger('public.users', ARRAY['id', 'crm_id', 'plan', 'country']);
--   SELECT onesignal_bridge.install_trigger('public.orders', ARRAY['user_id', 'total', 'created_at']);
