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
