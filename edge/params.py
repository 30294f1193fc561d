"""Request parameters: Stripe's form encoding (`metadata[order]=42`, `expand[0]=x`) or JSON,
parsed into one nested structure and validated per endpoint into canonical values.

Canonical values are what the request fingerprint is computed over, so the same parameters
sent as a form or as JSON are the same request. The form parser makes hashes only: whether
`x[0]=a` is a list or a hash with the key "0" (a metadata key, say) is for the endpoint's
schema to say, and `list_of` reads Stripe's indexed lists back into lists.

Every field validator is a `Validator`: the check and the JSON Schema of the values it takes.
edge/openapi.py builds the API's OpenAPI document from those schemas and the endpoints'
specs below, so the document describes exactly what is validated here.

Bodies are UTF-8 only, as at Stripe. Text in any other charset can decode to strings UTF-8
cannot hold (lone surrogates, from utf-7 for one), which would then fail in the fingerprint,
the command's encoding or Postgres rather than here with a 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from contracts import commands, currencies, webhooks
from contracts.enums import CancellationReason, CaptureMethod
from contracts.errors import (
    InvalidRequest,
    ParameterInvalid,
    ParameterMissing,
    ParameterUnknown,
    PayloadTooLarge,
    UnexpectedState,
)
from contracts.webhook_urls import MAX_URL_LENGTH, WebhookURLError, check_url

MAX_AMOUNT = 99_999_999
METADATA_MAX_KEYS = commands.METADATA_MAX_KEYS
METADATA_KEY_MAX = 40
METADATA_VALUE_MAX = 500

_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_INTEGER = re.compile(r"-?[0-9]+")
_UTF8 = frozenset({"utf-8", "utf8"})
_PAYMENT_METHOD = re.compile(r"pm_[0-9A-Za-z_]{1,200}")
# Postgres text and jsonb cannot hold U+0000: refused here rather than failing in the processor.
_NUL_MESSAGE = "Invalid {}: text parameters cannot contain the NUL character."
_NO_NUL = "^[^\\u0000]*$"

T = TypeVar("T")


def parse_form(body: str, lists: Collection[str] = (), what: str = "request body"
               ) -> dict[str, Any]:
    """`a[b][c]=v` into {"a": {"b": {"c": "v"}}}, `a[0]=x` into {"a": {"0": "x"}}.

    `a[]=x&a[]=y` into {"a": ["x", "y"]}, for the list parameters named in `lists` only: it is
    how curl users send lists, as Stripe's own examples do. Anywhere else empty brackets are
    an error, so a hash such as metadata never turns into a list by accident.

    Percent-escapes must decode as UTF-8: `%ff`, or a surrogate encoded as bytes, is refused."""
    try:
        pairs = parse_qsl(body, keep_blank_values=True, strict_parsing=bool(body), errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest(f"The {what} has percent-escapes that are not valid UTF-8.") \
            from None
    except ValueError:
        raise InvalidRequest(f"The {what} is not valid form encoding.") from None
    root: dict[str, Any] = {}
    for name, value in pairs:
        match = _KEY.match(name)
        if match is None:
            raise InvalidRequest(f"Invalid parameter name: {name}.", param=name)
        if match[2] == "[]" and match[1] in lists:
            items = root.setdefault(match[1], [])
            if not isinstance(items, list):
                raise InvalidRequest(f"Invalid array: {name} mixed with {match[1]} in another "
                                     "form.", param=name)
            items.append(value)
            continue
        path = [match[1], *re.findall(r"\[([^\[\]]*)\]", match[2])]
        node = root
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if part == "":
                raise InvalidRequest(f"Invalid array syntax in {name}; use {path[0]}[0].",
                                     param=name)
            if last:
                if part in node:
                    raise InvalidRequest(f"Received the parameter {name} twice.", param=name)
                node[part] = value
            else:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise InvalidRequest(f"Invalid hash: {name}.", param=name)
                node = child
    return root


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object; orjson refuses bytes that are not UTF-8 and `\\ud800`-style escapes of
    lone surrogates."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc.msg}.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The JSON request body must be an object.")
    return data


async def read_params(request: web.Request, lists: Collection[str] = ()) -> dict[str, Any]:
    """The request body's parameters; `lists` as in `parse_form`."""
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.client_max_size
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.") from None
    except web.RequestPayloadError:  # e.g. a Content-Encoding the body does not match
        raise InvalidRequest("The request body could not be read or decoded.") from None
    if not body.strip():
        return {}
    ctype = request.content_type
    if ctype not in ("application/json", "application/x-www-form-urlencoded"):
        raise InvalidRequest(
            f"Unsupported Content-Type {ctype[:100]!r}: send application/x-www-form-urlencoded "
            "or application/json.", code="invalid_content_type")
    charset = request.charset
    if charset is not None and charset.lower() not in _UTF8:
        raise InvalidRequest(
            f"Unsupported charset {charset[:40]!r}: send the request body as UTF-8, with "
            "charset=utf-8 or no charset at all.")
    if ctype == "application/json":
        return parse_json(body)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8.") from None
    return parse_form(text, lists)


