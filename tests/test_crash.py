"""Crashes and PSP faults: every accepted intent still reaches its outcome, the PSP sees one
authorization per attempt, and no event is lost.

Processes are killed the hard way (SIGKILL, or a failpoint that `os._exit`s at an exact step)
and started again; the checks then read Postgres, the PSP simulator's books and the events
exchange.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from contracts import ids, topology
from contracts.commands import ApplyPSPResult
from tests.conftest import (
    Client,
    Proc,
    Stack,
    form,
    free_port,
    make_settings,
    stack,
    start_proc,
)
from tests.support import (
    DECLINED,
    VISA,
    Amounts,
    EventTap,
    check_events,
    check_ledger,
    check_outcomes,
    create,
    start_processor,
    unsettled,
    wait_settled,
)


async def test_kill_9_mid_flight_loses_nothing(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    settings = make_settings(psp_latency_ms=(300, 900), psp_timeout_s=1.5, psp_lease_s=2.0,
                             processor_metrics_port=free_port())
    amounts = Amounts(60)
    async with stack(settings, processor=False) as s, EventTap(settings).bound() as tap:
        api = await s.client()
        since = await s.db.fetchval("SELECT now()")
        cards: dict[str, str] = {}

        async def batch(n: int) -> None:
            chosen = [DECLINED if i % 3 == 0 else VISA for i in range(n)]
            made = await asyncio.gather(*(
                create(api, amounts.take(), card, confirm_separately=i % 2 == 1)
                for i, card in enumerate(chosen)))
            cards.update(zip(made, chosen, strict=True))

        proc = await start_processor(settings, procs, tmp_path)
        # First kill while commands are still arriving and being applied.
        creating = asyncio.create_task(batch(40))
        async with asyncio.timeout(20):
            while await s.db.fetchval(
                    "SELECT count(*) FROM payment_intents WHERE account_id = $1",
                    api.account_id) < 10:
                await asyncio.sleep(0.02)
        proc.kill()
        await creating
        # The kill must land mid-flight for this test to mean anything.
        assert await unsettled(s.db, api.account_id, len(cards)) > 0

        # Accepted while no processor runs: queued, applied later.
        await batch(10)
        proc = await start_processor(settings, procs, tmp_path)
        # Second kill while PSP calls are under way, some of them already charged.
        await asyncio.sleep(0.6)
        proc.kill()
        assert await unsettled(s.db, api.account_id, len(cards)) > 0

        await start_processor(settings, procs, tmp_path)
        intents = await wait_settled(s.db, api.account_id, len(cards))
        check_outcomes(intents, cards)
        await check_ledger(s.db, api.account_id, amounts, since, dict.fromkeys(cards, 1))
        await check_events(s.db, api.account_id, cards, tap)


async def pay_into_a_crash(s: Stack, api: Client, procs: list[Proc], tmp_path: Path,
                           amounts: Amounts, failpoint: str) -> tuple[str, Any]:
    """One payment to a processor that exits at `failpoint`: its intent, and its attempt
    (with `leased`) as the crash left it."""
    doomed = await start_processor(s.settings, procs, tmp_path, PAYONCE_FAILPOINTS=failpoint)
    intent_id = await create(api, amounts.take(), VISA, confirm_separately=False)
    assert await doomed.wait_exit(20) == 137
    attempt = await s.db.fetchrow(
        "SELECT *, locked_until > now() AS leased FROM payment_attempts "
        "WHERE payment_intent_id = $1", intent_id)
    return intent_id, attempt


async def test_crash_after_psp_charged_before_recorded(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    settings = make_settings(psp_timeout_s=0.5, psp_lease_s=1.0,
                             processor_metrics_port=free_port())
    amounts = Amounts(1)
    async with stack(settings, processor=False) as s:
        api = await s.client()
        since = await s.db.fetchval("SELECT now()")
        intent_id, attempt = await pay_into_a_crash(s, api, procs, tmp_path, amounts,
                                                    "processor.after_psp_call")
        # The PSP charged; payonce recorded nothing of it.
        assert attempt["result"] is None and attempt["state"] == "pending"
        charged = await s.db.fetchrow("SELECT * FROM psp.charges WHERE idempotency_key = $1",
                                      attempt["psp_key"])
        assert charged is not None and charged["outcome"] == "captured"
        assert (await s.db.fetchval("SELECT status FROM payment_intents WHERE id = $1",
                                    intent_id)) == "processing"

        survivor = await start_processor(settings, procs, tmp_path)
        intents = await wait_settled(s.db, api.account_id, 1, within_s=30)
        check_outcomes(intents, {intent_id: VISA})
        attempts = await check_ledger(s.db, api.account_id, amounts, since, {intent_id: 1})
        # The answer recorded is the first charge's: the retry was deduped by the PSP key.
        assert attempts[0]["authorization_code"] == charged["authorization_code"]
        assert "psp replayed a charge" in survivor.log()


@pytest.mark.parametrize("failpoint, reports", [
    # Published: applied at once, though the lease and the report timeout are far longer than
    # the test.
    ("processor.after_result_published", 0),
    # Stored and not published: only the sweep can report it, after the report timeout.
    ("processor.after_result_stored", 1),
])
async def test_crash_after_the_result_is_stored(
    migrated: None, procs: list[Proc], tmp_path: Path, failpoint: str, reports: int
) -> None:
    timeouts = ({"psp_lease_s": 50.0, "psp_report_timeout_s": 100.0} if reports == 0 else
                {"psp_timeout_s": 0.5, "psp_lease_s": 1.0, "psp_report_timeout_s": 2.0})
    settings = make_settings(**timeouts, processor_metrics_port=free_port())
    amounts = Amounts(1)
    async with stack(settings, processor=False) as s:
        api = await s.client()
        since = await s.db.fetchval("SELECT now()")
        intent_id, attempt = await pay_into_a_crash(s, api, procs, tmp_path, amounts, failpoint)
        # Stored and marked reported before the publish: the lease was given back then.
        assert attempt["result"] is not None and attempt["state"] == "reported"
        assert attempt["locked_until"] is None
        if reports:
            assert (await s.db.fetchval("SELECT status FROM payment_intents WHERE id = $1",
                                        intent_id)) == "processing"

        survivor = await start_processor(settings, procs, tmp_path)
        intents = await wait_settled(s.db, api.account_id, 1, within_s=30)
        check_outcomes(intents, {intent_id: VISA})
        attempts = await check_ledger(s.db, api.account_id, amounts, since, {intent_id: 1})
        # Applied from the stored answer: the PSP was not asked a second time.
        assert attempts[0]["authorization_code"] == attempt["result"]["authorization_code"]
        assert "psp replayed a charge" not in survivor.log()
        settled = await s.db.fetchrow(
            "SELECT state, reports FROM payment_attempts WHERE id = $1", attempt["id"])
        assert (settled["state"], settled["reports"]) == ("settled", reports)
        assert ("psp results reported again" in survivor.log()) == bool(reports)


async def test_a_psp_result_waits_for_a_slow_confirm_instead_of_going_again(
    migrated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every PSP result's confirm takes longer than a request's publish may wait.
    settings = make_settings(publish_timeout_s=0.5)
    sent: list[str] = []
    real = topology.publish_confirmed

    async def slow(channel: Any, exchange: str, routing_key: str, body: bytes,
                   properties: Any, *, timeout_s: float) -> Any:
        if properties.message_type == ApplyPSPResult.TYPE:
            sent.append(properties.message_id)
            async with asyncio.timeout(timeout_s):
                await asyncio.sleep(1.0)
        return await real(channel, exchange, routing_key, body, properties,
                          timeout_s=timeout_s)

    monkeypatch.setattr(topology, "publish_confirmed", slow)
    amounts = Amounts(3)
    async with stack(settings) as s:
        api = await s.client()
        since = await s.db.fetchval("SELECT now()")
        made = [await create(api, amounts.take(), VISA, confirm_separately=False)
                for _ in range(3)]
        intents = await wait_settled(s.db, api.account_id, 3, within_s=30)
        check_outcomes(intents, dict.fromkeys(made, VISA))
        await check_ledger(s.db, api.account_id, amounts, since, dict.fromkeys(made, 1))
        # Each result published once, reported at the first try.
        assert sorted(sent) == sorted(set(sent)) and len(sent) == 3
        states = await s.db.fetch("SELECT state, reports FROM payment_attempts "
                                  "WHERE account_id = $1", api.account_id)
        assert [tuple(r) for r in states] == [("settled", 0)] * 3


async def test_edge_killed_between_publish_and_response(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    settings = make_settings(edge_port=free_port())
    async with stack(settings, processor=False) as s:
        local = await s.client()
        key = str(uuid.uuid4())
        params = form({"amount": 3100, "currency": "usd", "payment_method": VISA,
                       "confirm": True})
        edge = await start_proc("edge", settings, procs, tmp_path,
                                PAYONCE_FAILPOINTS="edge.after_publish")
        api = Client(s.session, f"http://127.0.0.1:{settings.edge_port}", {
            "account": local.account_id, "secret_key": local.secret_key,
            "publishable_key": local.publishable_key}, s.db)
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.post("/v1/payment_intents", params, key=key)
        assert await edge.wait_exit(10) == 137

        settings = settings.with_(edge_port=free_port())
        await start_proc("edge", settings, procs, tmp_path)
        api.base_url = f"http://127.0.0.1:{settings.edge_port}"
        # As a Stripe client does: a 409 (key still locked by the dead request, until its
        # edge's liveness key lapses) is retried. The lock itself would last far longer.
        assert await s.redis.pttl(f"idem:{api.account_id}:{key}") > 5000
        async with asyncio.timeout(20):
            while (retry := await api.post("/v1/payment_intents", params, key=key)).status == 409:
                assert retry.error["code"] == "idempotency_key_in_use"
                await asyncio.sleep(0.2)
        assert retry.status == 202, retry.body
        intent_id = ids.intent_id(settings.secret_bytes, api.account_id, key)
        assert retry.body["id"] == intent_id

        # Both copies of the command are queued now; the processor applies one.
        await s.start_processor()
        done = await api.wait_for(intent_id)
        assert done["status"] == "succeeded"
        again = await api.post("/v1/payment_intents", params, key=key)
        assert again.status == 202 and again.body["id"] == intent_id
        assert again.headers["Idempotent-Replayed"] == "true"
        assert await s.db.fetchval("SELECT count(*) FROM payment_intents WHERE account_id = $1",
                                   api.account_id) == 1
        assert await s.db.fetchval("SELECT count(*) FROM inbox WHERE account_id = $1",
                                   api.account_id) == 1
        assert await s.db.fetchval(
            "SELECT count(*) FROM payment_attempts WHERE account_id = $1", api.account_id) == 1


async def test_psp_errors_timeouts_and_lost_replies(
    migrated: None, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        psp_error_rate=0.2, psp_timeout_rate=0.2, psp_lost_reply_rate=0.2, psp_timeout_s=0.3,
        # Eight tries (the default) would leave about one attempt in 1,500 that never reached
        # the PSP, correctly failed with processing_error but with no ledger row; twelve make
        # that 0.4**12, so every attempt here must end with exactly one authorization.
        psp_max_tries=12)
    amounts = Amounts(24)
    caplog.set_level("INFO", logger="processor")
    async with stack(settings) as s:
        api = await s.client()
        since = await s.db.fetchval("SELECT now()")
        chosen = [DECLINED if i % 3 == 0 else VISA for i in range(amounts.count)]
        made = await asyncio.gather(*(
            create(api, amounts.take(), card, confirm_separately=False) for card in chosen))
        cards = dict(zip(made, chosen, strict=True))
        intents = await wait_settled(s.db, api.account_id, len(cards), within_s=90)
        # A lost reply retried must bring back the committed answer, never a processing_error.
        check_outcomes(intents, cards)
        await check_ledger(s.db, api.account_id, amounts, since, dict.fromkeys(cards, 1))
    messages = [r.getMessage() for r in caplog.records]
    # The faults did happen: 503s, timeouts, and charges replayed after a lost reply.
    assert "psp unavailable; retrying" in messages
    assert "psp timed out; retrying with the same key" in messages
    assert "psp replayed a charge" in messages
