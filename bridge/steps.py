"""One request of a user's batch as the dispatcher plans it, and the dead letters for requests
OneSignal refused (what the operator reads in `dlq list`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bridge.coalesce import UserBatch
from bridge.deadletter import DeadLetter
from bridge.onesignal import errors
from bridge.onesignal.client import Request, Response

log = logging.getLogger("bridge.dispatch")

After = Callable[[Response], Awaitable["list[Step] | None"]]


@dataclass(slots=True)
class Step:
    """One request of a batch: sent unless `check` says no; `after` learns from the answer and may
    return requests that must follow it (first in line)."""

    req: Request
    check: Callable[[], Awaitable[bool]] | None = None
    after: After | None = None
    tags_refused: bool = False  # a retry after the tag-limit 400: deletions go too if refused again
    exists_confirmed: bool = False  # an Update user right after a Create user answered 202


def tag_letter(batch: UserBatch, req: Request, exc: errors.TagLimitExceeded,
               dropped: dict[str, Any]) -> DeadLetter:
    """The tags OneSignal refused for its per-user tag limit, as one dead letter naming it."""
    shown = ", ".join(sorted(dropped))
    log.warning("dead-lettered tags %s of user %s: the app allows at most %d tags per user (%s)",
                shown, batch.user, exc.limit, exc.detail)
    return DeadLetter.from_origins(
        batch.origins,
        field=None,
        reason=exc.reason,
        message=(f"user {batch.user}: tags {shown} not applied: OneSignal's tag limit is {exc.limit} tags "
                 f"per user ({exc.detail}); the user's other changes were applied"),
        position=",".join(o.position for o in batch.origins[:4]),
        user=str(batch.user),
        request={"method": req.method, "path": req.path, "body": {"properties": {"tags": dropped}}},
    )


def request_letter(batch: UserBatch, req: Request, exc: errors.OneSignalError) -> DeadLetter:
    positions = ",".join(o.position for o in batch.origins[:4])
    log.warning("dead-lettered %s %s for user %s: %s", req.method, req.endpoint, batch.user, exc)
    return DeadLetter.from_origins(
        batch.origins,
        field=None,
        reason=exc.reason,
        message=f"user {batch.user}: {exc}",
        position=positions,
        user=str(batch.user),
        request={"method": req.method, "path": req.path, "body": req.body},
    )
