"""PaymentIntent routes past creation and confirmation: update, capture, cancel.

Each is accepted as a command (202 with the intent as the command will leave it, from
`current_view`, so every command already accepted counts), through the same pipeline as a
confirm (edge/accept.py). What the transition table forbids in the state the client can see
is refused here, at once; the processor checks it again when it applies the command, since
another command may have changed the state meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from contracts.commands import (
    CancelIntent,
    CaptureIntent,
    ClientCommand,
    UpdateIntent,
    merge_metadata,
)
from contracts.errors import capture_too_large
from contracts.transitions import Action, next_status, state
from edge import params
from edge.accept import Outcome, accept, applied_before, idempotent
from edge.idempotency import check_key, fingerprint
from edge.intents import current_view, read_intent, unknown_intent
from edge.keys import ACCOUNT_ID, REQUEST_ID
from edge.settle import waited
from ops.logs import bound

routes = web.RouteTableDef()

# (the intent as the client sees it, the command's common fields) -> (command, projection)
Plan = Callable[[dict[str, Any], dict[str, Any]], tuple[ClientCommand, dict[str, Any]]]


async def _accept_for_intent(request: web.Request, path: str, values: dict[str, Any],
                             plan: Plan, *, may_wait: bool = False) -> web.Response:
    """Claim the key, refuse what the current state forbids (`plan` raises), publish; with
    `may_wait`, answer the outcome when the client prefers to wait for it (edge/settle.py)."""
    intent_id = request.match_info["id"]
    key = check_key(request.headers.get("Idempotency-Key"))
    fp = fingerprint("POST", path, values)

    async def execute() -> Outcome:
        replay = await applied_before(request, key, fp)
        if replay is not None:
            return replay
        current, _, _ = await current_view(request, intent_id)
        if current is None:
            raise await unknown_intent(request, intent_id)
        common = {"account_id": request[ACCOUNT_ID], "intent_id": intent_id,
                  "request_id": request[REQUEST_ID], "accepted_at": int(time.time()),
                  "idempotency_key": key, "fingerprint": fp}
        command, projected = plan(current, common)
        accepted = await accept(request, command, projected)
        if not may_wait:
            return accepted
        return await waited(request, intent_id, accepted, lambda: read_intent(request, intent_id))

    with bound(intent=intent_id):
        return await idempotent(request, key, fp, execute)


@routes.post("/v1/payment_intents/{id}")
async def update_intent(request: web.Request) -> web.Response:
    values = params.update_intent(await params.read_params(request))

    def plan(current: dict[str, Any], common: dict[str, Any]
             ) -> tuple[ClientCommand, dict[str, Any]]:
        at = state(current)
        changes = values["changes"]
        projected = {**current, **changes}
        for name in changes:
            if name == "payment_method":
                projected["status"] = next_status(Action.ATTACH, at, param=name).value
            elif name == "description":
                next_status(Action.ANNOTATE, at, param=name)
            else:
                next_status(Action.UPDATE, at, param=name)
        if "amount" in changes or "currency" in changes:
            params.charge_amount(projected["amount"], projected["currency"], "amount")
        if values["metadata"] is not None:
            next_status(Action.ANNOTATE, at, param="metadata")
            projected["metadata"] = merge_metadata(current["metadata"], values["metadata"])
        return UpdateIntent(**common, **values), projected

    path = f"/v1/payment_intents/{request.match_info['id']}"
    return await _accept_for_intent(request, path, values, plan)


@routes.post("/v1/payment_intents/{id}/capture")
async def capture_intent(request: web.Request) -> web.Response:
    values = params.capture_intent(await params.read_params(request))

    def plan(current: dict[str, Any], common: dict[str, Any]
             ) -> tuple[ClientCommand, dict[str, Any]]:
        status = next_status(Action.CAPTURE, state(current))
        capturable = current["amount_capturable"]
        amount = values["amount_to_capture"]
        if amount is not None:
            if amount > capturable:
                raise capture_too_large(amount, capturable)
            params.charge_amount(amount, current["currency"], "amount_to_capture")
        # Processing while the PSP captures; still holding the authorization until it did.
        return CaptureIntent(**common, **values), {**current, "status": status.value}

    path = f"/v1/payment_intents/{request.match_info['id']}/capture"
    return await _accept_for_intent(request, path, values, plan, may_wait=True)


@routes.post("/v1/payment_intents/{id}/cancel")
async def cancel_intent(request: web.Request) -> web.Response:
    values = params.cancel_intent(await params.read_params(request))

    def plan(current: dict[str, Any], common: dict[str, Any]
             ) -> tuple[ClientCommand, dict[str, Any]]:
        status = next_status(Action.CANCEL, state(current))
        projected = {**current, "status": status.value, "amount_capturable": 0,
                     "canceled_at": common["accepted_at"],
                     "cancellation_reason": values["cancellation_reason"]}
        return CancelIntent(**common, **values), projected

    path = f"/v1/payment_intents/{request.match_info['id']}/cancel"
    return await _accept_for_intent(request, path, values, plan)