def read_query(request: web.Request, lists: Collection[str] = ()) -> dict[str, Any]:
    """A GET's parameters, from its query string in the same encoding as a form body (Stripe's
    libraries send `created[gte]=…` and `types[0]=…` there)."""
    return parse_form(request.rel_url.raw_query_string, lists, what="query string")


# ---- field validators: (raw value, param name) -> canonical value --------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Validator(Generic[T]):
    """A field validator: `check(raw value, param name)` gives the canonical value or raises a
    ParameterInvalid; `schema` is the JSON Schema (2020-12, as OpenAPI 3.1 takes it) of the
    values it accepts, in their JSON form. In a form body every value is text: integers and
    booleans are their decimal and `true`/`false` spellings there, and a JSON body may spell
    them that way too."""

    check: Callable[[Any, str], T]
    schema: Mapping[str, Any]

    def __call__(self, value: Any, param: str) -> T:
        return self.check(value, param)


def accepts(schema: Mapping[str, Any]) -> Callable[[Callable[[Any, str], T]], Validator[T]]:
    """Make a function a `Validator` with this schema."""

    def wrap(check: Callable[[Any, str], T]) -> Validator[T]:
        return Validator(check, schema)

    return wrap


def _integer(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ParameterInvalid(f"Invalid integer: {value!r}.", code="parameter_invalid_integer",
                               param=param)
    if isinstance(value, str):
        if not _INTEGER.fullmatch(value):
            raise ParameterInvalid(f"Invalid integer: {value[:50]}.",
                                   code="parameter_invalid_integer", param=param)
        try:
            return int(value)
        except ValueError:  # over Python's 4300-digit limit on int(str)
            raise ParameterInvalid(f"Invalid integer: {value[:50]}… is too long.",
                                   code="parameter_invalid_integer", param=param) from None
    return value


@accepts({"type": "integer", "maximum": MAX_AMOUNT})
def amount(value: Any, param: str) -> int:
    """An integer amount up to Stripe's eight digits; its minimum depends on the currency
    (`charge_amount`)."""
    number = _integer(value, param)
    if number > MAX_AMOUNT:
        raise ParameterInvalid(f"Amount must be no more than {MAX_AMOUNT:,} in the currency's "
                               "smallest unit.", code="amount_too_large", param=param)
    return number


@accepts({"type": "string", "enum": sorted(currencies.CURRENCIES),
          "description": "Lowercase in answers; any case is accepted."})
def currency(value: Any, param: str) -> str:
    code = value.lower() if isinstance(value, str) else None
    if code not in currencies.CURRENCIES:
        raise ParameterInvalid(f"Invalid currency: {str(value)[:20]}. payonce supports the "
                               "currencies Stripe does: "
                               f"{', '.join(sorted(currencies.CURRENCIES))}.", param=param)
    return code


def charge_amount(number: int, code: str, param: str) -> None:
    """Stripe's rules for an amount to charge in a currency: at least its minimum charge, and
    a multiple of what the currency can be charged in."""
    minimum = currencies.MINIMUMS[code]
    if number < minimum:
        raise ParameterInvalid(
            f"Amount must be at least {currencies.display(minimum, code)} "
            f"({minimum} in the currency's smallest unit).", code="amount_too_small", param=param)
    if code in currencies.HUNDREDTHS_ONLY and number % 100:
        raise ParameterInvalid(
            f"Invalid amount. Currency {code.upper()} has become effectively zero-decimal and "
            "charged amounts must be evenly divisible by 100.",
            code="invalid_charge_amount_no_decimal_compatible", param=param)
    if code in currencies.THREE_DECIMAL and number % 10:
        low = number - number % 10
        raise ParameterInvalid(
            f"Invalid amount. Amounts in {code} must end in 0, as cards are charged in tens of "
            f"its smallest unit: {number} could be {low} or {low + 10}.",
            code="invalid_charge_amount", param=param)


def string(max_length: int) -> Validator[str]:
    @accepts({"type": "string", "maxLength": max_length, "pattern": _NO_NUL})
    def check(value: Any, param: str) -> str:
        if not isinstance(value, str):
            raise ParameterInvalid(f"Invalid string: {param} must be a string.", param=param)
        if "\x00" in value:
            raise ParameterInvalid(_NUL_MESSAGE.format(param), param=param)
        if len(value) > max_length:
            raise ParameterInvalid(f"{param} must be at most {max_length} characters.",
                                   param=param)
        return value

    return check


@accepts({"type": "boolean"})
def boolean(value: Any, param: str) -> bool:
    if isinstance(value, bool):
        return value is True
    if value in ("true", "false"):
        return bool(value == "true")
    raise ParameterInvalid(f"Invalid boolean: {str(value)[:20]}; use true or false.",
                           code="parameter_invalid_boolean", param=param)


@accepts({"type": "string", "pattern": f"^{_PAYMENT_METHOD.pattern}$",
          "description": "A PaymentMethod id: Stripe's test payment methods decide the outcome."})
def payment_method(value: Any, param: str) -> str:
    if not isinstance(value, str) or not _PAYMENT_METHOD.fullmatch(value):
        raise ParameterInvalid(f"No such PaymentMethod: '{str(value)[:60]}'.",
                               code="resource_missing", param=param)
    return value


def list_of(check: Validator[Any], max_items: int) -> Validator[list[Any]]:
    """A list parameter, from a JSON array or Stripe's indexed form encoding: `expand[0]=a&
    expand[1]=b` parses as {"0": "a", "1": "b"}, read back in index order. Indexes run from 0
    without gaps, as Stripe's libraries send them."""

    @accepts({"type": "array", "items": check.schema, "maxItems": max_items})
    def check_list(value: Any, param: str) -> list[Any]:
        if isinstance(value, dict):
            if set(value) != {str(i) for i in range(len(value))}:
                raise ParameterInvalid(f"Invalid array: {param} takes {param}[0], {param}[1], "
                                       "… in order.", param=param)
            value = [value[str(i)] for i in range(len(value))]
        if not isinstance(value, list):
            raise ParameterInvalid(f"Invalid array: {param} must be a list.", param=param)
        if len(value) > max_items:
            raise ParameterInvalid(f"{param} can have at most {max_items} items.", param=param)
        return [check(item, f"{param}[{i}]") for i, item in enumerate(value)]

    return check_list


# Stripe's own spec describes metadata this way: a hash, or "" to unset it.
_METADATA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "propertyNames": {"minLength": 1, "maxLength": METADATA_KEY_MAX, "pattern": _NO_NUL},
    "additionalProperties": {
        "anyOf": [{"type": "string", "maxLength": METADATA_VALUE_MAX, "pattern": _NO_NUL},
                  {"type": "number"}],
    },
}


