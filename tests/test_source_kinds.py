"""The source-kind seam, proved by use: a kind registered from the test suite runs end to end."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from bridge import setup
from bridge.check import run_checks
from bridge.config import parse_config
from bridge.errors import ConfigError
from bridge.events import ChangeEvent, Op
from bridge.runner import run_bridge
from bridge.sources import registry

try:
    from .bridgeproc import API_KEY, APP_ID, Simulator
    from .memsource import MemoryKind
except ImportError:
    from bridgeproc import API_KEY, APP_ID, Simulator  # type: ignore[no-redef]
    from memsource import MemoryKind  # type: ignore[no-redef]


@pytest.fixture
def memory_kind() -> Iterator[MemoryKind]:
    kind = MemoryKind()
    registry.register(kind)
    try:
        yield kind
    finally:
        registry.unregister(kind.name)


def _config(sim_url: str) -> dict:  # type: ignore[type-arg]
    return {
        "onesignal": {"app_id": APP_ID, "api_key": API_KEY, "base_url": sim_url},
        "source": {"kind": "memory"},
        "mappings": [{"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"},
                      "properties": {"timezone_id": "tz"}, "on_delete": "delete_user"}],
        "delivery": {"flush_interval_ms": 20},
        "metrics": {"port": 0, "host": "127.0.0.1"},
    }


def _event(op: Op, uid: str, position: int, **row: object) -> ChangeEvent:
    new = {"id": uid, **row} if op is not Op.DELETE else None
    old = {"id": uid} if op is Op.DELETE else None
    return ChangeEvent("public.users", op, new, old, {"id": uid}, f"memory#{position}")


async def _until(pred, what: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        got = await asyncio.to_thread(pred)
        if got:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_source_kind_registered_from_outside_runs_end_to_end_and_confirms_in_order(
        memory_kind: MemoryKind, sim: Simulator) -> None:
    config = parse_config(_config(sim.base_url), env={})
    stop = asyncio.Event()
    bridge = asyncio.create_task(run_bridge(config, stop))
    await _until(lambda: memory_kind.sources, "the runner to build the source from the registry")
    source = memory_kind.sources[0]
    source.feed(_event(Op.INSERT, "m1", 1, plan="free", tz="Europe/Paris"), 1)
    source.feed(_event(Op.INSERT, "m2", 2, plan="pro", tz="Mars/Olympus_Mons"), 2)  # a bad time zone
    source.feed(_event(Op.UPDATE, "m1", 3, plan="pro", tz="Europe/Paris"), 3)
    source.feed(_event(Op.INSERT, "m3", 4, plan="team", tz=None), 4)
    await _until(lambda: "m3" in sim.by_external_id(), "user m3")
    source.feed(_event(Op.DELETE, "m3", 5), 5)

    def converged() -> bool:
        users = sim.by_external_id()
        return ("m1" in users and users["m1"]["properties"].get("tags") == {"plan": "pro"}
                and "m2" in users and "m3" not in users)

    await _until(converged, "the memory source's changes in the simulator")
    users = sim.by_external_id()
    assert users["m1"]["properties"]["timezone_id"] == "Europe/Paris"
    assert users["m2"]["properties"]["tags"] == {"plan": "pro"}, "the rest of a row with a bad value still syncs"
    assert [d.field for d in memory_kind.letters.letters] == ["tz"], "the bad value is dead-lettered by the kind"
    await _until(lambda: source.confirmed and source.confirmed[-1] == 5, "the last position to be confirmed", 60)
    assert source.confirmed == sorted(source.confirmed), "positions are confirmed in source order"
    stop.set()
    assert await asyncio.wait_for(bridge, 30) == 0


def test_a_registered_kind_is_known_to_every_command(memory_kind: MemoryKind) -> None:
    config = parse_config(_config("http://127.0.0.1:9"), env={})
    assert registry.for_config(config) is memory_kind
    assert setup.statements(config) == [], "no database: nothing for setup to create"
    findings = run_checks(config)
    assert any(f.what == "in-memory source: nothing to check" for f in findings)


def test_an_unknown_kind_lists_every_registered_kind(memory_kind: MemoryKind) -> None:
    tree = _config("http://127.0.0.1:9")
    tree["source"] = {"kind": "carrier-pigeon"}
    with pytest.raises(ConfigError, match="source.kind: expected one of postgres, outbox, kafka, memory"):
        parse_config(tree, env={})
    registry.unregister("memory")
    with pytest.raises(ConfigError, match="expected one of postgres, outbox, kafka$"):
        parse_config(tree, env={})
    registry.register(memory_kind)  # the fixture unregisters it again
