"""The source kinds, by `source.kind`: the one place that knows which kinds exist.

A kind is a `bridge.ports.SourceKind`. The configuration's `source:` union, the runner, `setup`,
`teardown`, `check`, `backfill` and `dlq` all ask this registry; none of them tests for a kind.

Adding a kind is one module that defines its `SourceKind` (with its pydantic config model) and
one registration: a line in `_BUILTIN` below for a kind shipped with the bridge, or
`register(kind)` from elsewhere (a plug-in, or the test suite's in-memory source). Built-in
kinds are imported on first use, so loading a configuration never imports librdkafka.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from bridge.config import KafkaSourceConfig, OutboxSourceConfig, PostgresSourceConfig, use_source_models
from bridge.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from bridge.config import Config
    from bridge.ports import SourceKind

# name -> (module defining `KIND`, config model). The models are light; the modules are not.
_BUILTIN: dict[str, tuple[str, type[BaseModel]]] = {
    "postgres": ("bridge.sources.postgres_kind", PostgresSourceConfig),
    "outbox": ("bridge.sources.outbox_kind", OutboxSourceConfig),
    "kafka": ("bridge.sources.kafka", KafkaSourceConfig),
}
_loaded: dict[str, SourceKind] = {}
_registered: dict[str, SourceKind] = {}


def names() -> list[str]:
    return [*_BUILTIN, *(n for n in _registered if n not in _BUILTIN)]


def config_models() -> list[type[BaseModel]]:
    return [model for _, model in _BUILTIN.values()] + [
        k.config_model for n, k in _registered.items() if n not in _BUILTIN]


def register(kind: SourceKind) -> None:
    """Make a new kind available: its `source.kind` name parses, and every command finds it."""
    if kind.name in _BUILTIN:
        raise ValueError(f"source kind {kind.name!r} is built in")
    _registered[kind.name] = kind
    use_source_models(config_models(), names())


def unregister(name: str) -> None:
    if _registered.pop(name, None) is not None:
        use_source_models(config_models(), names())


def get(name: str) -> SourceKind:
    if name in _registered:
        return _registered[name]
    if name not in _BUILTIN:
        raise ConfigError(f"source.kind {name!r} is not known; expected one of {', '.join(names())}")
    kind = _loaded.get(name)
    if kind is None:
        module = importlib.import_module(_BUILTIN[name][0])
        kind = _loaded[name] = module.KIND
    return kind


def for_config(config: Config) -> SourceKind:
    return get(config.source.kind)
