"""Every metric the bridge exports: names and label keys in one place (Prometheus conventions)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

PREFIX = "onesignal_bridge"

REGISTRY = CollectorRegistry(auto_describe=True)

UP = Gauge(f"{PREFIX}_up", "1 while the bridge process runs", registry=REGISTRY)
READY = Gauge(f"{PREFIX}_ready", "1 when the source is connected and OneSignal accepts the key", registry=REGISTRY)
STANDBY = Gauge(f"{PREFIX}_standby", "1 while this replica waits as a hot standby for the slot's lock",
                registry=REGISTRY)
BUILD = Info(f"{PREFIX}_build", "Version of the running bridge", registry=REGISTRY)

SOURCE_LAG_SECONDS = Gauge(
    f"{PREFIX}_source_lag_seconds",
    "Commit time of the newest change seen minus that of the newest confirmed",
    registry=REGISTRY,
)
SLOT_LAG_BYTES = Gauge(
    f"{PREFIX}_replication_slot_lag_bytes",
    "Current WAL LSN minus the slot's confirmed flush LSN",
    registry=REGISTRY,
)
KAFKA_CONSUMER_LAG = Gauge(
    f"{PREFIX}_kafka_consumer_lag", "High watermark minus committed offset", ["topic", "partition"], registry=REGISTRY
)
OUTBOX_DEPTH = Gauge(f"{PREFIX}_outbox_depth", "Rows waiting in the outbox table", registry=REGISTRY)
CONFIRMED_POSITION = Gauge(
    f"{PREFIX}_confirmed_position", "Last source position confirmed (LSN as a number)", registry=REGISTRY
)

CHANGES = Counter(f"{PREFIX}_changes_total", "Row changes read from the source", ["table", "op"], registry=REGISTRY)
COALESCED = Counter(
    f"{PREFIX}_user_changes_coalesced_total",
    "User changes merged into an already pending change for the same user (calls saved)",
    registry=REGISTRY,
)
PENDING_USERS = Gauge(f"{PREFIX}_pending_users", "Users with changes waiting to be sent", registry=REGISTRY)
PENDING_BYTES = Gauge(f"{PREFIX}_pending_bytes", "Estimated memory held by pending changes", registry=REGISTRY)
BACKPRESSURE = Counter(
    f"{PREFIX}_backpressure_waits_total", "Times the source paused because the pending budget was full",
    registry=REGISTRY,
)

API_REQUESTS = Counter(
    f"{PREFIX}_api_requests_total", "OneSignal API requests by endpoint and status", ["endpoint", "status"],
    registry=REGISTRY,
)
API_DURATION = Histogram(
    f"{PREFIX}_api_request_duration_seconds", "OneSignal API request duration", ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=REGISTRY,
)
API_RETRIES = Counter(f"{PREFIX}_api_retries_total", "Retried OneSignal requests", ["reason"], registry=REGISTRY)
API_FOLLOW_UPS = Counter(f"{PREFIX}_api_follow_ups_total",
                         "Requests sent because an answer showed OneSignal did not apply what was asked "
                         "(properties_not_applied: Create user on an existing user; consent_differs: a "
                         "subscription OneSignal kept with another consent; update_not_found: Update user "
                         "answered 404, Create user follows)", ["reason"], registry=REGISTRY)
API_RATE_LIMITED = Counter(f"{PREFIX}_api_rate_limited_total", "429 answers from OneSignal", registry=REGISTRY)

DEAD_LETTERS = Counter(
    f"{PREFIX}_dead_letters_total", "Changes that can never be applied, stored with their reason",
    ["table", "reason"], registry=REGISTRY,
)
END_TO_END = Histogram(
    f"{PREFIX}_end_to_end_latency_seconds", "Database commit to OneSignal 2xx",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5, 10, 30, 60, 300), registry=REGISTRY,
)
SUBSCRIPTION_TRANSFERS = Counter(
    f"{PREFIX}_subscription_transfers_total", "Subscriptions OneSignal moved from another user (202)",
    registry=REGISTRY,
)
OUTBOX_UNMAPPED_ROWS = Counter(
    f"{PREFIX}_outbox_unmapped_rows_total",
    "Outbox rows of a table no mapping names (a table renamed after setup, or a mapping removed without "
    "running setup again): deleted without being applied", ["table"], registry=REGISTRY,
)
OUTBOX_OLDEST_AGE_SECONDS = Gauge(
    f"{PREFIX}_outbox_oldest_age_seconds",
    "Age of the oldest row waiting in the outbox table (from the start of its transaction); 0 when empty",
    registry=REGISTRY,
)

SNAPSHOT_ROWS_TOTAL = Gauge(f"{PREFIX}_snapshot_rows_estimated", "Rows the initial snapshot expects per table",
                            ["table"], registry=REGISTRY)
SNAPSHOT_ROWS_DONE = Gauge(f"{PREFIX}_snapshot_rows_done", "Snapshot rows applied (or dead-lettered) per table",
                           ["table"], registry=REGISTRY)
SNAPSHOT_ROWS_READ = Counter(f"{PREFIX}_snapshot_rows_read_total", "Snapshot rows read by this process per table",
                             ["table"], registry=REGISTRY)

DRIFT_USERS = Gauge(f"{PREFIX}_drift_users",
                    "Users whose OneSignal state differed from what the database implies in the last "
                    "reconcile sample (continuous reconcile in run)", registry=REGISTRY)
DRIFT_CHECKED = Counter(f"{PREFIX}_drift_checked_total", "Users compared with OneSignal by continuous reconcile",
                        registry=REGISTRY)
DRIFT_REPAIRED = Counter(f"{PREFIX}_drift_repaired_total",
                         "Drifted users whose database state was sent again (applied or dead-lettered)",
                         registry=REGISTRY)

# Change-triggered sends (bridge/triggers): status sent | retried | dead_lettered.
MESSAGES = Counter(f"{PREFIX}_messages_total", "Create message requests made by triggers, by outcome",
                   ["trigger", "status"], registry=REGISTRY)
CUSTOM_EVENTS = Counter(f"{PREFIX}_custom_events_total", "Custom events sent by triggers, by outcome",
                        ["trigger", "status"], registry=REGISTRY)
