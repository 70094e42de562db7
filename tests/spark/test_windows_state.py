"""WindowBook (watermark, late data, exact merging) and the versioned driver state (no Spark)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from tests.spark.conftest import SPARK_DIR  # noqa: F401  (puts spark/ on sys.path)

from marketd_spark.state import StateStore  # isort: skip
from marketd_spark.windows import Tick, WindowAcc, WindowBook  # isort: skip


def _acc(t: int, tid: int, price: str, qty: str) -> WindowAcc:
    p, q = Decimal(price), Decimal(qty)
    return WindowAcc(1, Tick(t, tid, p), Tick(t, tid, p), p, p, q, p * q, q, Decimal(0))


def test_windows_close_once_when_the_watermark_passes_their_end() -> None:
    book = WindowBook(delay_ms=10_000)
    book.add(("X", 60_000, 0), _acc(5_000, 2, "10", "1"))
    book.add(("X", 60_000, 0), _acc(5_000, 1, "11", "2"))  # same time, lower id: the open
    book.observe(65_000)
    assert book.close_ready() == []  # watermark 55 s < end 60 s
    book.observe(70_000)
    ((key, acc),) = book.close_ready()
    assert key == ("X", 60_000, 0)
    assert (acc.first.price, acc.last.price, acc.count) == (Decimal(11), Decimal(10), 2)
    assert acc.quote_volume == Decimal(32) and acc.volume == Decimal(3)
    assert book.close_ready() == []


def test_book_round_trips_through_json_exactly() -> None:
    book = WindowBook(delay_ms=0, top_k=2)
    acc = _acc(1, 1, "0.00001234", "12345678901.12345678")
    acc.top = [(Decimal("152347.65258765"), 1, 1)]
    acc.hist = {5: 3}
    book.add(("SHIBUSDT", 60_000, 0), acc)
    book.observe(1)
    again = WindowBook(delay_ms=0, top_k=2)
    again.load(book.to_json())
    assert again.open == book.open and again.max_event_ms == 1


def test_state_replay_loads_the_version_before_the_batch(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load_before(0) == {}
    store.save(0, {"n": 0})
    store.save(1, {"n": 1})
    # Batch 1 is replayed after a crash: it must start from batch 0's state, not its own.
    assert store.load_before(1) == {"n": 0}
    store.save(1, {"n": 1})
    store.save(3, {"n": 3})
    store.save(2, {"n": 2})  # a reset checkpoint re-running batch 2 forgets the abandoned 3
    assert store.load_before(10) == {"n": 2}
    for i in range(4, 20):
        store.save(i, {"n": i})
    assert len(list(tmp_path.glob("*.json"))) <= 6
