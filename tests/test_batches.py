"""Commands applied in batches keep every guarantee of applying them one at a time: per-intent
order across batches, a poison command isolated without its neighbours, duplicates applied
once, and a crash between a batch's commit and its acks changing nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import REGISTRY

from contracts.topology import Topology
from tests.conftest import Proc, free_port, make_settings, settings_env, stack
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
    wait_settled,
)
from tests.test_poison import broker, create_command, dead_letters, publish_raw


def batch_metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_queued_commands_are_applied_in_batches_in_order(migrated: None) -> None:
    """Creates and separate confirms of many intents, queued while no processor runs, then
    taken together: they are applied in batches of several, and every intent's events are in
    order (created, processing, outcome)."""
    settings = make_settings(partitions=2)
    amounts = Amounts(80)
    async with stack(settings, processor=False) as s, EventTap(settings).bound() as tap:
        api = await s.client()
        since = await s.db.fetchval("SELECT now()")
        cards = [DECLINED if i % 4 == 0 else VISA for i in range(amounts.count)]
        made = await asyncio.gather(*(
            create(api, amounts.take(), card, confirm_separately=i % 2 == 0)
            for i, card in enumerate(cards)))
        applied = batch_metric("payonce_processor_batches_total", outcome="applied")
        commands = batch_metric("payonce_processor_batch_commands_sum")
        await s.start_processor()
        intents = await wait_settled(s.db, api.account_id, len(made))
        check_outcomes(intents, dict(zip(made, cards, strict=True)))
        await check_ledger(s.db, api.account_id, amounts, since, dict.fromkeys(made, 1))
        await check_events(s.db, api.account_id, dict(zip(made, cards, strict=True)), tap)
        batches = batch_metric("payonce_processor_batches_total", outcome="applied") - applied
        batched = batch_metric("payonce_processor_batch_commands_sum") - commands
        # 80 creates, 40 separate confirms and 80 results, in fewer batches than commands.
        assert batched == 200 and batches < batched, (batches, batched)


async def test_a_poison_command_splits_its_batch_and_goes_alone(migrated: None) -> None:
    """A command that fails for its own reason, queued among healthy ones: its batch is
    split, the healthy commands are applied one by one, and only it is dead-lettered."""
    settings = make_settings(partitions=1)
    async with stack(settings, processor=False) as s, broker(settings) as channel:
        api = await s.client()
        # A real account's intent id of the wrong shape: fails the table's CHECK every time.
        poison = create_command(settings, api.account_id, intent_id="pi_short")
        healthy = [create(api, 5000 + i, VISA, confirm_separately=False) for i in range(10)]
        made = await asyncio.gather(*healthy[:5])
        await publish_raw(channel, settings, poison.encode(), poison.message_id)
        made += await asyncio.gather(*healthy[5:])
        split = batch_metric("payonce_processor_batches_total", outcome="split")
        await s.start_processor()
        intents = await wait_settled(s.db, api.account_id, len(made))
        check_outcomes(intents, dict.fromkeys(made, VISA))
        dead = await dead_letters(channel, settings, 1)
        assert [d["message_id"] for d in dead] == [poison.message_id]
        assert (dead[0]["reason"], dead[0]["deaths"]) == ("rejected", 1)
        assert batch_metric("payonce_processor_batches_total", outcome="split") > split


async def test_duplicates_queued_together_are_applied_once(migrated: None) -> None:
    """The same command queued three times beside other commands (a client's retries after
    lost answers, a republished command): one intent, one inbox row, one attempt."""
    settings = make_settings(partitions=1)
    async with stack(settings, processor=False) as s, broker(settings) as channel:
        api = await s.client()
        command = create_command(settings, api.account_id)
        others = await asyncio.gather(*(create(api, 6000 + i, VISA, confirm_separately=False)
                                        for i in range(6)))
        for _ in range(3):
            await publish_raw(channel, settings, command.encode(), command.message_id)
        await s.start_processor()
        intents = await wait_settled(s.db, api.account_id, len(others) + 1)
        assert intents[command.intent_id]["status"] == "succeeded"
        for table, column in (("inbox", "object_id"), ("payment_attempts", "payment_intent_id")):
            assert await s.db.fetchval(
                f"SELECT count(*) FROM {table} WHERE {column} = $1", command.intent_id) == 1
        topology = Topology(settings.amqp_prefix, settings.partitions)
        queue = await channel.declare_queue(topology.queue(0), passive=True)
        assert queue.declaration_result.message_count == 0  # every copy acked


async def test_crash_between_a_batch_commit_and_its_acks(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    """The processor dies right after a batch committed, before any of its messages was
    acked: they come back, are found applied, and nothing happens twice."""
    settings = make_settings(partitions=1, processor_metrics_port=free_port())
    amounts = Amounts(20)
    async with stack(settings, processor=False) as s:
        api = await s.client()
        since = await s.db.fetchval("SELECT now()")
        cards = [DECLINED if i % 3 == 0 else VISA for i in range(amounts.count)]
        made = await asyncio.gather(*(create(api, amounts.take(), card, confirm_separately=False)
                                      for card in cards))
        doomed = Proc(["processor"], settings_env(
            settings, PAYONCE_FAILPOINTS="processor.after_batch_commit"),
            tmp_path / "doomed.log").start()
        procs.append(doomed)
        assert await doomed.wait_exit(30) == 137
        # The batch committed: its intents exist, and nothing of it was acked.
        assert await s.db.fetchval(
            "SELECT count(*) FROM payment_intents WHERE account_id = $1", api.account_id) > 0
        # Its attempts were made claimed for the dead processor: the next one finds them once
        # their leases run out.
        made_claimed = await s.db.fetch(
            "SELECT tries, locked_until FROM payment_attempts WHERE account_id = $1",
            api.account_id)
        assert made_claimed and all(
            a["tries"] == 1 and a["locked_until"] is not None for a in made_claimed)
        await start_processor(settings, procs, tmp_path)
        intents = await wait_settled(s.db, api.account_id, len(made))
        check_outcomes(intents, dict(zip(made, cards, strict=True)))
        await check_ledger(s.db, api.account_id, amounts, since, dict.fromkeys(made, 1))
        await check_events(s.db, api.account_id, dict(zip(made, cards, strict=True)), None)
