"""JSON-lines logging carrying the ids of what is being handled.

The ids live in context variables, set once where a request or message enters, so every line
logged while handling it carries them: the same request id from edge to processor.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("log_context")


@contextmanager
def bound(**ids: str | None) -> Iterator[None]:
    current = _context.get({})
    token = _context.set({**current, **{k: v for k, v in ids.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_context.get({}),
        }
        line.update({k: v for k, v in getattr(record, "ids", {}).items() if v is not None})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in getattr(record, "ids", {}).items() if v is not None}
        ids = {**_context.get({}), **extra}
        text = super().format(record)
        return f"{text} {' '.join(f'{k}={v}' for k, v in ids.items())}".rstrip()


def setup(fmt: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiormq", "aio_pika", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
