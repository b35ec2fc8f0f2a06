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
