"""`marketd topics create`: the plan, the mock-cluster branch, and a real broker.

The real-broker test needs MARKETD_TEST_KAFKA=host:port (the librdkafka mock cluster has no
CreateTopics); it uses unique topic names and deletes them afterwards.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import confluent_kafka
import confluent_kafka.admin
import confluent_kafka.cimpl
import pytest

from marketd.cli import main
from marketd.config import DEFAULT_ROUTES, load_config
from marketd.kafka.client import EmbeddedCluster
from marketd.kafka.topics import plan_topics
from marketd.tickers.redis_server import free_port
from tests.support.kafka import ENV


def test_plan_covers_every_topic_marketd_writes(tmp_path: Path) -> None:
    cfg = load_config(None, environ={"TOPIC_GAPS": "raw_trades"}, dotenv=None).config
    plans = {
        p.name: p
        for p in plan_topics(
            cfg, partitions=6, replication_factor=3, retention_hours=24, side_retention_hours=720
        )
    }
    expected = {"raw_trades", "raw_klines", "raw_tickers", "raw_dlq", *DEFAULT_ROUTES.values()}
    # raw_gaps was renamed onto raw_trades: one topic, sized as a data topic.
    assert set(plans) == expected
    assert plans["raw_trades"].partitions == 6
    assert plans["raw_trades"].replication_factor == 3
    assert plans["raw_trades"].config["retention.ms"] == str(24 * 3_600_000)
    assert plans["raw_dlq"].partitions == 1
    assert plans["raw_dlq"].config["retention.ms"] == str(720 * 3_600_000)


def test_embedded_setting_needs_nothing(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", "embedded")
    assert main(["topics", "create"]) == 0
    assert "creates topics on first use" in capsys.readouterr().out


@pytest.mark.kafka
def test_mock_cluster_auto_creates(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A dedicated mock cluster: the session's `kafka` fixture may be a real broker.
    with EmbeddedCluster() as cluster:
        clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", cluster.bootstrap_servers)
        assert main(["topics", "create", "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    assert "mock cluster" in out and "auto-create on first use" in out


def test_unreachable_cluster_fails(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    assert main(["topics", "create", "--timeout", "1"]) == 1
    assert "unreachable" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags",
    [["--partitions", "0"], ["--replication-factor", "0"], ["--retention-hours", "-1"]],
)
def test_bad_sizing_exits_2(clean_env: pytest.MonkeyPatch, flags: list[str]) -> None:
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    assert main(["topics", "create", *flags]) == 2


@pytest.mark.kafka
@pytest.mark.skipif(not os.environ.get(ENV), reason=f"needs a real broker: set {ENV}=host:port")
def test_creates_topics_on_a_real_broker(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bootstrap = os.environ[ENV]
    prefix = f"t{uuid.uuid4().hex[:8]}"
    topics = {
        "raw_trades": f"{prefix}_trades",
        "raw_klines": f"{prefix}_klines",
        "raw_tickers": f"{prefix}_tickers",
        "dlq": f"{prefix}_dlq",
        "gaps": f"{prefix}_gaps",
    }
    routes = {kind: f"{prefix}_{kind}" for kind in DEFAULT_ROUTES}
    toml = tmp_path / "marketd.toml"
    toml.write_text(
        f'[kafka]\nbootstrap_servers = "{bootstrap}"\n[topics]\n'
        + "".join(f'{k} = "{v}"\n' for k, v in topics.items())
        + "[routes]\n"
        + "".join(f'{k} = "{v}"\n' for k, v in routes.items())
    )
    names = [*topics.values(), *routes.values()]
    admin = confluent_kafka.admin.AdminClient({"bootstrap.servers": bootstrap})
    try:
        args = ["topics", "create", "--config", str(toml), "--partitions", "3"]
        assert main([*args, "--retention-hours", "12", "--if-not-exists"]) == 0
        out = capsys.readouterr().out
        assert out.count("created  ") == len(names)

        metadata = admin.list_topics(timeout=10)
        assert len(metadata.topics[topics["raw_trades"]].partitions) == 3
        assert len(metadata.topics[topics["dlq"]].partitions) == 1
        resource = confluent_kafka.admin.ConfigResource(
            confluent_kafka.admin.ResourceType.TOPIC, topics["raw_trades"]
        )
        configs = admin.describe_configs([resource])[resource].result(timeout=10)
        assert configs["retention.ms"].value == str(12 * 3_600_000)

        # Idempotent with --if-not-exists; an error without it, like kafka-topics.sh.
        assert main([*args, "--if-not-exists"]) == 0
        assert capsys.readouterr().out.count("exists   ") == len(names)
        assert main(args) == 1
        assert capsys.readouterr().out.count("EXISTS   ") == len(names)
    finally:
        # Best-effort cleanup on a shared broker; a topic that was never created is fine.
        for future in admin.delete_topics(names, operation_timeout=30).values():
            future.exception()
