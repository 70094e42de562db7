"""The command-line contract shared by every job (operators and the Airflow DAGs rely on it).

`--source kafka|files`, `--input`, `--sink parquet|postgres|redis` (repeatable), `--output`,
`--dsn`, `--redis-url`, `--checkpoint`, `--once`, `--kafka-reader auto|jvm|python`,
`--kafka-option KEY=VALUE`; Kafka settings come from the daemon's env vars
(KAFKA_BOOTSTRAP_SERVERS, TOPIC_RAW_TRADES, TOPIC_RAW_KLINES, and KAFKA_OPTION_<KEY> for client
properties such as KAFKA_OPTION_SASL_PASSWORD), PostgreSQL and Redis defaults from POSTGRES_DSN
and REDIS_URL. Bad combinations exit with status 2 and a message naming the flag.
"""

from __future__ import annotations

import argparse
import os

SINKS = ("parquet", "postgres", "redis")
KAFKA_READERS = ("auto", "jvm", "python")
KAFKA_OPTION_ENV = "KAFKA_OPTION_"


def kafka_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. security.protocol=SSL)")
    return key.strip(), value


def env_kafka_options(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """KAFKA_OPTION_SASL_PASSWORD=... -> {"sasl.password": ...} (Kafka property names have no
    underscores, so `_` maps back to `.` unambiguously); keeps secrets off the command line."""
    return {
        name[len(KAFKA_OPTION_ENV) :].lower().replace("_", "."): value
        for name, value in env.items()
        if name.startswith(KAFKA_OPTION_ENV) and len(name) > len(KAFKA_OPTION_ENV)
    }


def base_parser(description: str) -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--source", choices=("kafka", "files"), default="kafka")
    p.add_argument("--input", help="directory of JSON-lines files (--source files)")
    p.add_argument(
        "--max-files-per-trigger", type=int, default=0, help="files per micro-batch (0 = all)"
    )
    p.add_argument(
        "--max-offsets-per-trigger", type=int, default=0, help="Kafka records per micro-batch"
    )
    p.add_argument(
        "--starting-offsets", default="earliest", help="Kafka, first run only (earliest|latest)"
    )
    p.add_argument(
        "--kafka-bootstrap-servers",
        default=env.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"),
        help="default: $KAFKA_BOOTSTRAP_SERVERS",
    )
    p.add_argument(
        "--kafka-reader",
        choices=KAFKA_READERS,
        default=env.get("MARKETD_SPARK_KAFKA_READER", "auto"),
        help="jvm: Spark's connector (spark-submit --packages); python: the built-in Python "
        "source (confluent-kafka); auto: jvm when on the classpath, else python",
    )
    p.add_argument(
        "--kafka-option",
        action="append",
        type=kafka_option,
        default=[],
        metavar="KEY=VALUE",
        help="Kafka client property, repeatable (security.protocol=SASL_SSL, sasl.mechanism=...); "
        "also from KAFKA_OPTION_<KEY> env vars",
    )
    p.add_argument("--sink", action="append", choices=SINKS, default=[], help="repeatable")
    p.add_argument("--output", help="Parquet root: a local path or s3a://bucket/prefix")
    p.add_argument("--dsn", default=env.get("POSTGRES_DSN", ""), help="default: $POSTGRES_DSN")
    p.add_argument(
        "--redis-url",
        default=env.get("REDIS_URL", ""),
        help="default: $REDIS_URL",
    )
    p.add_argument("--redis-prefix", default="analytics", help="Redis key prefix")
    p.add_argument("--checkpoint", required=True, help="Spark checkpoint + driver state (local)")
    p.add_argument("--once", action="store_true", help="process everything available, then stop")
    p.add_argument(
        "--trigger-seconds", type=float, default=1.0, help="micro-batch interval (streaming)"
    )
    p.add_argument("--master", help="Spark master (default: spark-submit's, or local[2])")
    p.add_argument("--log-level", default=env.get("LOG_LEVEL", "INFO"))
    return p


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if not args.sink:
        p.error("give at least one --sink (parquet, postgres, redis)")
    args.sink = sorted(set(args.sink), key=SINKS.index)
    if args.source == "files" and not args.input:
        p.error("--source files needs --input DIR")
    if "parquet" in args.sink and not args.output:
        p.error("--sink parquet needs --output DIR (or s3a://bucket/prefix)")
    if "postgres" in args.sink and not args.dsn:
        p.error("--sink postgres needs --dsn (or POSTGRES_DSN)")
    if "redis" in args.sink and not args.redis_url:
        p.error("--sink redis needs --redis-url (or REDIS_URL)")
    if "redis" in args.sink and args.redis_url == "embedded":
        p.error("--redis-url embedded names the daemon's private redis-server; give its URL")
    if args.source == "kafka" and args.kafka_bootstrap_servers.strip() == "embedded":
        p.error(
            "--kafka-bootstrap-servers embedded (or KAFKA_BOOTSTRAP_SERVERS=embedded) names the "
            "daemon's in-process mock cluster: give its host:port (marketd logs it as "
            "kafka.embedded_started bootstrap_servers=...) or a real broker"
        )
    args.kafka_options = {**env_kafka_options(os.environ), **dict(args.kafka_option)}
    if args.max_offsets_per_trigger < 0:
        p.error("--max-offsets-per-trigger must be >= 0")
    if args.trigger_seconds <= 0:
        p.error("--trigger-seconds must be > 0")
    if "://" in args.checkpoint and not args.checkpoint.startswith("file://"):
        # The driver's state lives next to Spark's checkpoint and is read with plain file I/O.
        p.error("--checkpoint must be a local or mounted path, not a URI like s3a://")
    return args


def topic(env_var: str, default: str) -> str:
    return os.environ.get(env_var, default)
