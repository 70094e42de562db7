"""`marketd verify tape` against the Kafka mock cluster (or MARKETD_TEST_KAFKA)."""

from __future__ import annotations

import json

import msgspec
import pytest

from marketd.cli import main
from marketd.records import TradeRecord
from tests.support.kafka import TestKafka, unique_topic

pytestmark = pytest.mark.kafka


def trade(symbol: str, trade_id: int, backfill: bool = False) -> bytes:
    return msgspec.json.encode(
        TradeRecord(
            symbol, trade_id, "1.0", "2.0", trade_id, trade_id, False, 0, "binance",
            symbol.lower() + "@trade", 1, backfill=backfill,
        )
    )  # fmt: skip


def produce(kafka: TestKafka, topic: str, records: list[tuple[str, int, bool]]) -> None:
    producer = kafka.producer()
    for symbol, trade_id, backfill in records:
        headers = [("backfill", b"1")] if backfill else None
        producer.produce(topic, trade(symbol, trade_id), symbol.encode(), headers=headers)
    assert producer.flush(30) == 0


def verify(
    kafka: TestKafka,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
) -> tuple[int, str]:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap_servers)
    code = main(["verify", "tape", "--timeout", "60", *args])
    return code, capsys.readouterr().out


def test_clean_tape_exits_0(
    kafka: TestKafka, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = unique_topic("verify-clean")
    produce(
        kafka,
        topic,
        [("BTCUSDT", i, 103 <= i <= 105) for i in range(100, 200)]
        + [("ETHUSDT", i, False) for i in range(7, 50)],
    )
    code, out = verify(kafka, monkeypatch, capsys, "--topic", topic, "--json")
    doc = json.loads(out)
    assert code == 0
    assert doc["ok"] is True
    assert doc["records"] == 143
    btc = doc["symbols"]["BTCUSDT"]
    assert (btc["first_id"], btc["last_id"], btc["backfilled"]) == (100, 199, 3)


def test_gap_and_duplicate_exit_1_with_the_right_report(
    kafka: TestKafka, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = unique_topic("verify-bad")
    ids = [*range(1, 50), *range(55, 80), 60, *range(80, 90)]
    produce(kafka, topic, [("BTCUSDT", i, False) for i in ids] + [("ETHUSDT", 1, False)])
    code, out = verify(kafka, monkeypatch, capsys, "--topic", topic, "--json")
    assert code == 1
    btc = json.loads(out)["symbols"]["BTCUSDT"]
    assert (btc["gaps"], btc["duplicates"], btc["duplicate_ids_sample"]) == ([[50, 54]], 1, [60])

    code, out = verify(kafka, monkeypatch, capsys, "--topic", topic, "--symbol", "ethusdt")
    assert code == 0
    assert "BTCUSDT" not in out
    assert out.splitlines()[-1] == "OK: 1 symbols, 0 gaps, 0 duplicates"


def test_embedded_bootstrap_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "embedded")
    assert main(["verify", "tape"]) == 2
    assert "embedded" in capsys.readouterr().err


def test_missing_topic_exits_3(
    kafka: TestKafka, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap_servers)
    code = main(["verify", "tape", "--topic", unique_topic("verify-none"), "--timeout", "20"])
    assert code == 3
    assert "not available" in capsys.readouterr().err
