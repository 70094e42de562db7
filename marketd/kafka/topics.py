"""`marketd topics create`: create marketd's Kafka topics on a real cluster.

Receives the config (topic names from `[topics]` and `[routes]`) and the command-line sizing;
creates raw_trades, raw_klines, raw_tickers, the DLQ, raw_gaps and the routed topics with the
AdminClient, printing one line per topic. With `--if-not-exists` an existing topic is fine (what
deployments use: idempotent); without it an existing topic is reported and the exit code is 1, as
with kafka-topics.sh. The librdkafka mock cluster has no CreateTopics: topics auto-create there.
"""

from __future__ import annotations

import argparse
import os
import sys

import attrs
import confluent_kafka
import confluent_kafka.admin
import confluent_kafka.cimpl

from marketd.config import Config, load_config
from marketd.kafka.client import admin_settings, is_embedded
from marketd.streams import StreamKind, parse_streams

EXIT_OK = 0
EXIT_FAILED = 1

DEFAULT_PARTITIONS = 6
DEFAULT_RETENTION_HOURS = 7 * 24
# Dead letters and gap notices are few and read by people: one partition keeps them in order,
# and a month gives time to investigate and replay.
SIDE_TOPIC_PARTITIONS = 1
DEFAULT_SIDE_RETENTION_HOURS = 30 * 24
# librdkafka's mock cluster names itself "mockCluster<hex>" (rdkafka_mock.c).
MOCK_CLUSTER_PREFIX = "mockCluster"


@attrs.frozen
class TopicPlan:
    name: str
    partitions: int
    replication_factor: int  # -1: the broker's default.replication.factor
    config: dict[str, str]


def plan_topics(
    cfg: Config,
    *,
    partitions: int,
    replication_factor: int,
    retention_hours: float,
    side_retention_hours: float,
) -> list[TopicPlan]:
    """Every topic marketd writes, deduplicated (two settings may name the same topic)."""
    data = [cfg.topics.raw_trades, cfg.topics.raw_klines, cfg.topics.raw_tickers]
    data += [cfg.routes[kind] for kind in sorted(cfg.routes)]
    kinds = {spec.kind for spec in parse_streams(cfg.binance.streams)}
    if StreamKind.DEPTH in kinds:
        data += [cfg.topics.raw_depth, cfg.topics.book_snapshots]
    if StreamKind.DEPTH_PARTIAL in kinds:
        data.append(cfg.topics.raw_depth_partial)
    side = [cfg.topics.dlq, cfg.topics.gaps]
    plans: dict[str, TopicPlan] = {}
    for name in data:
        plans.setdefault(
            name, TopicPlan(name, partitions, replication_factor, _retention(retention_hours))
        )
    for name in side:
        plans.setdefault(
            name,
            TopicPlan(
                name,
                min(SIDE_TOPIC_PARTITIONS, partitions),
                replication_factor,
                _retention(side_retention_hours),
            ),
        )
    return list(plans.values())


def _retention(hours: float) -> dict[str, str]:
    return {"retention.ms": str(int(hours * 3_600_000)), "cleanup.policy": "delete"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=os.environ.get("MARKETD_CONFIG") or None,
        help="marketd.toml (brokers, topic names) (default: $MARKETD_CONFIG)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=DEFAULT_PARTITIONS,
        metavar="N",
        help=f"partitions of the data topics (default {DEFAULT_PARTITIONS}); "
        f"DLQ and gaps get {SIDE_TOPIC_PARTITIONS}",
    )
    parser.add_argument(
        "--replication-factor",
        type=int,
        default=-1,
        metavar="N",
        help="replicas per partition (default: the broker's default.replication.factor)",
    )
    parser.add_argument(
        "--retention-hours",
        type=float,
        default=DEFAULT_RETENTION_HOURS,
        metavar="H",
        help=f"retention of the data topics (default {DEFAULT_RETENTION_HOURS})",
    )
    parser.add_argument(
        "--side-retention-hours",
        type=float,
        default=DEFAULT_SIDE_RETENTION_HOURS,
        metavar="H",
        help=f"retention of the DLQ and gaps topics (default {DEFAULT_SIDE_RETENTION_HOURS})",
    )
    parser.add_argument(
        "--if-not-exists",
        action="store_true",
        help="an existing topic is fine (left as it is); without this flag it is an error",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="admin request timeout"
    )


