"""The Python Kafka source: offset planning (pure), then real jobs reading Kafka through it.

The Kafka tests run against librdkafka's mock cluster, or a real broker with MARKETD_TEST_KAFKA.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.spark import reference
from tests.spark.conftest import (
    SPARK_DIR,
    delete_before,
    produce_records,
    read_back,
    run_once,
    trade,
    watermarks,
)
from tests.support.kafka import unique_topic

from marketd_spark import kafka_offsets as ko  # isort: skip  (spark/ is put on sys.path above)

M = 60_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, aligned to every interval
INTERVALS = {"1m": M, "5m": 5 * M, "15m": 15 * M}
A, B, C = ("t", 0), ("t", 1), ("u", 0)


# -- planning (pure) ------------------------------------------------------------------------------


def test_admit_takes_everything_available_without_a_limit() -> None:
    end = ko.admit({A: 5, B: 0}, {A: 0, B: 0}, {A: 50, B: 7}, None)
    assert end == {A: 50, B: 7}


def test_admit_shares_the_limit_in_proportion_to_the_backlog() -> None:
    end = ko.admit({A: 0, B: 0, C: 0}, {}, {A: 900, B: 90, C: 10}, 100)
    assert end == {A: 90, B: 9, C: 1}
    # Remainders go to the largest fractions, and the shares always sum to the limit.
    end = ko.admit({A: 0, B: 0, C: 0}, {}, {A: 1, B: 1, C: 1}, 2)
    assert sum(end.values()) == 2 and all(v <= 1 for v in end.values())


def test_a_new_partition_starts_at_its_earliest_offset() -> None:
    end = ko.admit({A: 10}, {A: 0, B: 40}, {A: 10, B: 45}, None)
    assert end == {A: 10, B: 45}
    assert ko.ranges({A: 10}, end, {B: 40}) == [ko.OffsetRange("t", 1, 40, 45)]


def test_deleted_records_do_not_count_against_the_limit() -> None:
    # Offsets 0..99 of A are gone: the limit buys 10 readable records, from 100.
    end = ko.admit({A: 0}, {A: 100}, {A: 500}, 10)
    assert end == {A: 110}
    (rng,) = ko.ranges({A: 0}, end)
    assert ko.gaps(rng, earliest=100) == 100  # what the reader reports as lost
    assert ko.gaps(rng, earliest=0) == 0
    assert ko.gaps(rng, earliest=500) == 110  # the whole range went before it was read


def test_the_end_never_moves_backwards() -> None:
    # A partition gone from the metadata, or a watermark below the start (topic recreated).
    assert ko.admit({A: 30, B: 8}, {A: 0}, {A: 20}, None) == {A: 30, B: 8}
    assert ko.admit({A: 30}, {A: 0}, {A: 20}, 5) == {A: 30}


def test_cap_stops_at_the_available_now_target() -> None:
    assert ko.cap({A: 50, B: 7, C: 3}, {A: 40, B: 9}) == {A: 40, B: 7}


def test_ranges_skip_empty_partitions_and_split_large_ones() -> None:
    got = ko.ranges({A: 0, B: 5}, {A: 25, B: 5}, max_records_per_task=10)
    assert got == [ko.OffsetRange("t", 0, s, e) for s, e in ((0, 10), (10, 20), (20, 25))]


def test_offsets_round_trip_in_the_jvm_connectors_json_shape() -> None:
    data = ko.to_json({A: 3, B: 4, C: 0})
    assert data == {"t": {"0": 3, "1": 4}, "u": {"0": 0}}
    assert ko.from_json(json.loads(json.dumps(data))) == {A: 3, B: 4, C: 0}


def test_starting_offsets_accept_keywords_and_json() -> None:
    assert ko.parse_starting("latest", ["t"]) == "latest"
    assert ko.parse_starting('{"t": {"0": 23, "1": -2}}', ["t"]) == {A: 23, B: -2}
    with pytest.raises(ValueError, match="earliest, latest or JSON"):
        ko.parse_starting("newest", ["t"])
    with pytest.raises(ValueError, match="not subscribed"):
        ko.parse_starting('{"x": {"0": 1}}', ["t"])


backlogs = st.dictionaries(
    st.tuples(st.sampled_from("xyz"), st.integers(0, 5)),
    st.tuples(st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 1000)),
    max_size=12,
)


@given(backlogs, st.one_of(st.none(), st.integers(1, 3000)))
def test_admit_never_exceeds_the_limit_nor_the_available_records(
    parts: dict[tuple[str, int], tuple[int, int, int]], limit: int | None
) -> None:
    start = {tp: s for tp, (s, _, _) in parts.items()}
    earliest = {tp: min(s, e) for tp, (s, e, _) in parts.items()}
    latest = {tp: max(s, e) + n for tp, (s, e, n) in parts.items()}
    end = ko.admit(start, earliest, latest, limit)
    readable = {tp: latest[tp] - max(start[tp], earliest[tp]) for tp in parts}
    admitted = {tp: end[tp] - max(start[tp], earliest[tp]) for tp in parts}
    assert all(0 <= admitted[tp] <= readable[tp] for tp in parts)
    total = sum(readable.values())
    assert sum(admitted.values()) == (total if limit is None else min(limit, total))


def test_settings_pass_kafka_options_through_and_reject_bad_ones() -> None:
    from marketd_spark.kafka_source import KafkaSourceError, Settings

    s = Settings.from_options(
        {
            "subscribe": "a, b",
            "kafka.bootstrap.servers": "k:9093",
            "kafka.security.protocol": "SASL_SSL",
            "kafka.sasl.password": "secret",
            "maxOffsetsPerTrigger": "500",
        }
    )
    assert s.topics == ("a", "b") and s.max_offsets_per_trigger == 500
    conf = s.consumer_config()
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.password"] == "secret"
    assert conf["auto.offset.reset"] == "error" and conf["enable.auto.commit"] is False
    with pytest.raises(KafkaSourceError, match="subscribe"):
        Settings.from_options({"kafka.bootstrap.servers": "k:9093"})
    with pytest.raises(KafkaSourceError, match="bootstrap"):
        Settings.from_options({"subscribe": "a"})
    with pytest.raises(ValueError, match="startingOffsets"):
        Settings.from_options(
            {"subscribe": "a", "kafka.bootstrap.servers": "k", "startingOffsets": "x"}
        )


def test_cli_takes_kafka_options_from_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from marketd_spark.jobs import trade_aggregation as job

    monkeypatch.setenv("KAFKA_OPTION_SASL_PASSWORD", "from-env")
    monkeypatch.setenv("KAFKA_OPTION_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    args = job.parse_args(
        ["--checkpoint", "c", "--sink", "parquet", "--output", "o", "--kafka-reader", "python",
         "--kafka-option", "security.protocol=SASL_SSL", "--kafka-option", "sasl.mechanism=PLAIN"]
    )  # fmt: skip
    assert args.kafka_reader == "python"
    assert args.kafka_options == {
        "sasl.password": "from-env",
        "security.protocol": "SASL_SSL",  # the flag wins over the env
        "sasl.mechanism": "PLAIN",
    }


def test_cli_refuses_the_daemons_embedded_cluster_name(capsys: pytest.CaptureFixture[str]) -> None:
    from marketd_spark.jobs import trade_aggregation as job

    with pytest.raises(SystemExit) as exc:
        job.parse_args(["--checkpoint", "c", "--sink", "parquet", "--output", "o",
                        "--kafka-bootstrap-servers", "embedded"])  # fmt: skip
    assert exc.value.code == 2
    assert "kafka.embedded_started" in capsys.readouterr().err


# -- real jobs on Kafka ---------------------------------------------------------------------------


def _trades(first_id: int, n: int, t_from: int, t_to: int, seed: int) -> list[dict[str, Any]]:
    import random

    rnd = random.Random(seed)
    out = []
    for k in range(n):
        sym = ("BTCUSDT", "ETHUSDT", "SHIBUSDT")[k % 3]
        t = t_from + (t_to - t_from) * k // n + rnd.randint(0, 500)
        price = f"{rnd.randint(99_000, 101_000) / 100:.2f}" if sym != "SHIBUSDT" else (
            f"{rnd.randint(1, 99_999_999) / 10**8:.8f}")  # fmt: skip
        qty = f"{rnd.randint(1, 5_000_000) / 10**6:.6f}"
        out.append(trade(first_id + k, t, price, qty, symbol=sym, maker=rnd.random() < 0.5))
    return out


def _parquet_rows(spark: Any, out: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    rows = [r.asDict() for r in spark.read.parquet(str(out)).collect()]
    keyed = {(r["symbol"], r["interval"], r["window_start"]): r for r in rows}
    assert len(keyed) == len(rows), "a window was written twice"
    return keyed


def _assert_windows(got: dict[Any, dict[str, Any]], expected: dict[Any, dict[str, Any]]) -> None:
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        assert {k: got[key][k] for k in want} == want, key


@pytest.mark.kafka
@pytest.mark.spark
def test_trade_aggregation_reads_kafka_in_limited_batches_and_resumes_from_its_checkpoint(
    spark: Any, kafka: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from marketd_spark.jobs import trade_aggregation as job

    topic = unique_topic("trades")
    monkeypatch.setenv("TOPIC_RAW_TRADES", topic)
    # Ten minutes of trades, a watermark longer than that: no trade can be late, whatever the
    # micro-batches look like, and no window closes in the first run.
    first = _trades(1, 900, T0, T0 + 10 * M, seed=1)
    produce_records(kafka, topic, first)
    out = tmp_path / "out"
    argv = ["--source", "kafka", "--kafka-reader", "python",
            "--kafka-bootstrap-servers", kafka.bootstrap_servers,
            "--max-offsets-per-trigger", "200", "--watermark-seconds", "700",
            "--checkpoint", str(tmp_path / "ck"),
            "--sink", "parquet", "--output", str(out)]  # fmt: skip
    run1 = run_once(spark, job, argv)
    assert run1.stats["accepted"] == 900 and run1.stats["windows_emitted"] == 0
    batches = sorted((tmp_path / "ck" / "spark" / "commits").glob("[0-9]*"))
    assert len(batches) >= 5  # 900 records, at most 200 per micro-batch

    # More trades and one that closes every window; the restart reads only what is new.
    closer = trade(10_000, T0 + 16 * M + 700_000, "100.00", "1")
    second = _trades(2_000, 300, T0 + 10 * M, T0 + 12 * M, seed=2)
    produce_records(kafka, topic, [*second, closer])
    run2 = run_once(spark, job, argv)
    assert run2.stats["accepted"] == 1201  # the counters continue: nothing read twice
    in_kafka = read_back(kafka, topic)
    assert len(in_kafka) == 1201
    expected, late = reference.aggregate(
        [[t for t in in_kafka if t["trade_id"] != 10_000], [closer]], INTERVALS, 700_000
    )
    assert not late and run2.stats["late"] == {}
    _assert_windows(_parquet_rows(spark, out), expected)
    assert len(expected) == 3 * (12 + 3 + 1)  # 12 one-minute, 3 five-minute, 1 fifteen-minute


def _job(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1",
            "LOG_LEVEL": "INFO", **env}  # fmt: skip
    return subprocess.run(
        [sys.executable, str(SPARK_DIR / "trade_aggregation.py"), *argv],
        env=full, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.mark.kafka
@pytest.mark.spark
def test_records_deleted_before_they_were_read_are_a_logged_gap_not_a_failure(
    spark: Any, kafka: Any, tmp_path: Path
) -> None:
    topic = unique_topic("trades")
    produce_records(kafka, topic, _trades(1, 300, T0, T0 + 2 * M, seed=3))
    out = tmp_path / "out"
    argv = ["--source", "kafka", "--kafka-reader", "python",
            "--kafka-bootstrap-servers", kafka.bootstrap_servers, "--watermark-seconds", "0",
            "--checkpoint", str(tmp_path / "ck"), "--sink", "parquet", "--output", str(out),
            "--once"]  # fmt: skip
    env = {"TOPIC_RAW_TRADES": topic}
    first = _job(argv, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"job\.start job=trade_aggregation source=kafka .*kafka_reader=python",
                     first.stderr), first.stderr[-3000:]  # fmt: skip

    # While the job is down, more trades arrive and the oldest of them expire on one partition.
    produce_records(kafka, topic, _trades(1_000, 600, T0 + 2 * M, T0 + 6 * M, seed=4))
    marks = watermarks(kafka, topic)
    part = max(marks, key=lambda p: marks[p][1])
    resume_at = json.loads(
        max((tmp_path / "ck" / "spark" / "offsets").glob("[0-9]*"), key=lambda p: int(p.name))
        .read_text().splitlines()[-1]
    )[topic][str(part)]  # fmt: skip
    low = delete_before(kafka, topic, part, resume_at + (marks[part][1] - resume_at) // 2)
    second = _job(argv, env)
    assert second.returncode == 0, second.stderr[-3000:]
    gaps = re.findall(r"kafka\.gap topic=(\S+) partition=(\d+) from_offset=(\d+) to_offset=(\d+) "
                      r"lost=(\d+)", second.stderr)  # fmt: skip
    assert [(t, int(p), int(f), int(e), int(n)) for t, p, f, e, n in gaps] == [
        (topic, part, resume_at, low, low - resume_at)
    ], second.stderr[-3000:]

    # The windows are those of the trades a reader could still get: nothing else went missing.
    first_run = _trades(1, 300, T0, T0 + 2 * M, seed=3)
    survivors = [t for t in read_back(kafka, topic) if t["trade_id"] >= 1_000]
    assert len(survivors) < 600  # some trades really were lost
    expected, late = reference.aggregate([first_run, survivors], INTERVALS, 0)
    assert not late
    _assert_windows(_parquet_rows(spark, out), expected)
