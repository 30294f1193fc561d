"""Named crash points for fault-injection tests.

`PAYONCE_FAILPOINTS=edge.after_publish` makes the process exit abruptly (as `kill -9` would)
when it reaches that point, so tests can crash a process at the exact step they are about.
`NAME=VALUE` arms a point only for what it is handling when that is VALUE (e.g.
`processor.apply=poison` crashes on the commands whose description is "poison").
Unset in production: `hit()` is then a dict lookup.
"""

from __future__ import annotations

import os

_ARMED: dict[str, str | None] = {
    name: value or None
    for name, _, value in (
        entry.partition("=")
        for entry in os.environ.get("PAYONCE_FAILPOINTS", "").split(",") if entry
    )
}


def hit(name: str, subject: str | None = None) -> None:
    if name in _ARMED and _ARMED[name] in (None, subject):
        os._exit(137)
