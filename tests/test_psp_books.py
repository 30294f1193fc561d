"""The PSP simulator's books for authorizations: each operation deduped on its own key, an
authorization settled once (a capture of at most what it holds, or a void), a captured
charge reversed once; a refusal records nothing."""

from __future__ import annotations

import uuid

import pytest

from processor.psp import PSPRejected, SimulatedPSP
from tests.conftest import Stack


async def test_capture_void_and_reverse_keep_the_books(shared: Stack) -> None:
    psp = SimulatedPSP(shared.db, shared.settings)
    held, paid = f"auth_{uuid.uuid4()}", f"paid_{uuid.uuid4()}"
    authorized = await psp.charge(held, amount=1000, currency="usd",
                                  payment_method="pm_card_visa", capture=False)
    assert (authorized.succeeded, authorized.captured) == (True, False)
    # The same key asking to capture at once is another request.
    with pytest.raises(PSPRejected):
        await psp.charge(held, amount=1000, currency="usd", payment_method="pm_card_visa")

    capture = f"cap_{uuid.uuid4()}"
    with pytest.raises(PSPRejected, match="holds 1000"):
        await psp.operate(capture, kind="capture", authorization_key=held, amount=1001)
    with pytest.raises(PSPRejected, match="nothing of the charge was captured"):
        await psp.operate(f"rev_{uuid.uuid4()}", kind="reverse", authorization_key=held,
                          amount=1000)
    assert (await psp.operate(capture, kind="capture", authorization_key=held,
                              amount=700)).succeeded
    # A retry with the key is answered again; another capture or a void is refused.
    assert (await psp.operate(capture, kind="capture", authorization_key=held,
                              amount=700)).succeeded
    with pytest.raises(PSPRejected, match="different parameters"):
        await psp.operate(capture, kind="capture", authorization_key=held, amount=600)
    for kind in ("capture", "void"):
        with pytest.raises(PSPRejected, match="already settled by a capture"):
            await psp.operate(f"{kind}_{uuid.uuid4()}", kind=kind, authorization_key=held,
                              amount=300)

    await psp.charge(paid, amount=500, currency="usd", payment_method="pm_card_visa")
    with pytest.raises(PSPRejected, match="not an authorization"):
        await psp.operate(f"void_{uuid.uuid4()}", kind="void", authorization_key=paid,
                          amount=500)
    reverse = f"rev_{uuid.uuid4()}"
    assert (await psp.operate(reverse, kind="reverse", authorization_key=paid,
                              amount=500)).succeeded
    with pytest.raises(PSPRejected, match="already reversed"):
        await psp.operate(f"rev_{uuid.uuid4()}", kind="reverse", authorization_key=paid,
                          amount=500)
    with pytest.raises(PSPRejected, match="another charge"):
        await psp.operate(reverse, kind="reverse", authorization_key=held, amount=700)

    rows = await shared.db.fetch(
        "SELECT charge_key, kind, amount FROM psp.operations WHERE charge_key = ANY($1) "
        "ORDER BY created_at", [held, paid])
    assert [(r["charge_key"], r["kind"], r["amount"]) for r in rows] == [
        (held, "capture", 700), (paid, "reverse", 500)]
