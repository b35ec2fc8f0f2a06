"""Error types, each with a `retriable` flag and a message written for the operator; and
`describe_failure`, which turns any exception into one actionable line for the command line.

```
BridgeError
 ├── ConfigError          the configuration file is wrong           (never retriable)
 ├── SourceError          the source database or broker failed      (retriable)
 │    ├── SourceSetupError  publication/slot/privileges missing     (not retriable)
 │    ├── KafkaConsumerError  the Kafka consumer thread ended       (as librdkafka says)
 │    └── LeadershipLost  another replica leads now: abandon, rebuild (retriable)
 └── onesignal.errors.OneSignalError   an API call failed (see there)
```
"""

from __future__ import annotations


class BridgeError(Exception):
    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ConfigError(BridgeError):
    retriable = False


class SourceError(BridgeError):
    retriable = True


class SourceSetupError(SourceError):
    retriable = False


class KafkaConsumerError(SourceError):
    """The thread that owns the Kafka consumer ended (a fatal librdkafka error, a subscription the
    broker or librdkafka refused...): the `kafka` source stops and the process exits non-zero, to be
    restarted; nothing that was not applied has been committed. `retriable` as librdkafka says (a
    refused topic pattern is not; a fatal broker error may clear on a restart)."""

    retriable = True


class LeadershipLost(SourceError):
    """This replica led (it held the leader lock), its lock's session ended, and another replica
    holds the lock now. What this replica still held for OneSignal (queued changes, retries) is
    older than what the new leader applies: the runner abandons it (nothing of it is sent or
    confirmed; the new leader re-reads it from the database) and starts over as a standby.
    See `bridge.lease`."""

    retriable = True


# -- one line per failure, for the command line -------------------------------------------------

# (text in libpq's message, what to do): the first match wins.
_CONNINFO_HINTS = (
    ("percent-encoded", "percent-encode the password's special characters in source.dsn (% as %25, @ as %40, "
                        "/ as %2F, : as %3A), or write it as key=value with password='...'"),
    ("forbidden value %00", "remove the %00 from source.dsn"),
    ('missing "="', "write source.dsn as key=value pairs (password='...', quoted when it holds spaces) "
                    "or as a postgresql:// URL"),
    ("unterminated quoted string", "close the quote in source.dsn (a quote inside a value is written \\')"),
    ("invalid connection option", "remove or correct the unknown option in source.dsn "
                                  "(https://www.postgresql.org/docs/current/libpq-connect.html)"),
)
_CONNINFO_DEFAULT = ("correct source.dsn "
                     "(https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING)")
_CONNECT_HINTS = (
    ("password authentication failed",
     "check the user and password in source.dsn (or PGPASSWORD, ~/.pgpass)"),
    ("no password supplied", "add the password to source.dsn (or set PGPASSWORD)"),
    ("pg_hba.conf", "allow this client and user in the server's pg_hba.conf, or connect as another user"),
    ('database "', "check the database name in source.dsn"),
    ('role "', "check the user name in source.dsn"),
    ("could not translate host name", "check the host name in source.dsn"),
    ("timeout expired", "check that the server is reachable from here (host, port, firewall)"),
    ("connection refused", "check the host and port in source.dsn and that Postgres is up"),
    ("ssl", "check sslmode and the certificates in source.dsn"),
)
_CONNECT_DEFAULT = "check source.dsn (host, port, database, user, password) and that the server is up"
_SQLSTATE_HINTS = {
    "42P01": "run `onesignal-bridge setup --config {config}` to create the bridge's tables",
    "3F000": "run `onesignal-bridge setup --config {config}` to create the bridge's schema",
    "42704": "run `onesignal-bridge setup --config {config}`",
    "42501": "grant the missing privilege (`onesignal-bridge check --config {config}` names it; "
             "see sql/role-postgres-source.sql)",
    "55006": "another session (a running bridge?) is using it: stop that first",
    "42710": "it exists already: `onesignal-bridge check --config {config}` shows the state",
    "53300": "the server has no connection slot left: close other sessions or raise max_connections",
    "57P01": "the server is shutting down: run again when it is back",
}


def one_line(text: str, limit: int = 800) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _first_hint(text: str, hints: tuple[tuple[str, str], ...], default: str) -> str:
    low = text.lower()
    return next((hint for needle, hint in hints if needle.lower() in low), default)


def dsn_unparseable(dsn: str | None) -> bool:
    """True when libpq cannot read the connection string at all (a configuration error)."""
    if dsn is None:
        return False
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except ProgrammingError:
        return True
    return False


def connection_hint(message: str, dsn: str | None) -> str:
    """What to do about a failed connection, from libpq's message."""
    if dsn_unparseable(dsn):
        return _first_hint(message, _CONNINFO_HINTS, _CONNINFO_DEFAULT)
    return _first_hint(message, _CONNECT_HINTS, _CONNECT_DEFAULT)


def describe_failure(exc: BaseException, *, dsn: str | None = None, base_url: str | None = None,
                     config_path: str | None = None) -> tuple[str, int]:
    """`<what failed>: <message>; <what to do>` for any exception, on one line, and the exit code
    (2 for the configuration, else 1). The caller scrubs the line: the message may quote a password
    that libpq could not parse."""
    import httpx
    import psycopg

    from bridge.config import redact_dsn

    config = config_path or "FILE"
    check = f"run `onesignal-bridge check --config {config}` for a diagnosis"
    if isinstance(exc, BridgeError):
        return str(exc), 2 if isinstance(exc, ConfigError) else 1
    if isinstance(exc, psycopg.Error):
        text = str(exc).strip() or type(exc).__name__
        sqlstate = getattr(exc, "sqlstate", None)
        where = f" at {redact_dsn(dsn)}" if dsn is not None else ""
        if sqlstate is None and isinstance(exc, psycopg.ProgrammingError) and dsn_unparseable(dsn):
            return (f"source.dsn is not a valid connection string: {one_line(text)}; "
                    f"{connection_hint(text, dsn)}"), 2
        if sqlstate is None and isinstance(exc, psycopg.OperationalError) and (
                text.startswith("connection failed") or "connection to server" in text):
            detail = one_line(text.removeprefix("connection failed: "))
            return f"cannot connect to Postgres{where}: {detail}; {connection_hint(text, dsn)}", 1
        if sqlstate is None:
            return (f"lost the connection to Postgres{where}: {one_line(text)}; "
                    f"run again, and if it repeats {check}"), 1
        primary = exc.diag.message_primary or text.splitlines()[0]
        hint = _SQLSTATE_HINTS.get(sqlstate, check).format(config=config)
        return f"Postgres refused a statement (SQLSTATE {sqlstate}): {one_line(primary)}; {hint}", 1
    if isinstance(exc, httpx.HTTPError):
        return (f"cannot reach OneSignal at {base_url or 'onesignal.base_url'}: {type(exc).__name__}: "
                f"{one_line(str(exc))}; check onesignal.base_url and the network path to it"), 1
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc) or type(exc).__name__
        on = f" ({exc.filename})" if exc.filename else ""
        return (f"operating system error: {one_line(what)}{on}; "
                "check the path, its permissions and free space, and the network"), 1
    return (f"unexpected error: {type(exc).__name__}: {one_line(str(exc))}; "
            "run again with --log-level debug for the traceback and report it"), 1
