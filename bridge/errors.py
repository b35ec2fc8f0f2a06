"""Error types, each with a `retriable` flag and a message written for the operator.

```
BridgeError
 ├── ConfigError          the configuration file is wrong           (never retriable)
 ├── SourceError          the source database or broker failed      (retriable)
 │    └── SourceSetupError  publication/slot/privileges missing     (not retriable)
 └── onesignal.errors.OneSignalError   an API call failed (see there)
```
"""

from __future__ import annotations


class BridgeError(Exception):
    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ConfigError(BridgeError):
    retriable = False


class SourceError(BridgeError):
    retriable = True


class SourceSetupError(SourceError):
    retriable = False
