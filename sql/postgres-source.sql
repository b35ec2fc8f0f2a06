-- schema version table
CREATE SCHEMA IF NOT EXISTS onesignal_bridge;
CREATE TABLE IF NOT EXISTS onesignal_bridge.schema_version (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- schema version 1: base
-- onesignal-bridge schema, version 1: the bridge's own tables, beside the application's.
-- Written with IF NOT EXISTS so that a database set up before schema versions existed adopts it.
CREATE SCHEMA IF NOT EXISTS onesignal_bridge;

-- Dead letters: changes that can never be applied, with the reason; `dlq list|show|replay|purge`.
CREATE TABLE IF NOT EXISTS onesignal_bridge.dead_letters (
    id          bigserial PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    source_table text NOT NULL,
    row_key     text NOT NULL,
    field       text,
    reason      text NOT NULL,
    message     text NOT NULL,
    position    text NOT NULL,
    onesignal_user text,
    payload     jsonb,
    request     jsonb,
    replayed_at timestamptz
);
CREATE INDEX IF NOT EXISTS dead_letters_table_idx ON onesignal_bridge.dead_letters (source_table, created_at);

-- Email/SMS subscription ids the bridge learned from OneSignal's answers, by (channel, address).
CREATE TABLE IF NOT EXISTS onesignal_bridge.subscriptions (
    channel         text NOT NULL,
    token           text NOT NULL,
    owner           text NOT NULL,
    subscription_id text NOT NULL,
    enabled         boolean,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, token)
);
CREATE INDEX IF NOT EXISTS subscriptions_owner_idx ON onesignal_bridge.subscriptions (owner);

-- Initial snapshot progress, per slot and table (resumable by chunk).
CREATE TABLE IF NOT EXISTS onesignal_bridge.snapshot_progress (
    slot        text NOT NULL,
    table_name  text NOT NULL,
    last_key    jsonb,
    rows_done   bigint NOT NULL DEFAULT 0,
    done        boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, table_name)
);

-- Backfill requests: written by `onesignal-bridge backfill`, read back through the stream.
CREATE TABLE IF NOT EXISTS onesignal_bridge.backfill_requests (
    id          bigserial PRIMARY KEY,
    table_name  text NOT NULL,
    where_sql   text,
    chunk_size  int NOT NULL DEFAULT 1000,
    status      text NOT NULL DEFAULT 'requested',   -- requested | running | done | failed
    last_key    jsonb,
    rows_sent   bigint NOT NULL DEFAULT 0,
    message     text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO onesignal_bridge.schema_version (version, name) VALUES (1, 'base') ON CONFLICT (version) DO NOTHING;

-- schema version 2: dead letter row keys
-- onesignal-bridge schema, version 2: dead letters keep their row keys as JSON,
-- [{"table": ..., "key": {column: value}}], which `dlq replay` looks rows up by (row_key stays,
-- for people).
ALTER TABLE onesignal_bridge.dead_letters ADD COLUMN IF NOT EXISTS row_keys jsonb;
INSERT INTO onesignal_bridge.schema_version (version, name) VALUES (2, 'dead_letter_row_keys') ON CONFLICT (version) DO NOTHING;

-- schema version 3: leaders
-- onesignal-bridge schema, version 3: who led each stream last, for fencing (bridge/lease.py).
-- One row per leader lock (the outbox, or a replication slot). A replica that takes the lock
-- bumps `epoch` and sets `clean` false; a leader that stops with every request answered sets
-- `clean` true. The next leader waits out the previous one's requests unless they ended cleanly,
-- and a replica that finds another epoch than its own abandons what it still held.
CREATE TABLE IF NOT EXISTS onesignal_bridge.leaders (
    lock_name  text PRIMARY KEY,
    epoch      bigint NOT NULL,
    clean      boolean NOT NULL DEFAULT false,
    holder     text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO onesignal_bridge.schema_version (version, name) VALUES (3, 'leaders') ON CONFLICT (version) DO NOTHING;

-- publication onesignal_bridge for the mapped tables
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'onesignal_bridge') THEN
    ALTER PUBLICATION onesignal_bridge SET TABLE public.users, public.orders, onesignal_bridge.backfill_requests;
  ELSE
    CREATE PUBLICATION onesignal_bridge FOR TABLE public.users, public.orders, onesignal_bridge.backfill_requests;
  END IF;
END $$;

-- public.users: deletes and address changes need the old row
ALTER TABLE public.users REPLICA IDENTITY FULL;

-- public.orders: a unique identity column other than the primary key needs the old row (renames)
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
      AND a.attnum = i.indkey[0] WHERE i.indrelid = 'public.orders'::regclass
      AND i.indisunique AND NOT i.indisprimary AND i.indnatts = 1 AND i.indpred IS NULL
      AND a.attname = 'user_id') THEN
    ALTER TABLE public.orders REPLICA IDENTITY FULL;
  END IF;
END $$;

-- replication slot onesignal_bridge (pgoutput)
SELECT pg_create_logical_replication_slot('onesignal_bridge', 'pgoutput')
WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'onesignal_bridge');