@accepts({
    "anyOf": [{**_METADATA_SCHEMA, "maxProperties": METADATA_MAX_KEYS}, {"const": ""}],
    "description": f"Up to {METADATA_MAX_KEYS} keys of up to {METADATA_KEY_MAX} characters, "
                   f"values of up to {METADATA_VALUE_MAX}; a key with an empty value is left "
                   "out.",
})
def metadata(value: Any, param: str) -> dict[str, str]:
    if value == "":
        return {}
    if not isinstance(value, dict):
        raise ParameterInvalid("Invalid metadata: it must be a hash of keys to strings.",
                               param=param)
    result: dict[str, str] = {}
    for key, item in value.items():
        name = f"{param}[{key}]"
        if not isinstance(item, str | int | float) or isinstance(item, bool):
            raise ParameterInvalid(f"Invalid value for {name}: metadata values are strings.",
                                   param=name)
        if not key:
            raise ParameterInvalid("Metadata keys cannot be empty.", param=name)
        if len(key) > METADATA_KEY_MAX:
            raise ParameterInvalid(f"Metadata keys can be at most {METADATA_KEY_MAX} characters.",
                                   param=name)
        text = str(item)
        if len(text) > METADATA_VALUE_MAX:
            raise ParameterInvalid(
                f"Metadata values can be at most {METADATA_VALUE_MAX} characters.", param=name)
        if "\x00" in key or "\x00" in text:
            raise ParameterInvalid(_NUL_MESSAGE.format(name), param=name)
        if text:
            result[key] = text
    if len(result) > METADATA_MAX_KEYS:
        raise ParameterInvalid(f"Metadata can have at most {METADATA_MAX_KEYS} keys.", param=param)
    return result


