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
