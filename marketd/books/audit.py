"""The book audit: a local book against a fresh REST snapshot brought to the same update id.

Receives two `OrderBook`s at the same update id (the local one, and the reference: a snapshot
forwarded with the diffs buffered since); returns counts of matching, missing and phantom levels
inside the depth both know (each side's horizon), plus a few examples for a log line.
Pure: no I/O, no threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from marketd.books.book import BookSide, OrderBook

SAMPLE_SIZE = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditResult:
    """How the local book compared with the exchange's at `update_id`.

    A level is a (price, quantity) pair: `matching` pairs are in both books; `missing` ones only
    in the reference (the exchange has them, we do not), `phantom` ones only in the local book.
    A price in both with different quantities counts once as missing and once as phantom (and in
    `qty_differs`). Only prices inside both books' horizons are compared.
    """

    symbol: str
    update_id: int
    matching: int
    missing: int
    phantom: int
    qty_differs: int
    sample: tuple[str, ...]  # e.g. "bid 95000.01: local 1.5 exchange 2.0"

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.phantom == 0


def _compare_side(
    name: str, local: BookSide, ref: BookSide, counts: list[int], sample: list[str]
) -> None:
    matching = missing = phantom = differs = 0
    for price, lv in local.items():
        if not ref.known(price):
            continue
        other = ref.get(price)
        if other is None:
            phantom += 1
            if len(sample) < SAMPLE_SIZE:
                sample.append(f"{name} {lv.price}: local {lv.qty} exchange none")
        elif Decimal(other.qty) == Decimal(lv.qty):
            matching += 1
        else:
            missing += 1
            phantom += 1
            differs += 1
            if len(sample) < SAMPLE_SIZE:
                sample.append(f"{name} {lv.price}: local {lv.qty} exchange {other.qty}")
    for price, lv in ref.items():
        if price not in local and local.known(price):
            missing += 1
            if len(sample) < SAMPLE_SIZE:
                sample.append(f"{name} {lv.price}: local none exchange {lv.qty}")
    counts[0] += matching
    counts[1] += missing
    counts[2] += phantom
    counts[3] += differs


def compare(local: OrderBook, reference: OrderBook, *, symbol: str) -> AuditResult:
    """Compare two books at the same update id (ValueError if they are not)."""
    if local.last_update_id != reference.last_update_id or local.last_update_id is None:
        raise ValueError(
            f"audit of {symbol}: local book at {local.last_update_id}, "
            f"reference at {reference.last_update_id}"
        )
    counts = [0, 0, 0, 0]
    sample: list[str] = []
    _compare_side("bid", local.bids, reference.bids, counts, sample)
    _compare_side("ask", local.asks, reference.asks, counts, sample)
    return AuditResult(
        symbol=symbol,
        update_id=local.last_update_id,
        matching=counts[0],
        missing=counts[1],
        phantom=counts[2],
        qty_differs=counts[3],
        sample=tuple(sample),
    )