@accepts({
    "anyOf": [_METADATA_SCHEMA, {"const": ""}],
    "description": "Merged into the object's metadata: a key with an empty value is removed, "
                   f"an empty metadata removes every key; at most {METADATA_MAX_KEYS} keys "
                   "once merged.",
})
def metadata_changes(value: Any, param: str) -> dict[str, Any]:
    """Metadata to merge into an object's, as Stripe's updates do: `{"set": {…}, "unset": […],
    "clear": bool}`. A key sent with an empty value is removed, an empty `metadata` removes
    every key, and the keys not named are kept."""
    if value == "":
        return {"set": {}, "unset": [], "clear": True}
    kept = metadata(value, param)
    # metadata() has checked every value; the empty ones are the keys to remove.
    unset = sorted(key for key, item in value.items() if str(item) == "")
    return {"set": kept, "unset": unset, "clear": False}


def bounded_integer(low: int, high: int) -> Validator[int]:
    @accepts({"type": "integer", "minimum": low, "maximum": high})
    def check(value: Any, param: str) -> int:
        number = _integer(value, param)
        if not low <= number <= high:
            raise ParameterInvalid(f"Invalid {param}: it must be an integer from {low} to "
                                   f"{high}, not {str(number)[:30]}.",
                                   code="parameter_invalid_integer", param=param)
        return number

    return check


RANGE_BOUNDS = ("gt", "gte", "lt", "lte")


@accepts({
    "anyOf": [
        {"type": "integer"},
        {"type": "object", "properties": {bound: {"type": "integer"} for bound in RANGE_BOUNDS},
         "additionalProperties": False},
    ],
    "description": "Unix seconds: that second, or a range of gt, gte, lt and lte.",
})
def timestamp_range(value: Any, param: str) -> dict[str, int]:
    """A filter on a timestamp (unix seconds), as Stripe takes it: `created=1700000000` for that
    second, or any of `created[gt]`, `[gte]`, `[lt]`, `[lte]`. Canonical form: a hash of the
    bounds given, `{"eq": n}` for a plain integer."""
    if not isinstance(value, dict):
        return {"eq": _integer(value, param)}
    for bound in value:
        if bound not in RANGE_BOUNDS:
            raise ParameterUnknown(f"Received unknown parameter: {param}[{bound}]; use "
                                   f"{', '.join(f'{param}[{b}]' for b in RANGE_BOUNDS)}.",
                                   param=f"{param}[{bound}]")
    return {bound: _integer(item, f"{param}[{bound}]") for bound, item in value.items()
            if item != ""}


# Event types are short (`payment_intent.payment_failed`); the limit keeps messages short too.
_EVENT_TYPE = string(100)


