"""Stripe's published OpenAPI schemas (contracts/stripe_schemas.json: PaymentIntent, Charge,
the error and what they reference, from stripe/openapi's spec3 at the commit it names), as
JSON Schema validators for what payonce returns.

The spec is OpenAPI 3.0, whose `nullable: true` JSON Schema lacks; contracts/schemas.py
translates it (for the API's own OpenAPI document too): each schema marked so becomes
`anyOf: [null, the schema]`. `required` and `additionalProperties` stay as published: Stripe's
objects do not forbid extra fields, only maps such as `metadata` constrain their values.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from contracts import schemas
from contracts.schemas import REF

# In the package: the API's OpenAPI document (edge/openapi.py) serves the same schemas.
PATH = Path(__file__).parent.parent / "contracts" / "stripe_schemas.json"


@cache
def document() -> dict[str, Any]:
    return json.loads(PATH.read_text())  # type: ignore[no-any-return]


@cache
def validator(name: str) -> Draft202012Validator:
    # The OpenAPI translation is the one the served document uses (contracts/schemas.py); the
    # schemas keep their place under components/schemas, where their $refs point.
    root = {"$ref": f"{REF}{name}", "components": {"schemas": schemas.stripe()}}
    Draft202012Validator.check_schema(root)
    return Draft202012Validator(root)


def errors(name: str, instance: Any) -> list[str]:
    """Every way `instance` breaks Stripe's schema `name`, as `path: message` lines."""
    found = validator(name).iter_errors(instance)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                  for e in found)


def check(name: str, instance: Any) -> None:
    problems = errors(name, instance)
    assert not problems, f"not a Stripe {name}:\n  " + "\n  ".join(problems[:20])


def check_object(instance: Any) -> None:
    """Validate an API object by its `object` field, when it is one Stripe's schemas here
    describe."""
    if isinstance(instance, dict) and instance.get("object") in ("payment_intent", "charge",
                                                                   "refund"):
        check(instance["object"], instance)


def fixture_fields(name: str) -> set[str]:
    """The top-level fields Stripe returns today for `name` (from its fixtures)."""
    return set(document()["current_fixture_fields"][name])
