"""The OpenAPI document: valid OpenAPI 3.1, made of the validators' own schemas, describing
exactly the routes the edge serves; its reference page rendered by a real headless Chromium
from payonce's own assets; and schemathesis sending what it describes to a real stack."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from openapi_spec_validator import validate as validate_spec

from contracts import objects, schemas
from contracts.errors import InvalidRequest
from edge import events, intents, lists, openapi, params, reads, refunds, webhook_endpoints
from edge.app import create_app
from edge.params import Field
from tests import browser
from tests.conftest import Client, Stack, form, make_settings
from tests.support import VISA

SPEC_MODULES = (params, lists, events, reads, webhook_endpoints, refunds)


def document() -> dict[str, Any]:
    return openapi.build(make_settings().max_body_bytes)


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    validate_spec(doc)


def test_the_document_is_built_without_the_dev_packages() -> None:
    """The edge serves it at run time, where only the runtime dependencies are installed."""
    import subprocess

    blocked = ("jsonschema", "openapi_spec_validator", "schemathesis", "hypothesis", "pytest")
    code = ("import sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "from edge import openapi\n"
            "assert openapi.build(65536)['paths']\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   cwd=Path(__file__).parent.parent)


def test_it_describes_exactly_the_routes_served_under_v1() -> None:
    app = create_app(make_settings())
    served = {(route.method.lower(), route.resource.canonical)
              for route in app.router.routes()
              if route.resource is not None and route.resource.canonical.startswith("/v1/")
              and route.method != "HEAD"}
    documented = {(op.method, op.path) for op in openapi.OPERATIONS}
    assert documented == served


def spec_fields() -> Iterator[tuple[str, str, Field]]:
    """Every parameter of every spec the edge validates with: the operations' and any
    module-level spec of the modules that define them."""
    for op in openapi.OPERATIONS:
        for where, spec in (("query", op.query), ("body", op.body or {})):
            for name, spec_field in spec.items():
                yield f"{op.method} {op.path} {where}", name, spec_field
    for module in SPEC_MODULES:
        for attr, value in vars(module).items():
            if isinstance(value, Mapping) and value and all(
                    isinstance(v, Field) for v in value.values()):
                for name, spec_field in value.items():
                    yield f"{module.__name__}.{attr}", name, spec_field


def test_every_validator_carries_its_schema() -> None:
    for where, name, spec_field in spec_fields():
        assert isinstance(spec_field.check, params.Validator), (where, name)
        assert spec_field.check.schema, (where, name)
    # A public function that looks like a validator but is not one is a validator without a
    # schema (private helpers such as params._integer are parts of validators).
    for module in SPEC_MODULES:
        for attr, value in vars(module).items():
            if inspect.isfunction(value) and value.__module__ == module.__name__ \
                    and not attr.startswith("_"):
                assert list(inspect.signature(value).parameters) != ["value", "param"], (
                    f"{module.__name__}.{attr} takes (value, param): make it a "
                    "params.Validator with @params.accepts(schema)")


def test_a_validator_without_a_schema_cannot_be_documented() -> None:
    bare = Field(lambda value, param: value)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no schema"):
        openapi.field_schema("bare", bare)


def probes(schema: Mapping[str, Any]) -> Iterator[tuple[Any, bool]]:
    """Values at the limits a schema states, in their JSON form, and whether the schema
    takes each."""
    if "maxLength" in schema:
        n = schema["maxLength"]
        if schema.get("format") == "uri":
            base = "https://example.com/"
            yield base + "a" * (n - len(base)), True
            yield base + "a" * (n + 1 - len(base)), False
        else:
            yield "a" * n, True
            yield "a" * (n + 1), False
            yield "a\x00", False
    if schema.get("type") == "integer":
        if "maximum" in schema:
            yield schema["maximum"], True
            yield schema["maximum"] + 1, False
        if "minimum" in schema:
            yield schema["minimum"], True
            yield schema["minimum"] - 1, False
        yield "1.5", False
    if "enum" in schema:
        for value in schema["enum"]:
            yield value, True
        yield "not-one-of-them", False
    if schema.get("type") == "array":
        item = next(iter(schema["items"].get("enum", ["a"])))
        yield [item] * schema["maxItems"], True
        yield [item] * (schema["maxItems"] + 1), False
        if schema.get("minItems"):
            yield [], False
    if schema.get("type") == "boolean":
        yield True, True
        yield "yes", False


def test_an_empty_value_is_documented_wherever_it_unsets_a_parameter() -> None:
    """params.validate reads "" as "not given" for an optional parameter: its documented
    schema must take "", or a client (and a fuzzer) is told a request it sends is invalid."""
    checked = 0
    for where, name, spec_field in spec_fields():
        if spec_field.required or not spec_field.may_be_empty:
            continue
        validated = params.validate({name: ""}, {name: spec_field})
        assert jsonschema.Draft202012Validator(openapi.field_schema(name, spec_field)).is_valid(
            ""), (where, name, validated)
        checked += 1
    assert checked > 20


def test_the_limits_in_each_schema_are_the_validators() -> None:
    seen = 0
    for where, name, spec_field in spec_fields():
        for value, takes in probes(spec_field.check.schema):
            seen += 1
            try:
                spec_field.check(value, name)
                accepted = True
            except InvalidRequest:
                accepted = False
            assert accepted == takes, (where, name, repr(value)[:80], takes)
    assert seen > 50


def test_metadata_limits() -> None:
    schema = params.metadata.schema["anyOf"][0]
    keys = schema["maxProperties"]
    key_max = schema["propertyNames"]["maxLength"]
    value_max = schema["additionalProperties"]["anyOf"][0]["maxLength"]
    params.metadata({f"k{i}": "v" for i in range(keys)}, "metadata")
    params.metadata({"k" * key_max: "v" * value_max}, "metadata")
    for bad in ({f"k{i}": "v" for i in range(keys + 1)}, {"k" * (key_max + 1): "v"},
                {"k": "v" * (value_max + 1)}, {"": "v"}):
        with pytest.raises(InvalidRequest):
            params.metadata(bad, "metadata")


def test_the_charge_minimums_are_the_ones_enforced() -> None:
    amount = document()["paths"]["/v1/payment_intents"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]["amount"]
    for code, minimum in amount["x-minimum-charge"].items():
        step = amount["x-amount-step"].get(code, 1)
        params.charge_amount(minimum, code, "amount")
        with pytest.raises(InvalidRequest):
            params.charge_amount(minimum - step, code, "amount")
    assert amount["minimum"] == min(amount["x-minimum-charge"].values())


def rendered_samples() -> Iterator[tuple[str, Any]]:
    """payonce's own objects as contracts/objects.py renders them, with and without their
    optional parts."""
    endpoint_id = "we_" + "a" * 24
    endpoint_row: dict[str, Any] = {
        "id": endpoint_id, "created": 1_700_000_000, "description": None,
        "enabled_events": ["*"], "metadata": {}, "status": "enabled",
        "url": "https://example.com/hook"}
    yield "webhook_endpoint", objects.webhook_endpoint(endpoint_row)
    yield "webhook_endpoint", objects.webhook_endpoint(endpoint_row, secret="whsec_x")
    event_row = {"id": "evt_" + "a" * 24, "account_id": "acct_1", "created": 1_700_000_000,
                 "data": objects.webhook_endpoint(endpoint_row),
                 "type": "webhook_endpoint.disabled", "request_id": None, "idempotency_key": None}
    yield "event", objects.event(event_row)
    yield "event", objects.event({**event_row, "previous_attributes": {"status": "enabled"}},
                                 pending_webhooks=2)
    yield "deleted_webhook_endpoint", objects.deleted("webhook_endpoint", endpoint_id)
    attempt_row = {"delivery_id": "whd_" + "a" * 24, "attempt": 3, "created": 1_700_000_000,
                   "error": None, "event_id": event_row["id"], "latency_ms": 12,
                   "next_attempt_at": 1_700_000_300, "state": "pending", "status_code": 500,
                   "endpoint_id": endpoint_row["id"]}
    yield "webhook_delivery_attempt", objects.webhook_delivery_attempt(attempt_row)
    yield "event_list", lists.envelope("/v1/events", [objects.event(event_row)], False)
    intent_row = {"id": "pi_" + "a" * 24, "amount": 2000, "currency": "usd",
                  "status": "succeeded", "created": 1_700_000_000, "customer": "cus_a"}
    yield "payment_intent_list", lists.envelope(
        "/v1/payment_intents", [objects.payment_intent(intent_row, b"secret")], True)
    charge_row = {"id": "ch_" + "a" * 24, "amount": 2000, "amount_captured": 2000,
                  "currency": "usd", "status": "succeeded", "payment_method": VISA,
                  "payment_intent_id": intent_row["id"], "authorization_code": "123456",
                  "created": 1_700_000_000}
    yield "charge_list", lists.envelope("/v1/charges", [objects.charge(charge_row)], False)
    refund_row = {"id": "re_" + "a" * 24, "amount": 500, "charge_id": "ch_" + "a" * 24,
                  "created": 1_700_000_000, "currency": "usd", "metadata": {},
                  "payment_intent_id": "pi_" + "a" * 24, "reason": None, "status": "failed",
                  "failure_reason": "expired_or_canceled_card"}
    yield "refund_list", lists.envelope("/v1/refunds", [objects.refund(refund_row)], True)


def test_payonce_object_schemas_are_what_the_renderers_make() -> None:
    from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

    components = {**schemas.components()}
    for name, instance in rendered_samples():
        root = {"$ref": f"#/$defs/{name}", "$defs": components}
        text = orjson.dumps(root).decode().replace(schemas.REF, "#/$defs/")
        validator = Draft202012Validator(orjson.loads(text))
        problems = [e.message for e in validator.iter_errors(instance)]
        assert not problems, (name, problems)


async def test_the_document_is_served_without_an_api_key(shared: Stack) -> None:
    async with shared.session.get(shared.base_url.rstrip("/") + "/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        served = await resp.json()
    assert served == orjson.loads(orjson.dumps(openapi.build(shared.settings.max_body_bytes)))


@pytest.mark.skipif(browser.CHROMIUM is None, reason="chromium is not installed "
                    "(bash ops/services.sh tools chromium)")
async def test_the_reference_page_lists_every_path(shared: Stack) -> None:
    base = shared.base_url.rstrip("/")
    paths = sorted(document()["paths"])
    script = "document.body ? document.body.innerText : ''"
    async with browser.page(base + "/docs") as tab:
        text = ""
        async with asyncio.timeout(90):
            while not all(path in text for path in paths):
                await asyncio.sleep(0.2)
                text = await tab.evaluate(script) or ""
        title = await tab.evaluate("document.title")
        log = list(tab.log)
        requests, failed = dict(tab.requests), dict(tab.failed)
    assert title == "payonce API reference"
    assert "List the delivery attempts of a webhook endpoint" in text
    # Everything the page loaded came from payonce itself; anything else was never sent.
    foreign = {rid: url for rid, url in requests.items()
               if not url.startswith((base, "data:", "blob:"))}
    assert all(failed.get(rid) == "csp" for rid in foreign), (foreign, failed)
    own = {rid: url for rid, url in requests.items() if rid not in foreign}
    assert {base + "/docs", base + "/openapi.json",
            f"{base}/docs/{openapi_bundle()}"} <= set(own.values()), own
    assert not [url for rid, url in own.items() if rid in failed], failed
    assert not [line for line in log if line.startswith("exception")], log


def openapi_bundle() -> str:
    from edge import docs

    return docs.BUNDLE


# Schemathesis, bounded: each operation gets this many generated cases per phase (its
# boundary-value coverage phase, random fuzzing, and chains of calls along the document's
# links), positive and negative.
MAX_EXAMPLES = 20


async def seed(api: Client) -> dict[str, list[str]]:
    """Objects for the generated requests to find: intents (one paid, one waiting for a payment
    method), the paid one's charge, the events they made, and a webhook endpoint. The
    endpoint's URL is a closed local port: no dispatcher runs on this stack, and none would
    find anything there."""
    paid = await api.create(amount=2000, currency="usd", payment_method=VISA, confirm=True)
    waiting = await api.create(amount=1000, currency="eur")
    assert (paid.status, waiting.status) == (202, 202), (paid.body, waiting.body)
    await api.wait_for(paid.body["id"], ["succeeded"])
    await api.wait_for(waiting.body["id"], ["requires_payment_method"])
    endpoint = await api.post("/v1/webhook_endpoints", data=form({
        "url": "http://127.0.0.1:9/payonce", "enabled_events[0]": "*"}))
    assert endpoint.status == 200, endpoint.body
    listed = await api.get("/v1/events?limit=100")
    assert listed.status == 200 and listed.body["data"], listed.body
    charges = await api.get("/v1/charges")
    assert charges.status == 200 and charges.body["data"], charges.body
    return {"intent": [paid.body["id"], waiting.body["id"]],
            "event": [e["id"] for e in listed.body["data"]][:5],
            "endpoint": [endpoint.body["id"]],
            "charge": [c["id"] for c in charges.body["data"]]}


def schemathesis_config(base_url: str, secret_key: str, ids: dict[str, list[str]]) -> str:
    """schemathesis.toml: every check but positive_data_acceptance (valid-looking requests
    that payonce refuses by design: amounts under a currency's minimum, cursors naming no
    object, both cursors at once) and, for an intent's charge, ensure_resource_availability;
    the seeded ids offered for half the path ids."""
    def binding(name: str) -> str:
        return f'{{ dictionary = "{name}", probability = 0.5 }}'

    by_kind = {"intent": [op.operation_id for op in openapi.OPERATIONS
                          if op.path_id and op.path_id[1] is intents.INTENT_ID],
               "event": [op.operation_id for op in openapi.OPERATIONS
                         if op.path_id and op.path_id[1] is events.EVENT_ID],
               "endpoint": [op.operation_id for op in openapi.OPERATIONS
                            if op.path_id and op.path_id[1] is webhook_endpoints.ENDPOINT_ID],
               "charge": [op.operation_id for op in openapi.OPERATIONS
                          if op.path_id and op.path_id[1] is reads.CHARGE_ID]}
    lines = [
        f"base-url = {json.dumps(base_url)}",
        "workers = 1",
        "[headers]",
        f'Authorization = "Bearer {secret_key}"',
        "[generation]",
        'mode = "all"',
        f"max-examples = {MAX_EXAMPLES}",
        'database = "none"',
        "[checks.positive_data_acceptance]",
        "enabled = false",
    ]
    for kind, values in ids.items():
        lines += [f"[dictionaries.{kind}]", f"values = {json.dumps(values)}"]
    for kind, operation_ids in by_kind.items():
        lines += ["[[operations]]", f"include-operation-id = {json.dumps(operation_ids)}",
                  "[operations.parameters]", f'"path.id" = {binding(kind)}']
        if kind == "event":
            lines.append(f'"body.webhook_endpoint" = {binding("endpoint")}')
    # An intent created without confirm=true has no charge yet: its charge is a 404 by design
    # (documented), which ensure_resource_availability would take for a created resource lost.
    lines += ["[[operations]]", 'include-operation-id = "GetPaymentIntentsIntentCharge"',
              "[operations.checks.ensure_resource_availability]", "enabled = false"]
    return "\n".join(lines) + "\n"


async def test_schemathesis_finds_nothing_wrong(shared: Stack, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Every operation of the document, against the real stack: no 5xx, every status
    documented, every body matching its documented schema, every required header there,
    authentication required, undocumented methods refused."""
    api = await shared.client()
    ids = await seed(api)
    base = shared.base_url.rstrip("/")
    config = tmp_path / "schemathesis.toml"
    config.write_text(schemathesis_config(base, api.secret_key, ids))
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
           "PYTHONPATH": str(Path(__file__).parent.parent), "NO_COLOR": "1"}
    # In its own process: schemathesis sends blocking requests, and this event loop serves
    # them. Its caches go to tmp_path.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
        f"{base}/openapi.json", cwd=tmp_path, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(300):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = output.decode(errors="replace")
    # What a 503 met, first: the end of the output may be all that is kept of a failure.
    failures = [f"{r.getMessage()}: {getattr(r, 'ids', {})}" for r in caplog.records
                if r.getMessage().startswith("dependency")]
    assert proc.returncode == 0, "\n".join([*failures, text[-12000:]])
    operations = len(openapi.OPERATIONS)
    assert re.search(rf"\b{operations} selected / {operations} total", text), text[-5000:]
    assert re.search(rf"Tested: +{operations}\b", text), text[-5000:]
