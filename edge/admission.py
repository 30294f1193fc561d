"""A bound on the POSTs one edge process runs at once (load shedding).

A POST counts from before its Idempotency-Key is claimed until its 202 is decided; a
`Prefer: wait` after it does not count. Past `limit` a POST is answered 429 `rate_limit` at
once, with `Stripe-Should-Retry: true`, before its key is claimed: it changes nothing, and its
retry runs as new.

Why: under more load than the machine serves, taking every POST makes each of them wait
behind all the others for the same cores and for RabbitMQ's confirms, and the processor's PSP
results wait behind them in the broker, where they time out and are sent again. Refusing the
excess keeps the POSTs it takes close to the latency of the machine's full rate.
"""

from __future__ import annotations

from contracts.errors import RateLimited
from edge import metrics


class Admission:
    """Counts the POSTs running in this process; `enter` refuses one past `limit` (0: no
    bound)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0

    def enter(self) -> Admitted:
        if self.limit and self.running >= self.limit:
            metrics.SHED.inc()
            raise RateLimited(
                "payonce is taking more requests than it can answer at once; retry shortly "
                "with the same Idempotency-Key.",
                headers={"Retry-After": "1", "Stripe-Should-Retry": "true"})
        self.running += 1
        metrics.POSTS_RUNNING.set(self.running)
        return Admitted(self)


class Admitted:
    """One POST's place under the bound, given back once (`leave`)."""

    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def leave(self) -> None:
        if self._admission is not None:
            self._admission.running -= 1
            metrics.POSTS_RUNNING.set(self._admission.running)
            self._admission = None
