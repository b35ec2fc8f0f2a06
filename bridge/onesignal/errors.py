"""OneSignal API errors, mapped once from HTTP statuses and transport exceptions.

```
OneSignalError (retriable flag, status, endpoint)
 ├── RateLimited        429: wait at least `retry_after` seconds          retriable
 ├── ServerError        5xx                                              retriable
 ├── TransportError     timeout, connection refused/reset                retriable
 ├── ReplicationLag     404 for a user created moments ago (the caller    retriable
 │                      decides: see `onesignal.consistency_window_s`)
 ├── AuthError          401/403: the API key or app id is wrong           fatal: stop consuming
 ├── NotFound           404: the alias resolves to no user/subscription   handled by the caller
 ├── Conflict           409: alias held by another user, 20-subscription cap  dead letter
 └── Rejected           400/422 and other 4xx: OneSignal refuses the body     dead letter
      └── TagLimitExceeded  400 "App is limited to a maximum of N tags on a given player"
```
Messages never contain the API key: only status, endpoint and OneSignal's own error text.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import orjson

from bridge.errors import BridgeError


class OneSignalError(BridgeError):
    retriable = False

    def __init__(self, message: str, *, status: int | None = None, endpoint: str = "",
                 detail: str = "", body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.endpoint = endpoint
        self.detail = detail
        self.body = body

    @property
    def reason(self) -> str:
        """Short machine-friendly reason for metrics and dead letters."""
        return type(self).__name__.lower() if self.status is None else f"http_{self.status}"


class RateLimited(OneSignalError):
    """`retry_after`: the header's seconds, or 1.0 when OneSignal sent none (`retry_after_given`
    False: the caller backs off by attempt instead, as OneSignal's SDK helper does)."""

    retriable = True

    def __init__(self, message: str, *, retry_after: float = 1.0, retry_after_given: bool = True,
                 **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after
        self.retry_after_given = retry_after_given


class ServerError(OneSignalError):
    retriable = True


class TransportError(OneSignalError):
    retriable = True

    @property
    def reason(self) -> str:
        return "timeout" if "timed out" in str(self) else "connection"


class ReplicationLag(OneSignalError):
    """A 404 about a user created (or first seen) so recently that OneSignal's replicas may not
    know it yet: not an answer, retried with backoff."""

    retriable = True

    @property
    def reason(self) -> str:
        return "replication_lag"


class AuthError(OneSignalError):
    retriable = False


class NotFound(OneSignalError):
    retriable = False


class Conflict(OneSignalError):
    retriable = False

    @property
    def conflicting_aliases(self) -> dict[str, str]:
        for err in _structured(self.body):
            meta = err.get("meta") or {}
            if isinstance(meta.get("conflicting_aliases"), dict):
                return dict(meta["conflicting_aliases"])
        return {}


class Rejected(OneSignalError):
    retriable = False


_TAG_LIMIT = re.compile(r"limited to a maximum of (\d+) tags", re.IGNORECASE)


class TagLimitExceeded(Rejected):
    """400: the write would leave the user over the app's per-user tag limit; nothing in it was
    applied. `limit` is the number OneSignal named."""

    def __init__(self, message: str, *, limit: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.limit = limit

    @property
    def reason(self) -> str:
        return "tag_limit"


def _structured(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        return [e for e in body["errors"] if isinstance(e, dict)]
    return []


def error_text(body: Any, raw: bytes = b"") -> str:
    """OneSignal's own words from any documented error body shape (or the raw text)."""
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list):
            parts = []
            for e in errors:
                if isinstance(e, dict):
                    parts.append(": ".join(str(x) for x in (e.get("code"), e.get("title")) if x))
                else:
                    parts.append(str(e))
            return "; ".join(p for p in parts if p)[:500]
        if isinstance(errors, str):
            return errors[:500]
        if isinstance(errors, dict):  # e.g. {"invalid_aliases": {...}}
            return "; ".join(
                f"{k}: {v if isinstance(v, str) else orjson.dumps(v, default=str).decode()}"
                for k, v in sorted(errors.items(), key=lambda kv: str(kv[0]))
            )[:500]
    if isinstance(body, str):
        return body[:200]
    return raw[:200].decode("utf-8", "replace").strip()


def parse_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


def from_response(resp: httpx.Response, endpoint: str, *, secret: str = "") -> OneSignalError:
    """The typed error for a non-2xx answer. `secret` (the API key) is blanked out of the body
    first: a server or proxy that echoes the Authorization header must not put it in a log."""
    raw = resp.content
    if secret:
        raw = raw.replace(secret.encode(), b"***")
    body = parse_body(raw)
    detail = error_text(body, raw)
    status = resp.status_code
    msg = f"OneSignal answered {status} to {endpoint}" + (f": {detail}" if detail else "")
    kw: dict[str, Any] = {"status": status, "endpoint": endpoint, "detail": detail, "body": body}
    if status == 429:
        header = resp.headers.get("retry-after")
        return RateLimited(msg, retry_after=_retry_after(header), retry_after_given=bool(header), **kw)
    if status in (401, 403):
        return AuthError(
            msg + " (check onesignal.app_id and onesignal.api_key: the key must be the app's REST API key)",
            **kw,
        )
    if status == 404:
        return NotFound(msg, **kw)
    if status == 409:
        return Conflict(msg, **kw)
    if status >= 500:
        return ServerError(msg, **kw)
    limited = _TAG_LIMIT.search(detail) if status == 400 else None
    if limited is not None:
        return TagLimitExceeded(msg, limit=int(limited.group(1)), **kw)
    return Rejected(msg, **kw)


RETRY_AFTER_CAP_S = 300.0  # a bogus Retry-After must not park a user (and the watermark) for ever


def _retry_after(value: str | None) -> float:
    try:
        wait = max(1.0, float(value)) if value else 1.0
        return wait if wait == wait and wait <= RETRY_AFTER_CAP_S else RETRY_AFTER_CAP_S
    except ValueError:
        return 1.0


def from_exception(exc: httpx.HTTPError, endpoint: str) -> TransportError:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection failed"
    return TransportError(f"OneSignal request {kind} ({endpoint}): {type(exc).__name__}", endpoint=endpoint)
