-- onesignal-bridge schema, version 2: dead letters keep their row keys as JSON,
-- [{"table": ..., "key": {column: value}}], which `dlq replay` looks rows up by (row_key stays,
-- for people).
ALTER TABLE onesignal_bridge.dead_letters ADD COLUMN IF NOT EXISTS row_keys jsonb;