@accepts({
    "type": "array", "minItems": 1, "maxItems": 256,
    "items": {"type": "string", "enum": [webhooks.ALL_EVENTS, *sorted(webhooks.SUBSCRIBABLE)]},
})
def enabled_events(value: Any, param: str) -> list[str]:
    """A webhook endpoint's event types: `*` for all, or types payonce emits; every unknown one
    is named in the error. Duplicates are dropped, the order kept."""
    # 256: what the webhook_endpoints table allows (ops/migrations/0005_webhooks.sql).
    types = list_of(_EVENT_TYPE, 256)(value, param)
    if not types:
        raise ParameterInvalid(f"Invalid {param}: name at least one event type, or '*' for all "
                               "of them.", param=param)
    unknown = webhooks.unknown_types(types)
    if unknown:
        named = ", ".join(repr(t) for t in unknown[:10]) + (", …" if len(unknown) > 10 else "")
        raise ParameterInvalid(
            f"Invalid {param}: unknown event type{'s' if len(unknown) > 1 else ''} {named}. "
            f"Use '{webhooks.ALL_EVENTS}' or any of: "
            f"{', '.join(sorted(webhooks.SUBSCRIBABLE))}.", param=param)
    return list(dict.fromkeys(types))


@accepts({
    "type": "string", "format": "uri", "maxLength": MAX_URL_LENGTH,
    # check_url: http or https in any case (urlsplit lowers it), a host, no spaces or controls.
    "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://[^\\s\\x00-\\x1f\\x7f]+$",
})
def webhook_url(value: Any, param: str) -> str:
    """A well-formed http(s) URL. Where it may point (public addresses only, unless settings
    allow private ones) needs DNS and is checked when the endpoint is written."""
    if not isinstance(value, str):
        raise ParameterInvalid(f"Invalid string: {param} must be a string.", param=param)
    try:
        check_url(value)
    except WebhookURLError as exc:
        raise ParameterInvalid(str(exc), code="url_invalid", param=param) from None
    return value


