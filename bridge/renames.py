"""Renames (issue 15): a row whose identity value changed renames its OneSignal user in place.

The steps a renamed batch starts with, mixed into the `Dispatcher`: Create/update alias on the old
identity (same onesignal_id, subscriptions and properties kept), idempotent across retries and
restarts; a 409 (the new identity belongs to another user) is dead-lettered whole, or with
`on_identity_conflict: merge` the old user's subscriptions move to the other user.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping

from bridge.coalesce import UserBatch
from bridge.deadletter import DeadLetter
from bridge.knownusers import KnownUsers
from bridge.onesignal import errors
from bridge.onesignal.client import Request, Response, requests
from bridge.steps import Step
from bridge.subscriptions import SubscriptionState

log = logging.getLogger("bridge.dispatch")


class RenameConflict(Exception):
    """A rename OneSignal refused (409) that the mapping says to dead-letter: the whole batch."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RenameSteps:
    """The rename steps of the dispatcher (which provides these attributes and `_steps`)."""

    users: KnownUsers
    subscriptions: SubscriptionState
    identity_conflicts: Mapping[str, str]
    clock: Callable[[], float]
    _steps: Callable[[UserBatch], Awaitable[list[Step]]]

    def _rename_steps(self, batch: UserBatch) -> list[Step]:
        """A renamed row: Create/update alias on the old identity first (the same OneSignal user
        keeps its onesignal_id, subscriptions and properties), then the rest of the batch for the
        new identity. Idempotent: the old alias gone and the new one there is a rename done (a
        retry, or a restart before the checkpoint)."""
        old, new = batch.renamed_from, batch.user
        assert old is not None
        rest = dataclasses.replace(batch, renamed_from=None)
        req = requests.rename_user(old.label, old.id, new.id)

        async def done() -> list[Step]:
            self.users.renamed(old, new, self.clock())
            await self.subscriptions.rename_owner(str(old), str(new))
            log.info("renamed OneSignal user %s to %s (same user, subscriptions kept)", old, new)
            return await self._steps(rest)

        async def after_rename(resp: Response) -> list[Step]:
            if resp.status == 409:
                return self._identity_conflict(batch, rest, resp)
            if resp.status != 404:
                return await done()
            view = dataclasses.replace(requests.view_user(new.label, new.id), ok_statuses=frozenset({404}))

            async def after_view(seen: Response) -> list[Step]:
                if seen.status != 404:
                    return await done()  # renamed before (a retry, or a restart before the checkpoint)
                now = self.clock()
                if self.users.young(old, now) or self.users.early(now):
                    raise errors.ReplicationLag(
                        f"OneSignal answered 404 to the rename of {old} to {new} for a user created or first "
                        f"seen moments ago (replication lag)", status=404, endpoint=req.endpoint)
                self.users.forget(old)  # neither exists: the rest of the batch creates the user
                return await self._steps(rest)
            return [Step(view, after=after_view)]
        return [Step(req, after=after_rename)]

    def _identity_conflict(self, batch: UserBatch, rest: UserBatch, resp: Response) -> list[Step]:
        """409: the new identity belongs to another OneSignal user. `on_identity_conflict: merge`
        moves the old user's subscriptions to that user, deletes the emptied old user (only once
        every subscription moved) and applies the change there; otherwise the change is
        dead-lettered naming both users (neither changes)."""
        old, new = batch.renamed_from, batch.user
        assert old is not None
        table = batch.origins[0].table if batch.origins else ""
        if self.identity_conflicts.get(table, "dead_letter") != "merge":
            raise RenameConflict(
                f"identity conflict: row renamed from {old} to {new}, but {new} already belongs to another "
                f"OneSignal user; neither user was changed (merge them by hand, or set "
                f"on_identity_conflict: merge) ({str(resp.body)[:200]})")
        view = requests.view_user(old.label, old.id)

        async def after_view(seen: Response) -> list[Step]:
            body = seen.body if isinstance(seen.body, dict) else {}
            subs = [str(s["id"]) for s in body.get("subscriptions") or [] if isinstance(s, dict) and s.get("id")]
            refused: list[str] = []

            def transfer(sid: str, last: bool) -> Step:
                """Move one subscription; after the last, delete the old user only if every one
                moved (404: gone already). A refused one keeps the old user, and so the
                subscriptions still on it: the change is dead-lettered naming both users."""
                async def after_transfer(resp: Response) -> list[Step]:
                    if resp.status in (400, 409):
                        refused.append(f"{sid} ({resp.status})")
                    if not last:
                        return []
                    if refused:
                        raise RenameConflict(
                            f"identity conflict: row renamed from {old} to {new}, which another OneSignal user "
                            f"holds; on_identity_conflict: merge could not move subscription(s) "
                            f"{', '.join(refused)} to it, so {old} was kept (with them) and the change was not "
                            f"applied; the other subscriptions were moved")
                    return [delete]
                req = dataclasses.replace(requests.transfer_subscription(sid, {new.label: new.id}),
                                          ok_statuses=frozenset({400, 404, 409}))
                return Step(req, after=after_transfer)

            async def after_delete(_resp: Response) -> list[Step]:
                log.warning("merged OneSignal user %s into %s (identity conflict on a rename): %d subscription(s) "
                            "moved, the old user deleted", old, new, len(subs))
                self.users.forget(old)
                await self.subscriptions.rename_owner(str(old), str(new))
                self.users.seen(new, self.clock(), {})
                return await self._steps(rest)
            delete = Step(requests.delete_user(old.label, old.id), after=after_delete)
            if not subs:
                return [delete]
            return [transfer(sid, i == len(subs) - 1) for i, sid in enumerate(subs)]
        return [Step(view, after=after_view)]


def rename_letter(batch: UserBatch, req: Request, message: str) -> DeadLetter:
    log.warning("dead-lettered the change of user %s: %s", batch.user, message)
    return DeadLetter.from_origins(
        batch.origins, field=None, reason="identity_conflict", message=message,
        position=",".join(o.position for o in batch.origins[:4]), user=str(batch.user),
        request={"method": req.method, "path": req.path, "body": req.body},
    )
