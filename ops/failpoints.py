"""Named crash points for fault-injection tests.

`PAYONCE_FAILPOINTS=edge.after_publish` makes the process exit abruptly (as `kill -9` would)
when it reaches that point, so tests can crash a process at the exact step they are about.
Unset in production: `hit()` is then a set lookup.
"""

from __future__ import annotations

import os

_ARMED = frozenset(filter(None, os.environ.get("PAYONCE_FAILPOINTS", "").split(",")))


def hit(name: str) -> None:
    if name in _ARMED:
        os._exit(137)
