"""Graceful shutdown (SIGTERM) loses nothing in flight, in the processor and in the edge."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aiohttp

from contracts import ids
from tests.conftest import Client, Proc, Reply, form, free_port, make_settings, stack, start_proc
from tests.support import (
    DECLINED,
    VISA,
    Amounts,
    EventTap,
    check_events,
    check_ledger,
    check_outcomes,
    create,
    unsettled,
    wait_settled,
)


async def test_processor_sigterm_finishes_or_hands_over(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    settings = make_settings(psp_latency_ms=(1000, 1000), shutdown_grace_s=10.0,
                             processor_metrics_port=free_port())
    amounts = Amounts(30)
    async with stack(settings, processor=False) as s, EventTap(settings).bound() as tap:
        api = await s.client()
        since = await s.db.fetchval("SELECT now()")
        proc = await start_proc("processor", settings, procs, tmp_path)
        chosen = [DECLINED if i % 3 == 0 else VISA for i in range(amounts.count)]
        made = await asyncio.gather(*(
            create(api, amounts.take(), card, confirm_separately=i % 2 == 1)
            for i, card in enumerate(chosen)))
        cards = dict(zip(made, chosen, strict=True))
        await asyncio.sleep(0.3)
        assert await unsettled(s.db, api.account_id, len(cards)) > 0
        # It stops by itself, well within its grace period (PSP calls take 1 s here).
        assert await proc.sigterm(within_s=settings.shutdown_grace_s) == 0, proc.log()[-3000:]
        assert "processor stopped" in proc.log()
        # Graceful, not a crash: the PSP calls under way were finished and reported, and no
        # attempt is left under a lease for the next processor to wait out.
        attempts = await s.db.fetch(
            "SELECT id, state, tries, locked_until > now() AS leased FROM payment_attempts "
            "WHERE account_id = $1", api.account_id)
        assert any(a["state"] != "pending" for a in attempts)
        assert not any(a["leased"] for a in attempts), [dict(a) for a in attempts]

        await start_proc("processor", settings, procs, tmp_path)
        intents = await wait_settled(s.db, api.account_id, len(cards))
        check_outcomes(intents, cards)
        await check_ledger(s.db, api.account_id, amounts, since, dict.fromkeys(cards, 1))
        await check_events(s.db, api.account_id, cards, tap)


async def test_edge_sigterm_answers_or_refuses(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    settings = make_settings(edge_port=free_port())
    async with stack(settings) as s:
        local = await s.client()
        account = {"account": local.account_id, "secret_key": local.secret_key,
                   "publishable_key": local.publishable_key}
        edge = await start_proc("edge", settings, procs, tmp_path)
        api = Client(s.session, f"http://127.0.0.1:{settings.edge_port}", account, s.db)
        params = form({"amount": 1200, "currency": "usd", "payment_method": VISA,
                       "confirm": True})
        results: dict[str, Reply | BaseException] = {}
        finished_at: dict[str, float] = {}
        loop = asyncio.get_running_loop()

        async def one(key: str) -> None:
            try:
                results[key] = await api.post("/v1/payment_intents", params, key=key)
            except aiohttp.ClientConnectionError as exc:
                results[key] = exc
            finished_at[key] = loop.time()

        # A burst the edge needs a while to work through, SIGTERM as its first answers come
        # back, then more requests while it shuts down.
        burst = [asyncio.create_task(one(str(uuid.uuid4()))) for _ in range(60)]
        await asyncio.wait(burst, return_when=asyncio.FIRST_COMPLETED)
        edge.popen.terminate()  # type: ignore[union-attr]
        sigterm_at = loop.time()
        late = []
        for _ in range(20):
            late.append(asyncio.create_task(one(str(uuid.uuid4()))))
            await asyncio.sleep(0.02)
        await asyncio.gather(*burst, *late)
        assert await edge.wait_exit(30) == 0, edge.log()[-3000:]

        answered = {k: r for k, r in results.items() if isinstance(r, Reply)}
        refused = [k for k, r in results.items() if not isinstance(r, Reply)]
        # Each request was either accepted or cleanly refused: never a 5xx or a half answer.
        assert all(r.status == 202 for r in answered.values()), \
            {r.status for r in answered.values()}
        assert refused, "no request was refused: SIGTERM came too late to test anything"
        # Requests in the edge's hands at SIGTERM were finished, not dropped.
        assert any(finished_at[k] > sigterm_at for k in answered), "none was in flight"

        settings = settings.with_(edge_port=free_port())
        await start_proc("edge", settings, procs, tmp_path)
        api.base_url = f"http://127.0.0.1:{settings.edge_port}"
        for key in refused:
            async with asyncio.timeout(20):
                while (retry := await api.post("/v1/payment_intents", params,
                                               key=key)).status == 409:
                    await asyncio.sleep(0.2)
            assert retry.status == 202, retry.body
            answered[key] = retry
        for key, reply in answered.items():
            assert reply.body["id"] == ids.intent_id(settings.secret_bytes, api.account_id, key)
        intents = await wait_settled(s.db, api.account_id, len(results))
        assert set(intents) == {r.body["id"] for r in answered.values()}
        assert {r["status"] for r in intents.values()} == {"succeeded"}
