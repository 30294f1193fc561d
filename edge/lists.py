"""Stripe's lists: `{"object": "list", "url", "has_more", "data"}`, newest first, `limit` from 1
to 100 (10 by default), and the cursors `starting_after` and `ending_before`, which take the id
of an object of the list.

Pages are found by keyset, never by offset. Every listed object has a sort key that never
changes and that no other object shares (an event's `seq`; `(created, id)` for most objects),
and a cursor stands for its object's key: objects added or removed meanwhile never shift a
page, and the same cursor always leads to the same place. `starting_after` walks towards
older objects, `ending_before` towards newer ones; either page lists newest first, and
`has_more` says whether there is more in the direction walked, as at Stripe (whose libraries
page on with the last id, or back with the first).

A cursor must name an object the list could show, else the request is a 400, as at Stripe: a
cursor of another account's object finds nothing, and says nothing about it.

To list a resource: describe it once with a `Listing`; in the handler, validate the query with
`PAGE` (and `CREATED` where the list filters on it) and the resource's own filters, collect the
filters in a `Where` that starts with the scope (the account), then
`envelope(url, [render(row) for row in rows], has_more)` for `rows, has_more = await page(…)`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from contracts.errors import InvalidRequest
from edge.params import Field, bounded_integer, string, timestamp_range

DEFAULT_LIMIT = 10
MAX_LIMIT = 100
# Stripe takes cursors up to 5000 characters; ids are far shorter, so longer ones find nothing.
MAX_CURSOR = 5000
# Timestamps in filters are clamped to these (1970 to the end of year 9999), which every
# object's `created` lies between: the answer is the same, and no timestamp a client sends
# can overflow a datetime.
EARLIEST = 0
LATEST = 253_402_300_799

PAGE = {
    "limit": Field(bounded_integer(1, MAX_LIMIT)),
    "starting_after": Field(string(MAX_CURSOR)),
    "ending_before": Field(string(MAX_CURSOR)),
}
CREATED = {"created": Field(timestamp_range)}


@dataclass(frozen=True, slots=True)
class Listing:
    """How one kind of object is listed.

    `select` reads the rows in scope and ends with its WHERE clause, the scope's arguments as
    $1, $2, …; `position` reads the sort key (the `key` columns, in that order) of the object
    whose id is the argument after the scope's. `key` lists the columns of the sort key as
    `select` names them, the newest object having the greatest; `created` is the column the
    `created` filter applies to, if the list takes one.
    """

    noun: str  # as in "No such event: 'evt_…'"
    ids: re.Pattern[str]  # what ids of these objects look like: others are found nowhere
    select: str
    position: str
    key: tuple[str, ...]
    created: str | None = None


class Where:
    """The conditions a list's rows meet, beyond its scope, with their arguments numbered
    after the scope's."""

    def __init__(self, *scope: Any) -> None:
        self.scope = scope
        self.args: list[Any] = list(scope)
        self.conditions: list[str] = []

    def add(self, condition: str, *values: Any) -> None:
        """`condition` with one `{}` for each value, e.g. `add("e.type = ANY({})", types)`."""
        first = len(self.args) + 1
        self.args.extend(values)
        self.conditions.append(condition.format(*(f"${first + i}" for i in range(len(values)))))

    def copy(self) -> Where:
        other = Where(*self.scope)
        other.args, other.conditions = list(self.args), list(self.conditions)
        return other


def envelope(url: str, data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "url": url, "has_more": has_more, "data": data}


def _at(seconds: int) -> datetime:
    return datetime.fromtimestamp(min(max(seconds, EARLIEST), LATEST), UTC)


def add_created(where: Where, column: str, bounds: Mapping[str, int]) -> None:
    """`created` as unix seconds, as objects show it: `created=n` is any time within second n,
    and `created[gt]=n` starts at the next second."""
    for bound, seconds in bounds.items():
        if bound in ("eq", "gte"):
            where.add(f"{column} >= {{}}", _at(seconds))
        if bound in ("eq", "lte"):
            where.add(f"{column} < {{}}", _at(seconds + 1))
        if bound == "gt":
            where.add(f"{column} >= {{}}", _at(seconds + 1))
        if bound == "lt":
            where.add(f"{column} < {{}}", _at(seconds))


async def page(
    db: Any, listing: Listing, where: Where, values: Mapping[str, Any]
) -> tuple[list[Any], bool]:
    """(the rows of the page asked for, newest first; whether there are more beyond it).

    `values` are the validated `PAGE` parameters (and `created` where the listing has the
    column); `where` is left as it was.
    """
    after: str | None = values.get("starting_after")
    before: str | None = values.get("ending_before")
    if after is not None and before is not None:
        raise InvalidRequest("You may pass either starting_after or ending_before, not both.",
                             param="ending_before")
    query = where.copy()
    if listing.created is not None and values.get("created"):
        add_created(query, listing.created, values["created"])
    columns = ", ".join(listing.key)
    if after is not None:
        key = await _position(db, listing, where.scope, after, "starting_after")
        query.add(f"({columns}) < ({', '.join('{}' for _ in key)})", *key)
    if before is not None:
        key = await _position(db, listing, where.scope, before, "ending_before")
        query.add(f"({columns}) > ({', '.join('{}' for _ in key)})", *key)
    # Walking back (ending_before) reads the newer objects oldest first, nearest the cursor.
    direction = "ASC" if before is not None else "DESC"
    limit = values.get("limit") or DEFAULT_LIMIT
    sql = "".join((
        listing.select,
        "".join(f" AND {c}" for c in query.conditions),
        " ORDER BY ", ", ".join(f"{column} {direction}" for column in listing.key),
        f" LIMIT ${len(query.args) + 1}",
    ))
    # One more than the page, to know whether there is more.
    rows = list(await db.fetch(sql, *query.args, limit + 1))
    has_more = len(rows) > limit
    rows = rows[:limit]
    if before is not None:
        rows.reverse()
    return rows, has_more


async def _position(
    db: Any, listing: Listing, scope: tuple[Any, ...], cursor: str, param: str
) -> tuple[Any, ...]:
    row = await db.fetchrow(listing.position, *scope, cursor) \
        if listing.ids.fullmatch(cursor) else None
    if row is None:
        raise InvalidRequest(f"No such {listing.noun}: '{cursor[:100]}'", code="resource_missing",
                             param=param)
    return tuple(row.values())
