"""Logging: one line per event, text or JSON, with every known secret redacted.

Secrets are registered once at start-up (`redact(...)`); the formatter replaces them wherever they
appear in the final line, whatever library logged them and at whatever level.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

_SECRETS: set[str] = set()
_ORDERED: list[str] = []
# `scheme://user:password@host`: libpq ends the credentials at the first `@` (a `/` first means none).
_DSN_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s/]*@")
_KEY_HEADER = re.compile(r"((?:authorization|Authorization)['\"]?\s*[:=,]\s*['\"]?(?:Key|Basic|Bearer)\s+)[^\s'\"]+")
_URL_PREFIXES = ("postgresql://", "postgres://")
_PASSWORD_KEYS = frozenset({"password", "sslpassword"})
# Environment variables libpq reads a password from.
PASSWORD_ENV_VARS = ("PGPASSWORD",)
_LOOSE_PASSWORD = re.compile(r"(?i)\b(?:ssl)?password\s*[:=]\s*('[^']*'|\"[^\"]*\"|[^\s&]+)")


def redact(*secrets: str | None) -> None:
    global _ORDERED
    for s in secrets:
        if s and len(s) >= 4:
            _SECRETS.add(s)
        elif s:  # too short to replace everywhere: at least where libpq quotes it
            _SECRETS.add(f'"{s}"')
    _ORDERED = sorted(_SECRETS, key=len, reverse=True)  # a longer spelling before its substrings


def mask_secrets(text: str, secrets: list[str]) -> str:
    """`text` with each of `secrets` replaced (a short one only where it stands quoted)."""
    for s in sorted(set(secrets), key=len, reverse=True):
        if len(s) >= 4:
            text = text.replace(s, "***")
        elif s:
            text = text.replace(f'"{s}"', '"***"')
    return text


def scrub(text: str) -> str:
    for s in _ORDERED:
        if s in text:
            text = text.replace(s, "***")
    text = _DSN_PASSWORD.sub(r"\1***@", text)
    return _KEY_HEADER.sub(r"\1***", text)


def _spellings(raw: str) -> list[str]:
    """A password as written and percent-decoded (invalid `%` tokens kept as written)."""
    from urllib.parse import unquote

    return list(dict.fromkeys(v for v in (raw, unquote(raw)) if v))


def _url_secrets(dsn: str) -> list[str]:
    rest = dsn.split("://", 1)[1]
    out: list[str] = []
    # libpq: the credentials end at the first `@` met before any `/`; Python's urlsplit takes the
    # last `@` of the authority (which ends at `/`, `?` or `#`). Register both readings.
    libpq_end = re.search(r"[@/]", rest)
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfos = []
    if libpq_end is not None and libpq_end.group() == "@":
        userinfos.append(rest[: libpq_end.start()])
    if "@" in authority:
        userinfos.append(authority.rpartition("@")[0])
    for userinfo in userinfos:
        if ":" in userinfo:
            out += _spellings(userinfo.split(":", 1)[1])
    if "?" in rest:
        for pair in rest.split("?", 1)[1].split("#", 1)[0].split("&"):
            key, _, value = pair.partition("=")
            if key.strip().lower() in _PASSWORD_KEYS and value:
                out += _spellings(value)
    return out


def _read_value(text: str, i: int) -> tuple[str, str, int]:
    """A key=value DSN value at `text[i]`, as libpq reads it: (as written, decoded, end index)."""
    start = i
    decoded = []
    if i < len(text) and text[i] == "'":
        i += 1
        while i < len(text) and text[i] != "'":
            if text[i] == "\\" and i + 1 < len(text):
                i += 1
            decoded.append(text[i])
            i += 1
        i = min(i + 1, len(text))
    else:
        while i < len(text) and not text[i].isspace():
            if text[i] == "\\" and i + 1 < len(text):
                i += 1
            decoded.append(text[i])
            i += 1
    return text[start:i], "".join(decoded), i


def _keyword_secrets(dsn: str) -> list[str]:
    """Passwords in a key=value DSN, also a malformed `password Secret` (no `=`) when everything
    else reads as key=value pairs (so that prose such as "password authentication failed" is
    not taken for a connection string)."""
    well_formed: list[str] = []
    malformed: list[str] = []
    prose = False
    i, n = 0, len(dsn)
    while i < n:
        if dsn[i].isspace():
            i += 1
            continue
        start = i
        while i < n and dsn[i] != "=" and not dsn[i].isspace():
            i += 1
        key = dsn[start:i].lower()
        j = i
        while j < n and dsn[j].isspace():
            j += 1
        if j < n and dsn[j] == "=":
            j += 1
            while j < n and dsn[j].isspace():
                j += 1
            raw, decoded, i = _read_value(dsn, j)
            if key in _PASSWORD_KEYS:
                well_formed += [raw, decoded, raw.strip("'")]
        elif key in _PASSWORD_KEYS and j < n:
            raw, decoded, i = _read_value(dsn, j)
            malformed += [raw, decoded, raw.strip("'")]
        else:
            prose = True
    return [v for v in dict.fromkeys(well_formed + ([] if prose else malformed)) if v]


def dsn_secrets(dsn: str | None) -> list[str]:
    """Every spelling of the password(s) a connection string holds, readable or not by libpq:
    a URL's `user:password@` (as written and percent-decoded, even when the encoding is invalid),
    its `?password=` parameter, and key=value `password=...`, `password = '...'` or the
    malformed `password Secret`."""
    if not dsn:
        return []
    text = dsn.strip()
    found = _url_secrets(text) if text.lower().startswith(_URL_PREFIXES) else _keyword_secrets(text)
    for m in _LOOSE_PASSWORD.finditer(text):  # whatever else reads like `password: x` or `password=x`
        found += _spellings(m.group(1).strip("'\""))
    return list(dict.fromkeys(found))


def redact_dsn_secrets(dsn: str | None) -> None:
    """Register the passwords of a connection string (see `dsn_secrets`)."""
    redact(*dsn_secrets(dsn))


def redact_environment(environ: dict[str, str] | None = None) -> None:
    """Register the passwords libpq would read from the environment (PGPASSWORD)."""
    import os

    env = os.environ if environ is None else environ
    redact(*(env.get(name) for name in PASSWORD_ENV_VARS))


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class _JsonFormatter(logging.Formatter):
    FIELDS = ("table", "key", "position", "user", "endpoint", "status")

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for f in self.FIELDS:
            if hasattr(record, f):
                value = getattr(record, f)
                out[f] = scrub(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        return scrub(orjson.dumps(out, default=str).decode())


_FORCED_LEVEL: str | None = None


def force_level(level: str | None) -> None:
    """A level chosen on the command line (`--log-level`): it wins over a command's own default."""
    global _FORCED_LEVEL
    _FORCED_LEVEL = level


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    level = _FORCED_LEVEL or level
    logging.captureWarnings(True)  # warnings go through the scrubbing formatters too
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level.lower() != "debug":
        for noisy in ("httpx", "httpcore", "aiohttp.access", "hpack"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
