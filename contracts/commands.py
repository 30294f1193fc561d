"""Commands the edge sends to the processor, and the PSP results the processor sends itself.

Frozen dataclasses with `encode()`/`decode()`; anything that does not decode into one of them
raises CommandDecodeError, and the processor dead-letters it instead of retrying.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from contracts.errors import ParameterInvalid

# Stripe's limit on an object's metadata keys; edge/params.py checks requests against it.
METADATA_MAX_KEYS = 50


class CommandDecodeError(ValueError):
    """A message body that is not a well-formed command."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    TYPE: ClassVar[str] = ""

    account_id: str
    intent_id: str
    request_id: str
    accepted_at: int

    def encode(self) -> bytes:
        return orjson.dumps({"type": self.TYPE, **dataclasses.asdict(self)})

    @property
    def message_id(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientCommand(Command):
    """A command accepted from a client POST, deduplicated by its Idempotency-Key."""

    idempotency_key: str
    fingerprint: str

    @property
    def message_id(self) -> str:
        return client_message_id(self.account_id, self.idempotency_key)


def client_message_id(account_id: str, idempotency_key: str) -> str:
    """The message id of the command a client's POST makes: the same for every retry."""
    # Keys run to 255 characters and AMQP message ids to 255 bytes: a digest fits.
    digest = hashlib.sha256(f"{account_id}\x1f{idempotency_key}".encode())
    return f"cmd_{digest.hexdigest()[:40]}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateIntent(ClientCommand):
    TYPE: ClassVar[str] = "payment_intent.create"

    amount: int
    currency: str
    customer: str | None = None
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    payment_method: str | None = None
    confirm: bool = False
    capture_method: str = "automatic"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfirmIntent(ClientCommand):
    TYPE: ClassVar[str] = "payment_intent.confirm"

    payment_method: str | None = None
    capture_method: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateIntent(ClientCommand):
    """The parameters given, and only those: `changes` maps each to its new value (None
    removes it), `metadata` is params.metadata_changes's {set, unset, clear} or None."""

    TYPE: ClassVar[str] = "payment_intent.update"

    changes: dict[str, str | int | None] = field(default_factory=dict)
    metadata: dict[str, Any] | None = None


def merge_metadata(current: dict[str, str], change: dict[str, Any]) -> dict[str, str]:
    """`current` once an update's metadata change is applied, as Stripe merges it: everything
    removed first when `clear`, then `set` written over and `unset` removed. ParameterInvalid
    when more than METADATA_MAX_KEYS would be left."""
    merged = {} if change["clear"] else dict(current)
    merged.update(change["set"])
    for name in change["unset"]:
        merged.pop(name, None)
    if len(merged) > METADATA_MAX_KEYS:
        raise ParameterInvalid(f"Metadata can have at most {METADATA_MAX_KEYS} keys; this "
                               f"update would leave {len(merged)}.", param="metadata")
    return merged


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelIntent(ClientCommand):
    TYPE: ClassVar[str] = "payment_intent.cancel"

    cancellation_reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptureIntent(ClientCommand):
    TYPE: ClassVar[str] = "payment_intent.capture"

    # None captures everything the authorization holds.
    amount_to_capture: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpireAuthorization(Command):
    """The system's cancel of an intent whose authorization was not captured in time. Its
    message id names the charge, so the sweeper may send it any number of times: it is
    applied once, in order with the client's commands (a later copy finds it canceled)."""

    TYPE: ClassVar[str] = "payment_intent.expire_authorization"

    charge_id: str

    @property
    def message_id(self) -> str:
        return f"{self.charge_id}/expire"


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyPSPResult(Command):
    """The PSP's final answer for one attempt, applied on the intent's partition."""

    TYPE: ClassVar[str] = "payment_intent.psp_result"

    attempt_id: str
    succeeded: bool
    authorization_code: str | None = None
    failure_code: str | None = None
    decline_code: str | None = None
    failure_message: str | None = None
    # False for an authorization only (manual capture); results published before manual
    # capture existed were all captured.
    captured: bool = True

    @property
    def message_id(self) -> str:
        return f"{self.attempt_id}/result"


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyTaskResult(Command):
    """The PSP's final answer for one PSP task (processor/psp_tasks.py)."""

    TYPE: ClassVar[str] = "payment_intent.psp_task_result"

    task_id: str
    succeeded: bool
    failure_message: str | None = None

    @property
    def message_id(self) -> str:
        return f"{self.task_id}/result"


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateRefund(ClientCommand):
    """A refund of the intent's charge, on the intent's partition, so the refunds of one
    intent are applied one after another against what is left to refund."""

    TYPE: ClassVar[str] = "refund.create"

    refund_id: str
    charge_id: str
    # Given, or what the edge saw left to refund: the 202 announced this amount.
    amount: int
    reason: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyRefundResult(Command):
    """The PSP's answer for one refund. `final` is False while the PSP may still fail a refund
    it reported succeeded; it is asked again later."""

    TYPE: ClassVar[str] = "refund.psp_result"

    refund_id: str
    status: str  # succeeded, failed
    failure_reason: str | None = None
    final: bool = True
    # When not final: how soon to ask the PSP again.
    recheck_ms: int = 0

    @property
    def message_id(self) -> str:
        return f"{self.refund_id}/result/{self.status}"


COMMANDS: dict[str, type[Command]] = {
    cls.TYPE: cls for cls in (CreateIntent, ConfirmIntent, ApplyPSPResult, UpdateIntent,
                              CancelIntent, CaptureIntent, ExpireAuthorization, ApplyTaskResult,
                              CreateRefund, ApplyRefundResult)
}


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _matches(k, key_type) and _matches(v, value_type) for k, v in value.items()
        )
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _fields(cls: type[Command]) -> tuple[dict[str, Any], frozenset[str]]:
    return typing.get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls))


# Each command's field types and names, resolved once at import rather than per message:
# resolving type hints costs more than the rest of a decode.
FIELDS = {type_: _fields(cls) for type_, cls in COMMANDS.items()}


def decode(body: bytes) -> Command:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise CommandDecodeError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CommandDecodeError("not a JSON object")
    cls = COMMANDS.get(data.pop("type", None))
    if cls is None:
        raise CommandDecodeError("unknown command type")
    hints, names = FIELDS[cls.TYPE]
    if unknown := set(data) - names:
        raise CommandDecodeError(f"unknown fields {sorted(unknown)}")
    for name, value in data.items():
        if not _matches(value, hints[name]):
            raise CommandDecodeError(f"field {name} has the wrong type")
    try:
        return cls(**data)
    except TypeError as exc:
        raise CommandDecodeError(str(exc)) from None
