"""Schemathesis hooks for payonce's OpenAPI document (SCHEMATHESIS_HOOKS=tests.schemathesis_hooks,
as tests/test_openapi.py runs it): requests encoded as Stripe's libraries encode them, which
OpenAPI's serialization styles cannot say.

- Form bodies: nested hashes as `metadata[key]=v`, lists always indexed (`enabled_events[0]=…`),
  booleans `true`/`false`. Schemathesis would send a hash or a list as one value.
- Query strings: lists indexed the same way (`types[0]=…`); schemathesis sends `types=a&types=b`
  for a list, which payonce, like Stripe, reads as the same parameter twice.
- One more check: a request made of documented parameters is never refused for naming a
  parameter the API does not take (a document that lists a parameter its endpoint dropped).
- Every POST gets an Idempotency-Key of its own, so that each generated request runs rather
  than replaying (or clashing with) another one's answer; the generated keys would often repeat.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlencode

import schemathesis


def _flat(name: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in _flat(f"{name}[{key}]", item)]
    if isinstance(value, list):
        return [pair for i, item in enumerate(value) for pair in _flat(f"{name}[{i}]", item)]
    if isinstance(value, bool):
        return [(name, "true" if value else "false")]
    if value is None:
        return [(name, "")]
    return [(name, str(value))]


def stripe_form(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    if not isinstance(body, dict):
        # Not an object at all (negative cases): sent as its text, for the API to refuse.
        return str(body).encode()
    pairs = [pair for name, value in body.items() for pair in _flat(name, value)]
    return urlencode(pairs, safe="[]").encode()


@schemathesis.serializer("application/x-www-form-urlencoded")
def form_serializer(ctx: schemathesis.SerializationContext, value: Any) -> bytes | None:
    return None if value is None else stripe_form(value)


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case[Any],
                kwargs: dict[str, Any]) -> None:
    if isinstance(case.query, dict):
        query: dict[str, Any] = {}
        for name, value in case.query.items():
            if isinstance(value, list):
                query.update({f"{name}[{i}]": item for i, item in enumerate(value)})
            else:
                query[name] = value
        case.query = query


@schemathesis.hook
def map_headers(context: schemathesis.HookContext, headers: dict[str, Any] | None
                ) -> dict[str, Any] | None:
    if headers and "Idempotency-Key" in headers:
        headers = {**headers, "Idempotency-Key": str(uuid.uuid4())}
    return headers


@schemathesis.check
def documented_parameters_are_known(ctx: schemathesis.CheckContext,
                                    response: schemathesis.Response,
                                    case: schemathesis.Case[Any]) -> bool | None:
    if response.status_code != 400 or case.meta is None \
            or not case.meta.generation.mode.is_positive:
        return None
    error = response.json().get("error", {})
    if error.get("code") == "parameter_unknown":
        raise AssertionError(f"{error.get('param')} is in the document, but {case.method} "
                             f"{case.path} does not take it")
    return None
