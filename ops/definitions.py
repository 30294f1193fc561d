"""The RabbitMQ definitions file of a deployment's topology, from contracts/topology.py:
`payonce topology definitions > ops/rabbitmq/definitions.json` (what is committed there is
the default deployment's: prefix `payonce`, 4 partitions)."""

from __future__ import annotations

import orjson

from contracts.topology import Topology
from ops.settings import Settings


def render(settings: Settings) -> bytes:
    topology = Topology(settings.amqp_prefix, settings.partitions)
    return orjson.dumps(topology.definitions(),
                        option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