def one_of(values: Collection[str]) -> Validator[str]:
    """One of a fixed set of strings, refused in Stripe's words for an enum parameter."""
    choices = list(values)
    listed = f"{', '.join(choices[:-1])}, or {choices[-1]}" if len(choices) > 1 else choices[0]

    @accepts({"type": "string", "enum": choices})
    def check(value: Any, param: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ParameterInvalid(f"Invalid {param}: must be one of {listed}", param=param)
        return value

    return check


capture_method = one_of([m.value for m in CaptureMethod])
# What a client may give; `automatic` is the system's own, for an expired authorization.
cancellation_reason = one_of([r.value for r in CancellationReason
                              if r is not CancellationReason.AUTOMATIC])


@accepts({"type": "integer", "minimum": 1, "maximum": MAX_AMOUNT})
def positive_amount(value: Any, param: str) -> int:
    number = amount(value, param)
    if number < 1:
        raise ParameterInvalid(f"Invalid {param}: it must be a positive integer.",
                               code="parameter_invalid_integer", param=param)
    return number


@dataclass(frozen=True, slots=True)
class Field:
    check: Validator[Any]
    required: bool = False
    # Whether an empty value (or JSON's null) may be sent for it, meaning "not given"; an
    # update's parameter that cannot be removed refuses one.
    may_be_empty: bool = True


def validate(raw: Mapping[str, Any], spec: Mapping[str, Field]) -> dict[str, Any]:
    """Canonical parameters: every field of `spec`, None where not given.

    An empty string (or JSON's null) unsets an optional parameter, as in Stripe's form
    encoding, unless the field says it may not be empty.
    """
    for name in raw:
        if name not in spec:
            raise ParameterUnknown(f"Received unknown parameter: {name}", param=name)
    result: dict[str, Any] = {}
    for name, field in spec.items():
        value = raw.get(name)
        if value is None or (value == "" and field.check not in EMPTY_IS_A_VALUE):
            if field.required:
                raise ParameterMissing(f"Missing required param: {name}.", param=name)
            if name in raw and not field.may_be_empty:
                raise ParameterInvalid(f"Invalid {name}: it cannot be empty.", param=name)
            result[name] = None
            continue
        result[name] = field.check(value, name)
    return result


# Where an empty string is a value rather than "not given": it removes every key.
EMPTY_IS_A_VALUE = (metadata, metadata_changes)

CREATE_INTENT = {
    "amount": Field(amount, required=True),
    "currency": Field(currency, required=True),
    "customer": Field(string(255)),
    "description": Field(string(1000)),
    "metadata": Field(metadata),
    "payment_method": Field(payment_method),
    "confirm": Field(boolean),
    "capture_method": Field(capture_method),
}

CONFIRM_INTENT = {"payment_method": Field(payment_method),
                  "capture_method": Field(capture_method)}

# Not empty: what an update cannot remove, as an intent always has them (payment_method:
# Stripe's intents keep theirs until another replaces it).
UPDATE_INTENT = {
    "amount": Field(amount, may_be_empty=False),
    "currency": Field(currency, may_be_empty=False),
    "customer": Field(string(255)),
    "description": Field(string(1000)),
    "metadata": Field(metadata_changes),
    "payment_method": Field(payment_method, may_be_empty=False),
    "capture_method": Field(capture_method, may_be_empty=False),
}

CAPTURE_INTENT = {"amount_to_capture": Field(positive_amount)}

CANCEL_INTENT = {"cancellation_reason": Field(cancellation_reason)}


# Parameters added after requests were first fingerprinted: left out of the canonical values
# when not given, so a request retried across the upgrade is still the same request.
_LATER = ("capture_method",)


def _without_later(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in _LATER or v is not None}


def create_intent(raw: Mapping[str, Any]) -> dict[str, Any]:
    params = validate(raw, CREATE_INTENT)
    charge_amount(params["amount"], params["currency"], "amount")
    params["metadata"] = params["metadata"] or {}
    params["confirm"] = bool(params["confirm"])
    if params["confirm"] and params["payment_method"] is None:
        raise UnexpectedState("You cannot confirm this PaymentIntent because it's missing a "
                              "payment method.", param="payment_method")
    return _without_later(params)


def confirm_intent(raw: Mapping[str, Any]) -> dict[str, Any]:
    return _without_later(validate(raw, CONFIRM_INTENT))


def update_intent(raw: Mapping[str, Any]) -> dict[str, Any]:
    """{"changes": {parameter: value} for the parameters given (None removes customer or
    description), "metadata": metadata_changes's form or None}. Whether the intent's status
    allows them, and the amount's minimum in its currency, are for the handler to check."""
    params = validate(raw, UPDATE_INTENT)
    changes = {name: value for name, value in params.items()
               if name in raw and name != "metadata"}
    return {"changes": changes, "metadata": params["metadata"] if "metadata" in raw else None}


def capture_intent(raw: Mapping[str, Any]) -> dict[str, Any]:
    return validate(raw, CAPTURE_INTENT)


def cancel_intent(raw: Mapping[str, Any]) -> dict[str, Any]:
    return validate(raw, CANCEL_INTENT)


CREATE_WEBHOOK_ENDPOINT = {
    "url": Field(webhook_url, required=True),
    "enabled_events": Field(enabled_events, required=True),
    # 5000: the webhook_endpoints table's limit, as Stripe's.
    "description": Field(string(5000)),
    "metadata": Field(metadata),
}

UPDATE_WEBHOOK_ENDPOINT = {
    "url": Field(webhook_url),
    "enabled_events": Field(enabled_events),
    "description": Field(string(5000)),
    "metadata": Field(metadata_changes),
    "disabled": Field(boolean),
}

# Parameters that take `name[]=…` in a form (see parse_form).
WEBHOOK_ENDPOINT_LISTS = ("enabled_events",)


def create_webhook_endpoint(raw: Mapping[str, Any]) -> dict[str, Any]:
    params = validate(raw, CREATE_WEBHOOK_ENDPOINT)
    params["metadata"] = params["metadata"] or {}
    return params


def update_webhook_endpoint(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The changes only: a parameter not sent is left as it is, so the result holds just the
    parameters given. An empty description removes it; url and enabled_events cannot be
    removed, and an empty `disabled` changes nothing."""
    params = validate(raw, UPDATE_WEBHOOK_ENDPOINT)
    for name in ("url", "enabled_events"):
        if raw.get(name) == "":
            raise ParameterInvalid(f"Invalid {name}: it cannot be empty.", param=name)
    return {name: value for name, value in params.items()
            if name in raw and (value is not None or name == "description")}
