"""The command-line contract: `python spark/<job>.py ...` and `spark-submit spark/<job>.py ...`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.spark.conftest import SPARK_DIR, Feed, kline, trade

M = 60_000
T0 = 1_767_225_600_000


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1", LOG_LEVEL="INFO")
    return env


BASE = ["--checkpoint", "c", "--source", "files"]
FILES = [*BASE, "--input", "i"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (FILES, "at least one --sink"),
        ([*BASE, "--sink", "parquet", "--output", "o"], "--input"),
        ([*FILES, "--sink", "parquet"], "--output"),
        ([*FILES, "--sink", "postgres", "--dsn", ""], "--dsn"),
        ([*FILES, "--sink", "parquet", "--output", "o", "--intervals", "2x"], "--intervals"),
        (["--checkpoint", "s3a://b/ck", *FILES[2:], "--sink", "parquet", "--output", "o"], "a URI"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("pyspark")
    from marketd_spark.jobs import trade_aggregation

    with pytest.raises(SystemExit) as exc:
        trade_aggregation.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.spark
def test_python_script_runs_trade_aggregation_once(tmp_path: Path) -> None:
    feed = Feed(tmp_path / "in")
    feed.add([trade(i, T0 + i * 1000, "100.00", "1") for i in range(5)])
    feed.add([trade(10, T0 + 2 * M, "100.00", "1")])  # closes the first 1m window
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable, str(SPARK_DIR / "trade_aggregation.py"), "--source", "files",
            "--input", str(feed.dir), "--sink", "parquet", "--output", str(out),
            "--checkpoint", str(tmp_path / "ck"), "--once",
        ],
        env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "job.stopped job=trade_aggregation" in res.stderr
    import pyarrow.dataset as ds

    rows = ds.dataset(str(out), partitioning="hive").to_table().to_pylist()
    assert [(r["interval"], r["window_start"], r["trades_count"]) for r in rows] == [("1m", T0, 5)]


@pytest.mark.spark
def test_spark_submit_runs_technical_indicators_once(tmp_path: Path) -> None:
    submit = shutil.which("spark-submit", path=str(Path(sys.executable).parent))
    assert submit, "spark-submit comes with the pyspark wheel"
    feed = Feed(tmp_path / "in")
    feed.add(
        [kline("ETHUSDT", "1m", T0 + i * M, f"{3000 + i}.00", "2", "6000", True) for i in range(30)]
    )
    out = tmp_path / "out"
    res = subprocess.run(
        [
            submit, "--master", "local[2]", "--conf", "spark.ui.enabled=false",
            "--conf", "spark.sql.shuffle.partitions=2",
            str(SPARK_DIR / "technical_indicators.py"), "--source", "files",
            "--input", str(feed.dir), "--sink", "parquet", "--output", str(out),
            "--checkpoint", str(tmp_path / "ck"), "--once",
        ],
        env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    import pyarrow.dataset as ds

    rows = ds.dataset(str(out), partitioning="hive").to_table().to_pylist()
    assert len(rows) == 30
    last = max(rows, key=lambda r: r["open_time"])
    assert last["sma_7"] == pytest.approx(sum(3000 + i for i in range(23, 30)) / 7)
    assert last["sma_99"] is None and last["vwap"] == 3000


def test_missing_input_directory_exits_2_before_starting_spark(tmp_path: Path) -> None:
    pytest.importorskip("pyspark")
    from marketd_spark.jobs import technical_indicators

    argv = [
        "--source", "files", "--input", str(tmp_path / "nope"), "--sink", "parquet",
        "--output", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "c"), "--once",
    ]  # fmt: skip
    assert technical_indicators.main(argv) == 2
    assert not (tmp_path / "c").exists()


def test_indicator_periods_have_long_aliases() -> None:
    pytest.importorskip("pyspark")
    from marketd_spark.jobs import technical_indicators

    args = technical_indicators.parse_args(
        [*BASE, "--input", "i", "--sink", "parquet", "--output", "o",
         "--sma-periods", "5,10", "--ema-periods", "3", "--rsi-period", "9"]
    )  # fmt: skip
    assert args.spec.columns[:4] == ("sma_5", "sma_10", "ema_3", "rsi_9")


@pytest.mark.spark
def test_kafka_source_without_the_connector_is_a_clean_error(spark: Any, tmp_path: Path) -> None:
    from marketd_spark.jobs import trade_aggregation
    from marketd_spark.sources import SourceError, read_values

    args = trade_aggregation.parse_args(
        ["--source", "kafka", "--kafka-reader", "jvm", "--sink", "parquet",
         "--output", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "c")]
    )  # fmt: skip
    with pytest.raises(SourceError, match="--packages"):
        read_values(spark, args, "raw_trades")
