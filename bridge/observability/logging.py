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
_DSN_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]*@")
_KEY_HEADER = re.compile(r"((?:authorization|Authorization)['\"]?\s*[:=,]\s*['\"]?(?:Key|Basic|Bearer)\s+)[^\s'\"]+")


def redact(*secrets: str | None) -> None:
    for s in secrets:
        if s and len(s) >= 4:
            _SECRETS.add(s)


def scrub(text: str) -> str:
    for s in _SECRETS:
        if s in text:
            text = text.replace(s, "***")
    text = _DSN_PASSWORD.sub(r"\1***@", text)
    return _KEY_HEADER.sub(r"\1***", text)


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
            "msg": record.getMessage(),
        }
        for f in self.FIELDS:
            if hasattr(record, f):
                out[f] = getattr(record, f)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return scrub(orjson.dumps(out, default=str).decode())


def setup_logging(level: str = "info", fmt: str = "text") -> None:
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
