"""Reading what OneSignal holds, within what OneSignal allows.

- `ViewReader`: View user (`GET /apps/{app_id}/users/by/{label}/{id}`), the complete user
  (properties, every alias, every subscription with its id), limited by OneSignal to about one
  request per second per app: a token bucket keeps below it (`reconcile.view_requests_per_second`),
  429s wait `Retry-After` (without the header: 1 s doubling, at most 60 s). 3,600 users an hour.
- `export_csv` / `parse_export`: OneSignal's CSV export (`POST /players/csv_export?app_id=...`,
  documentation.onesignal.com/reference/csv-export): one request; OneSignal answers a
  `csv_file_url` at once and writes the gzip file behind it (about 2,000 records per second); the
  URL answers 404 (older docs: 403) until the file is there, and stays valid 3 days. One row per
  *subscription*, so a user with no subscription is not in it; the columns carry tags,
  `language`, `timezone_id`, `country` and each subscription (`device_type` 11 email, 14 SMS,
  `identifier` the address, `invalid_identifier`/`notification_types` the opt-in), but no custom
  alias and none of `lat`, `long`, `first_active`, `last_active`. `EXPORT_COVERS` names what an
  export row can be compared on; the rest needs View user.

Both give the View user shape (`{"properties": {...}, "identity": {...}, "subscriptions": [...]}`)
so one comparison serves both.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import logging
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from bridge.events import UserRef
from bridge.onesignal import errors
from bridge.onesignal.client import OneSignalClient, requests
from bridge.onesignal.ratelimit import TokenBucket

log = logging.getLogger("bridge.reconcile")

VIEW_MARGIN = 1.05  # stay this much below the configured View rate (the server's clock is not ours)
RATE_LIMIT_CAP_S = 60.0
EXPORT_FIELDS = ["external_user_id", "notification_types", "country", "timezone_id"]
EXPORT_COVERS = frozenset({"tags", "language", "timezone_id", "country", "subscriptions"})
DEVICE_TYPES = {11: "Email", 14: "SMS"}  # the player model's device_type of email and SMS records


class ViewReader:
    """View user, never faster than `rate` per second (one at a time)."""

    def __init__(self, client: OneSignalClient, rate: float, retries: int = 8) -> None:
        self.client = client
        self.bucket = TokenBucket(rate / VIEW_MARGIN, burst=1.0)
        self.retries = retries
        self.requests = 0
        self._rng = random.Random()

    async def get(self, user: UserRef) -> dict[str, Any] | None:
        """The user as OneSignal holds it; None when OneSignal answers 404 (no such user)."""
        attempt = 0
        while True:
            await self.bucket.acquire()
            self.requests += 1
            try:
                resp = await self.client.send(requests.view_user(user.label, user.id))
            except errors.NotFound:
                return None
            except errors.RateLimited as exc:
                wait = exc.retry_after if exc.retry_after_given else min(RATE_LIMIT_CAP_S, 2.0 ** attempt)
            except errors.OneSignalError as exc:
                if not exc.retriable or attempt >= self.retries:
                    raise
                wait = self._rng.uniform(0.5, min(30.0, 2.0 ** attempt))
                log.info("View user %s failed (%s); retried in %.1fs", user, exc, wait)
            else:
                return resp.body if isinstance(resp.body, dict) else {}
            attempt += 1
            await asyncio.sleep(wait)


async def export_csv(http: httpx.AsyncClient, app_id: str, api_key: str, timeout_s: float = 3600.0,
                     poll_s: float = 2.0) -> Path:
    """Ask OneSignal for its CSV export and download the file when it is ready; returns the path
    of the gzip file (in a temporary directory the caller removes with the file's parent)."""
    endpoint = "POST /players/csv_export"
    try:
        resp = await http.post("/players/csv_export", params={"app_id": app_id},
                               headers={"authorization": f"Key {api_key}"}, json={"extra_fields": EXPORT_FIELDS})
    except httpx.HTTPError as exc:
        raise errors.from_exception(exc, endpoint) from None
    if resp.status_code != 200:
        raise errors.from_response(resp, endpoint, secret=api_key)
    body = errors.parse_body(resp.content)
    url = body.get("csv_file_url") if isinstance(body, dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise errors.Rejected(f"OneSignal answered {endpoint} without a csv_file_url: {str(body)[:200]}",
                              endpoint=endpoint)
    log.info("OneSignal is writing the CSV export; polling %s", url.split("?")[0])
    target = Path(tempfile.mkdtemp(prefix="onesignal-export-")) / "export.csv.gz"
    deadline = time.monotonic() + timeout_s
    wait = poll_s
    # The file is on a storage host, not the API: no Authorization header goes there.
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=True) as plain:
        while True:
            async with plain.stream("GET", url) as file:
                if file.status_code == 200:
                    with target.open("wb") as out:
                        async for chunk in file.aiter_bytes():
                            out.write(chunk)
                    return target
                if file.status_code not in (403, 404):
                    raise errors.ServerError(f"downloading OneSignal's CSV export answered {file.status_code}",
                                             status=file.status_code, endpoint="GET csv_file_url")
            if time.monotonic() + wait > deadline:
                raise errors.TransportError(f"OneSignal's CSV export was not ready within {timeout_s:.0f}s "
                                            f"(--export-timeout)", endpoint="GET csv_file_url")
            await asyncio.sleep(wait)
            wait = min(30.0, wait * 1.5)


def _enabled(row: dict[str, str]) -> bool:
    if (row.get("invalid_identifier") or "").strip().lower() in ("t", "true", "1"):
        return False
    types = (row.get("notification_types") or "").strip()
    try:
        return not types or int(float(types)) > 0
    except ValueError:
        return True


def parse_export(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(external_id, user in the View user shape) for every row of an export that names one;
    several rows of one user (one per subscription) come out as several items: `merge_rows`."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            ext = (row.get("external_user_id") or "").strip()
            if not ext:
                continue
            try:
                tags = orjson.loads(row["tags"]) if row.get("tags") else {}
            except orjson.JSONDecodeError:
                tags = {}
            props: dict[str, Any] = {"tags": tags if isinstance(tags, dict) else {}}
            for key in ("language", "timezone_id", "country"):
                if row.get(key):
                    props[key] = row[key]
            subs = []
            try:
                kind = DEVICE_TYPES.get(int(row.get("device_type") or -1))
            except ValueError:
                kind = None
            if kind is not None and row.get("identifier"):
                subs.append({"id": row.get("id"), "type": kind, "token": row["identifier"],
                             "enabled": _enabled(row)})
            yield ext, {"properties": props, "identity": {"external_id": ext}, "subscriptions": subs}


def merge_rows(users: list[dict[str, Any]]) -> dict[str, Any]:
    """One user from its export rows: tags and properties of the first, every subscription."""
    first = users[0]
    subs = [s for u in users for s in u.get("subscriptions", [])]
    return {"properties": first["properties"], "identity": first["identity"], "subscriptions": subs}