def main(args: argparse.Namespace) -> int:
    cfg = load_config(getattr(args, "config", None)).config
    for flag, value in (
        ("--partitions", args.partitions),
        ("--retention-hours", args.retention_hours),
        ("--side-retention-hours", args.side_retention_hours),
        ("--timeout", args.timeout),
    ):
        if value <= 0:
            print(f"marketd topics create: {flag} must be > 0, got {value!r}", file=sys.stderr)
            return 2
    if args.replication_factor == 0 or args.replication_factor < -1:
        print("marketd topics create: --replication-factor must be >= 1", file=sys.stderr)
        return 2

    bootstrap = cfg.kafka.bootstrap_servers
    if is_embedded(bootstrap):
        print(
            "kafka.bootstrap_servers is 'embedded': the mock cluster lives inside the daemon and "
            "creates topics on first use; nothing to do"
        )
        return EXIT_OK
    plans = plan_topics(
        cfg,
        partitions=args.partitions,
        replication_factor=args.replication_factor,
        retention_hours=args.retention_hours,
        side_retention_hours=args.side_retention_hours,
    )
    admin = confluent_kafka.admin.AdminClient(admin_settings(cfg.kafka, bootstrap))
    try:
        return _create(
            admin, plans, bootstrap, if_not_exists=args.if_not_exists, timeout_s=args.timeout
        )
    finally:
        del admin


def _create(
    admin: confluent_kafka.admin.AdminClient,
    plans: list[TopicPlan],
    bootstrap: str,
    *,
    if_not_exists: bool,
    timeout_s: float,
) -> int:
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except confluent_kafka.KafkaException as exc:
        print(f"kafka at {bootstrap} unreachable: {exc.args[0] if exc.args else exc}")
        return EXIT_FAILED
    if str(metadata.cluster_id or "").startswith(MOCK_CLUSTER_PREFIX):
        print(
            f"{bootstrap} is librdkafka's mock cluster: it has no CreateTopics; topics "
            "auto-create on first use (4 partitions); nothing to do"
        )
        return EXIT_OK

    code = EXIT_OK
    to_create: list[TopicPlan] = []
    for plan in plans:
        existing = metadata.topics.get(plan.name)
        if existing is None or existing.error is not None:
            to_create.append(plan)
        elif if_not_exists:
            print(f"exists   {plan.name} ({len(existing.partitions)} partitions, left as is)")
        else:
            print(f"EXISTS   {plan.name} ({len(existing.partitions)} partitions)")
            code = EXIT_FAILED
    if not to_create:
        return code
    futures = admin.create_topics(
        [
            confluent_kafka.cimpl.NewTopic(
                p.name,
                num_partitions=p.partitions,
                replication_factor=p.replication_factor,
                config=p.config,
            )
            for p in to_create
        ],
        request_timeout=timeout_s,
        operation_timeout=timeout_s,
    )
    by_name = {p.name: p for p in to_create}
    for name, future in futures.items():
        plan = by_name[name]
        try:
            future.result()
        except confluent_kafka.KafkaException as exc:
            err = exc.args[0]
            # Created by someone else between our metadata read and the request.
            if err.code() == confluent_kafka.KafkaError.TOPIC_ALREADY_EXISTS and if_not_exists:
                print(f"exists   {name} (created concurrently, left as is)")
                continue
            print(f"FAILED   {name}: {err.name()}: {err.str()}")
            code = EXIT_FAILED
            continue
        hours = int(plan.config["retention.ms"]) / 3_600_000
        rf = "broker default" if plan.replication_factor == -1 else plan.replication_factor
        print(
            f"created  {name} ({plan.partitions} partitions, replication {rf}, "
            f"retention {hours:g} h)"
        )
    return code
