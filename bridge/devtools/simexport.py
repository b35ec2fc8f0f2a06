"""The simulator's CSV export: `POST /players/csv_export?app_id=...` and the file behind the URL it
answers, in OneSignal's export columns (documentation.onesignal.com/reference/csv-export).

- The request needs the app's key (`Authorization: Key ...`) and `app_id` in the query; the body
  may ask for `extra_fields` (`external_user_id`, `notification_types`, `location`, `country`,
  `rooted`, `ip`, `web_auth`, `web_p256`, `timezone_id`); another field is a 400.
- The answer is `{"csv_file_url": ...}` at once; the file is the users as they were at the
  request, one row per subscription (a user without subscriptions has no row, as in OneSignal's
  export of subscriptions), gzip-compressed. Like OneSignal's storage, the URL answers 404 with an
  S3 `NoSuchKey` body until the file is "generated" (at 2,000 records per second, after at least
  `MIN_DELAY_S`) and needs no key.
- Default columns: `id` (subscription id), `identifier` (token), `session_count`, `language`,
  `timezone` (seconds from UTC, from `timezone_id`), `game_version`, `device_os`, `device_type`
  (0 iOS, 1 Android, 2 Fire OS, 4 Chrome extension, 5 Chrome, 6 Windows, 7 Safari, 8 Firefox,
  9 macOS, 11 email, 13 Huawei, 14 SMS), `device_model`, `ad_id`, `tags` (JSON), `last_active`,
  `playtime`, `amount_spent`, `created_at`, `invalid_identifier` (`t` unsubscribed, `f`
  subscribed), `badge_count`; then the extra fields asked for, in the order asked.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import hashlib
import io
import time
import uuid
import zoneinfo
from typing import Any

import orjson
from aiohttp import web

COLUMNS = ["id", "identifier", "session_count", "language", "timezone", "game_version", "device_os", "device_type",
           "device_model", "ad_id", "tags", "last_active", "playtime", "amount_spent", "created_at",
           "invalid_identifier", "badge_count"]
EXTRA_FIELDS = ("external_user_id", "notification_types", "location", "country", "rooted", "ip", "web_auth",
                "web_p256", "timezone_id")
DEVICE_TYPES = {"iOSPush": 0, "AndroidPush": 1, "FireOSPush": 2, "ChromeExtensionPush": 4, "ChromePush": 5,
                "WindowsPush": 6, "SafariLegacyPush": 7, "SafariPush": 7, "FirefoxPush": 8, "macOSPush": 9,
                "Email": 11, "HuaweiPush": 13, "SMS": 14}
RECORDS_PER_S = 2000.0
MIN_DELAY_S = 0.5
KEEP_S = 3 * 86400  # "accessible via the URL for 3 days"
NO_SUCH_KEY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
               b"<Message>The specified key does not exist.</Message></Error>")
EXPORTS_KEY = web.AppKey("onesignal_simulator_exports", dict)


def _offset(tz: Any) -> str:
    if not isinstance(tz, str) or not tz:
        return ""
    try:
        offset = dt.datetime.now(zoneinfo.ZoneInfo(tz)).utcoffset()
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return ""
    return str(int(offset.total_seconds())) if offset is not None else ""


def _when(seconds: Any) -> str:
    if isinstance(seconds, (int, float)) and seconds > 1e9:  # unix seconds (the model's clock may not be)
        return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return ""


def _spent(purchases: Any) -> str:
    total = 0.0
    for p in purchases if isinstance(purchases, list) else []:
        try:
            total += float(p.get("amount", 0)) * int(p.get("count", 1))
        except (TypeError, ValueError, AttributeError):
            continue
    return f"{total:.2f}"


def rows(state: Any, extra: list[str]) -> list[list[str]]:
    """One row per subscription of every user in `state` (a `SimState`)."""
    out = []
    for user in state.users.values():
        props = user.properties
        tags = orjson.dumps(props.get("tags") or {}).decode()
        lat, long = props.get("lat"), props.get("long")
        for sid in user.subscription_ids:
            sub = state.subscriptions[sid]
            row = [sub.id, sub.token or "", str(user.session_count), str(props.get("language") or ""),
                   _offset(props.get("timezone_id")), "", "", str(DEVICE_TYPES.get(sub.type, "")), "", "", tags,
                   _when(props.get("last_active")), str(user.session_time), _spent(props.get("purchases")),
                   _when(props.get("first_active")), "f" if sub.enabled else "t", "0"]
            values = {
                "external_user_id": user.identity.get("external_id", ""),
                "notification_types": str(sub.notification_types),
                "location": f"{lat},{long}" if lat is not None and long is not None else "",
                "country": str(props.get("country") or ""),
                "rooted": "", "ip": str(props.get("ip") or ""), "web_auth": "", "web_p256": "",
                "timezone_id": str(props.get("timezone_id") or ""),
            }
            out.append(row + [values[f] for f in extra])
    return out


def csv_gz(state: Any, extra: list[str]) -> tuple[bytes, int]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS + extra)
    body = rows(state, extra)
    writer.writerows(body)
    return gzip.compress(buf.getvalue().encode("utf-8")), len(body)


def _json(body: Any, status: int) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def register(app: web.Application, sim: Any) -> None:
    """Add the export's two routes to the simulator's application (`sim`: its `Simulator`)."""
    exports: dict[str, tuple[float, str, bytes]] = {}  # path -> (ready at, name, file)
    app[EXPORTS_KEY] = exports

    async def start(request: web.Request) -> web.Response:
        from bridge.devtools.simulator import ACCESS_DENIED

        if not sim._authorized(request):  # the simulator's own key check (Key <key>, constant time)
            return _json({"errors": [ACCESS_DENIED]}, 403)
        app_id = request.query.get("app_id")
        if not app_id:
            return _json({"errors": ["app_id is required in the query string"], "success": False}, 400)
        if sim.app_id is not None and app_id != sim.app_id:
            return _json({"errors": [ACCESS_DENIED]}, 403)
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            return _json({"errors": ["the request body is not valid JSON"], "success": False}, 400)
        extra = body.get("extra_fields", []) if isinstance(body, dict) else None
        if not isinstance(extra, list) or any(f not in EXTRA_FIELDS for f in extra):
            return _json({"errors": [f"extra_fields must be a list of {', '.join(EXTRA_FIELDS)}"],
                          "success": False}, 400)
        now = time.time()
        for key in [k for k, (ready, _, _) in exports.items() if ready + KEEP_S < now]:
            del exports[key]
        data, count = csv_gz(sim.state, list(dict.fromkeys(extra)))
        token = hashlib.md5(app_id.encode()).hexdigest()  # noqa: S324 - a file name, not security
        name = f"users_{token}_{dt.date.today().isoformat()}.csv.gz"
        path = f"/csv_exports/{uuid.uuid4()}/{name}"
        exports[path] = (now + max(MIN_DELAY_S, count / RECORDS_PER_S), name, data)
        return _json({"csv_file_url": f"{request.scheme}://{request.host}{path}"}, 200)

    async def download(request: web.Request) -> web.Response:
        found = exports.get(request.path)
        if found is None or time.time() < found[0]:
            return web.Response(body=NO_SUCH_KEY, status=404, content_type="application/xml")
        _, name, data = found
        return web.Response(body=data, content_type="application/gzip",
                            headers={"Content-Disposition": f'attachment; filename="{name}"'})

    app.router.add_post("/players/csv_export", start)
    app.router.add_get("/csv_exports/{export_id}/{name}", download, allow_head=False)
