"""Deterministic order books for the fake exchange: one per symbol, evolving in seeded steps.

Receives the clock (paced: a step every STEP_US of exchange time) or explicit generation requests
(`--depth-max`: as fast as a client reads). Each step changes 10-30 distinct levels (adds, changes
and removals around a moving mid; levels that the mid crosses are removed) and takes one update
id per change, so the book at any update id is defined. Keeps the current book and the last
`history` steps with the quantities they replaced, so it can build diff events for any cadence
and tell its own book at any update id still in the history (`book_at`). Pure: no trio, no I/O.
Prices and quantities are integers in units of 1e-8, like the trade tape.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from marketd.testing.fake_exchange.frames import fmt8
from marketd.testing.fake_exchange.market import SILENT_SYMBOLS, SymbolSpec, spec_for

STEP_US = 100_000  # one book step per 100 ms: a @depth@100ms event carries one step
MAX_CATCH_UP_STEPS = 10  # after a pause, at most 1 s of steps at once; the rest is skipped
MIN_CHANGES, MAX_CHANGES = 10, 30
DEFAULT_LEVELS = 200  # levels per side at start
DEFAULT_HISTORY = 4096  # steps kept per symbol

BID, ASK = 0, 1
# Distances from the mid in ticks, by an 8-bit draw: exponential with a mean of 12 ticks.
_FAR = tuple(int(-12 * math.log(1 - (i + 0.5) / 256)) for i in range(256))

# One change: (side, price_e8, new_qty_e8, old_qty_e8); a qty of 0 = no level.
Change = tuple[int, int, int, int]


class Step:
    __slots__ = ("changes", "first_id", "last_id", "time_us")

    def __init__(self, first_id: int, changes: list[Change], time_us: int) -> None:
        self.first_id = first_id
        self.last_id = first_id + len(changes) - 1
        self.changes = changes
        self.time_us = time_us


class BookSim:
    """One symbol's book and its recent steps."""

    def __init__(
        self,
        spec: SymbolSpec,
        seed: int,
        *,
        start_us: int,
        levels: int = DEFAULT_LEVELS,
        history: int = DEFAULT_HISTORY,
    ) -> None:
        self.spec = spec
        self._rng = random.Random(f"{seed}:{spec.symbol}:book")
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self.tick = spec.tick_e8
        self.mid_t = max(levels + 2, spec.price_e8 // spec.tick_e8)  # mid in ticks
        self.band = max(levels + levels // 2, 50)  # levels further than this are removed
        self.history: deque[Step] = deque(maxlen=history)
        rng = self._rng
        for d in range(1, levels + 1):
            if rng.random() < 0.85:
                self.bids[(self.mid_t - d) * self.tick] = self._qty()
            if rng.random() < 0.85:
                self.asks[(self.mid_t + d) * self.tick] = self._qty()
        self.last_id = random.Random(f"{seed}:{spec.symbol}:depth_ids").randrange(10**9, 10**10)
        self.start_us = start_us
        self.steps_made = 0  # steps generated or skipped since start_us (paced mode)
        self.withheld: list[tuple[int, int]] = []  # (U, u) of diff events dropped by a fault
        self.stale_served: list[int] = []  # lastUpdateId of snapshots served stale by a fault

    def _qty(self) -> int:
        spec = self.spec
        return spec.lot_e8 * self._rng.randint(1, max(2, spec.max_lots))

    # ---- evolution ----

    def advance_to(self, now_us: int) -> int:
        """Paced mode: make the steps due by `now_us` (a long pause is skipped, not replayed)."""
        due = (now_us - self.start_us) // STEP_US
        behind = due - self.steps_made
        if behind <= 0:
            return 0
        if behind > MAX_CATCH_UP_STEPS:
            self.steps_made = due - MAX_CATCH_UP_STEPS
            behind = MAX_CATCH_UP_STEPS
        self.generate(behind, now_us)
        self.steps_made = due
        return behind

    def generate(self, n: int, now_us: int) -> None:
        for _ in range(n):
            self._step(now_us)

    def _step(self, now_us: int) -> None:
        rng = self._rng
        tick = self.tick
        bids, asks = self.bids, self.asks
        touched: set[tuple[int, int]] = set()
        changes: list[Change] = []

        def put(side: int, price: int, qty: int) -> None:
            book = bids if side == BID else asks
            old = book.get(price, 0)
            if qty:
                book[price] = qty
            else:
                book.pop(price, None)
            touched.add((side, price))
            changes.append((side, price, qty, old))

        move = rng.choice((-1, 0, 0, 1))
        if self.mid_t + move - self.band <= 1:
            move = 0
        self.mid_t += move
        mid = self.mid_t * tick
        # The level the mid moved onto is gone (traded or cancelled): bids stay below the mid
        # and asks above it, so the book never crosses.
        if move > 0 and mid in asks:
            put(ASK, mid, 0)
        elif move < 0 and mid in bids:
            put(BID, mid, 0)
        target = rng.randint(MIN_CHANGES, MAX_CHANGES)
        # One 48-bit draw per change (random.getrandbits is the cheapest call): bit 0 the side,
        # 8 bits the distance from the mid (a table, mostly near the top), 8 bits whether an
        # existing level goes, the rest the quantity in lots.
        draw = rng.getrandbits
        band = self.band
        mid_t = self.mid_t
        lots = max(2, self.spec.max_lots)
        lot = self.spec.lot_e8
        attempts = 0
        while len(changes) < target and attempts < 10 * MAX_CHANGES:
            attempts += 1
            r = draw(48)
            side = r & 1
            book = bids if side == BID else asks
            far = 1 + min(band, _FAR[(r >> 1) & 255])
            price = (mid_t - far if side == BID else mid_t + far) * tick
            if price <= 0 or (side, price) in touched:
                continue
            if price in book and (r >> 9) & 255 < 90:  # about 35 %
                put(side, price, 0)
            else:
                put(side, price, lot * ((r >> 17) % lots + 1))
        # Keep the book within its band: drop the farthest level of a side that grew too deep.
        for side, book in ((BID, bids), (ASK, asks)):
            if len(book) > self.band:
                worst = min(book) if side == BID else max(book)
                if (side, worst) not in touched:
                    put(side, worst, 0)
        step = Step(self.last_id + 1, changes, now_us)
        self.last_id = step.last_id
        self.history.append(step)

    # ---- reading ----

    @property
    def first_known_id(self) -> int:
        """The oldest update id `book_at` can answer."""
        return self.history[0].first_id - 1 if self.history else self.last_id

    def steps_after(self, update_id: int) -> list[Step]:
        """Steps whose ids come after `update_id` (a step boundary), oldest first. Readers are
        near the newest step, so this walks back from the end."""
        out: list[Step] = []
        for step in reversed(self.history):
            if step.last_id <= update_id:
                break
            out.append(step)
        out.reverse()
        return out

    def book_at(self, update_id: int) -> tuple[dict[int, int], dict[int, int]]:
        """The book (bids, asks: price_e8 -> qty_e8) right after update id `update_id`."""
        if not self.first_known_id <= update_id <= self.last_id:
            raise LookupError(
                f"{self.spec.symbol}: update id {update_id} outside the known "
                f"{self.first_known_id}..{self.last_id}"
            )
        bids, asks = dict(self.bids), dict(self.asks)
        for step in reversed(self.history):
            if step.last_id <= update_id:
                break
            for i in range(len(step.changes) - 1, -1, -1):
                if step.first_id + i <= update_id:
                    break
                side, price, _new, old = step.changes[i]
                book = bids if side == BID else asks
                if old:
                    book[price] = old
                else:
                    book.pop(price, None)
        return bids, asks

    def top(
        self, n: int, book: tuple[dict[int, int], dict[int, int]] | None = None
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The best `n` levels per side, best first (of the current book or of `book`)."""
        bids, asks = book if book is not None else (self.bids, self.asks)
        top_b = heapq.nlargest(n, bids)
        top_a = heapq.nsmallest(n, asks)
        return [(p, bids[p]) for p in top_b], [(p, asks[p]) for p in top_a]


def merge_steps(steps: Sequence[Step]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The levels a diff event over `steps` carries: the last quantity of each level touched."""
    merged: dict[tuple[int, int], int] = {}
    for step in steps:
        for side, price, new, _old in step.changes:
            merged[(side, price)] = new
    bids = [(p, q) for (s, p), q in merged.items() if s == BID]
    asks = [(p, q) for (s, p), q in merged.items() if s == ASK]
    bids.sort(reverse=True)
    asks.sort()
    return bids, asks


class Books:
    """The books of all trading symbols (silent symbols have none)."""

    def __init__(
        self,
        symbols: Iterable[str],
        *,
        seed: int,
        clock_us: Callable[[], int],
        levels: int = DEFAULT_LEVELS,
        history: int = DEFAULT_HISTORY,
        silent: Iterable[str] = SILENT_SYMBOLS,
    ) -> None:
        silent_set = set(silent)
        start = clock_us()
        self.clock_us = clock_us
        self.sims: dict[str, BookSim] = {
            s: BookSim(spec_for(s), seed, start_us=start, levels=levels, history=history)
            for s in dict.fromkeys(x.upper() for x in symbols)
            if s not in silent_set
        }

    def get(self, symbol: str) -> BookSim | None:
        return self.sims.get(symbol)

    def book_at(
        self, symbol: str, update_id: int
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The exchange's own book of `symbol` at `update_id`, best first, as decimal strings."""
        sim = self.sims[symbol]
        bids, asks = sim.book_at(update_id)
        return (
            [(fmt8(p), fmt8(bids[p])) for p in sorted(bids, reverse=True)],
            [(fmt8(p), fmt8(asks[p])) for p in sorted(asks)],
        )
