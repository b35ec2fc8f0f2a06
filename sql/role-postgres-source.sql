-- Least-privilege role for `source.kind: postgres`.
-- Run as a superuser (or the tables' owner plus a role with CREATEROLE), once per database.
-- Then point source.dsn at this role instead of a superuser.

CREATE ROLE onesignal_bridge WITH LOGIN REPLICATION PASSWORD 'change-me';

-- Read the mapped tables (needed by the initial snapshot and by `check`).
GRANT USAGE ON SCHEMA public TO onesignal_bridge;
GRANT SELECT ON public.users, public.orders TO onesignal_bridge;

-- The dead-letter store lives in its own schema, owned by the bridge's role.
CREATE SCHEMA IF NOT EXISTS onesignal_bridge AUTHORIZATION onesignal_bridge;

-- The publication is created once by the tables' owner (CREATE PUBLICATION needs ownership of
-- the tables); the bridge's role only reads it. Run `onesignal-bridge setup --print-sql` as that
-- owner, or:
--   CREATE PUBLICATION onesignal_bridge FOR TABLE public.users, public.orders;
-- The slot can be created by the bridge itself (REPLICATION is enough):
--   SELECT pg_create_logical_replication_slot('onesignal_bridge', 'pgoutput');

-- The bridge's own tables (dead letters, subscription ids, snapshot progress, backfill requests)
-- are created by `onesignal-bridge setup`; whoever runs it, the bridge's role may use them.
GRANT USAGE ON SCHEMA onesignal_bridge TO onesignal_bridge;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA onesignal_bridge TO onesignal_bridge;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA onesignal_bridge TO onesignal_bridge;
ALTER DEFAULT PRIVILEGES IN SCHEMA onesignal_bridge GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO onesignal_bridge;
ALTER DEFAULT PRIVILEGES IN SCHEMA onesignal_bridge GRANT USAGE, SELECT ON SEQUENCES TO onesignal_bridge;
