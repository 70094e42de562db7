"""TapeKeeper: seeding the trade gate with the tape a previous process published."""

from __future__ import annotations

import msgspec

from marketd.ingest.continuity import RequestBackfill
from marketd.ingest.decode import Outgoing
from marketd.ingest.tape import Request, TapeKeeper
from marketd.records import TradeRecord


def keeper(requested: list[Request]) -> TapeKeeper:
    def request(r: Request) -> bool:
        requested.append(r)
        return True

    return TapeKeeper(
        gaps_topic="gaps",
        backfill_topics={TradeRecord: "raw_trades"},
        request=request,
        gap_grace_s=30.0,
    )


def trade(symbol: str, trade_id: int) -> Outgoing:
    value = msgspec.json.encode({"symbol": symbol, "trade_id": trade_id})
    return Outgoing("raw_trades", symbol.encode(), value, 0, None, ("trade", symbol, trade_id, 0))


def ids(out: list[Outgoing]) -> list[tuple[str, int]]:
    return [(o.ident[1], o.ident[2]) for o in out if o.ident is not None]


def test_seeded_symbols_continue_the_published_tape() -> None:
    requested: list[Request] = []
    k = keeper(requested)
    k.seed_trades({"BTCUSDT": 100, "ETHUSDT": 500})
    out = k.admit(
        [
            trade("BTCUSDT", 99),  # published before the restart: a duplicate
            trade("BTCUSDT", 101),  # the next id: straight through
            trade("ETHUSDT", 504),  # 501..503 were missed while down
            trade("BNBUSDT", 7),  # not seeded: starts a tape of its own
        ],
        now=0.0,
    )
    assert ids(out) == [("BTCUSDT", 101), ("BNBUSDT", 7)]
    assert requested == [RequestBackfill("ETHUSDT", 501, 503, "trades", "restart")]
    assert k.trades.held("ETHUSDT") == 1


def test_an_empty_seed_changes_nothing() -> None:
    requested: list[Request] = []
    k = keeper(requested)
    k.seed_trades({})
    assert ids(k.admit([trade("BTCUSDT", 5), trade("BTCUSDT", 6)], now=0.0)) == [
        ("BTCUSDT", 5),
        ("BTCUSDT", 6),
    ]
    assert requested == []
