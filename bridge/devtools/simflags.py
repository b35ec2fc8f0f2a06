"""The simulator's command-line flags, without importing the server (the CLI builds its parser
from these on every invocation; `simsettings.py` reads them with `settings_from_args`)."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's flags (also used by `onesignal-bridge simulator`)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--api-key", default=os.environ.get("ONESIGNAL_API_KEY") or None,
                        help="required API key (default: $ONESIGNAL_API_KEY; unset: accept any)")
    parser.add_argument("--app-id", default=None,
                        help="only this app id; another one is answered 403 like a mismatched key (default: any)")
    parser.add_argument("--app-rate-per-s", type=int, default=1000)
    parser.add_argument("--user-interval-s", type=float, default=1.0)
    parser.add_argument("--request-log-size", type=int, default=100_000, metavar="N",
                        help="requests kept for GET /_simulator/requests (benchmarks keep a whole run)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--strict", dest="preset", action="store_const", const="strict",
                      help="OneSignal's less convenient reading of every point (the default): "
                           "--replication-lag-ms 2000 --max-tags 10 --create-properties ignore "
                           "--wrong-key-status 403 --basic-auth refuse --rate-limit-body real "
                           "--omit-retry-after-every 2 --view-rate-per-s 1 --subscription-overflow evict "
                           "--notification-types separate --resent-subscription keep")
    mode.add_argument("--lenient", dest="preset", action="store_const", const="lenient",
                      help="the kinder behaviour of earlier versions: --replication-lag-ms 0 --max-tags 0 "
                           "--create-properties merge --wrong-key-status 401 --basic-auth accept "
                           "--rate-limit-body structured --omit-retry-after-every 0 --view-rate-per-s 10 "
                           "--subscription-overflow refuse --notification-types derived "
                           "--resent-subscription update")
    parser.set_defaults(preset="strict")
    parser.add_argument("--create-properties", choices=["ignore", "merge"], default=None,
                        help="Create user on an existing user: ignore its properties, or merge them")
    parser.add_argument("--replication-lag-ms", type=float, default=None, metavar="N",
                        help="for N ms after a user is created, requests by alias answer 404")
    parser.add_argument("--max-tags", type=int, default=None, metavar="N", help="tags per user (0: no limit)")
    parser.add_argument("--wrong-key-status", type=int, choices=[403, 401], default=None)
    parser.add_argument("--basic-auth", choices=["refuse", "accept"], default=None)
    parser.add_argument("--rate-limit-body", choices=["real", "structured"], default=None)
    parser.add_argument("--omit-retry-after-every", type=int, default=None, metavar="N",
                        help="every Nth 429 has no Retry-After header (0: never)")
    parser.add_argument("--view-rate-per-s", type=float, default=None)
    parser.add_argument("--subscription-overflow", choices=["evict", "refuse"], default=None)
    parser.add_argument("--notification-types", choices=["separate", "derived"], default=None)
    parser.add_argument("--resent-subscription", choices=["keep", "update"], default=None)
