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


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfirmIntent(ClientCommand):
    TYPE: ClassVar[str] = "payment_intent.confirm"

    payment_method: str | None = None


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

    @property
    def message_id(self) -> str:
        return f"{self.attempt_id}/result"


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
    cls.TYPE: cls for cls in (CreateIntent, ConfirmIntent, ApplyPSPResult, CreateRefund,
                              ApplyRefundResult)
}


def _matches(value: Any, hint: Any) -> bool:
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
