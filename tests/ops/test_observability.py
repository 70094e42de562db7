"""The Grafana dashboard and the Prometheus alert rules: structure, promtool, and metric names.

Every metric the dashboard and the alerts query must be one marketd declares (found by reading
the MetricsFactory calls in marketd/ with `ast`, including the `_total` / `_bucket` suffixes
its type implies); promtool checks the rules and unit-tests the key alerts on synthetic series.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/marketd-dashboard.json"
RULES = ROOT / "deploy/prometheus/marketd-alerts.yml"
METRIC_RE = re.compile(r"\bmarketd_[a-z0-9_]+\b")

SUFFIXES = {
    "counter": ("_total",),
    "fast_counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "fast_histogram": ("_bucket", "_sum", "_count"),
    "state_gauge": ("",),
}


def declared_metrics() -> set[str]:
    """Names exposed by marketd: `metrics.counter("x", ...)` exposes marketd_x_total, etc."""
    names: set[str] = set()
    for path in (ROOT / "marketd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in SUFFIXES
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                base = f"marketd_{node.args[0].value}"
                names.update(base + suffix for suffix in SUFFIXES[node.func.attr])
    return names


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


def test_declared_metrics_are_found() -> None:
    names = declared_metrics()
    # A sanity anchor on each kind, so a broken scan cannot pass the tests below vacuously.
    assert {
        "marketd_ws_reconnects_total",
        "marketd_ws_connected",
        "marketd_kafka_delivery_latency_seconds_bucket",
        "marketd_decode_rejected_total",
    } <= names


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_referenced_metric_is_declared(source: str) -> None:
    exprs = _dashboard_exprs() if source == "dashboard" else [r["expr"] for r in _rules()]
    templating = [v["definition"] for v in _dashboard()["templating"]["list"] if "definition" in v]
    referenced = {
        m
        for e in exprs + (templating if source == "dashboard" else [])
        for m in METRIC_RE.findall(e)
    }
    assert referenced, "no marketd_ metric referenced"
    missing = referenced - declared_metrics()
    assert not missing, f"{source} queries metrics marketd does not declare: {sorted(missing)}"


def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"] == "marketd" and dash["description"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
        if panel["type"] == "row":
            continue
        # Documented: every panel says what it shows and which metric it reads.
        assert panel["description"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert METRIC_RE.search(target["expr"]), target
            assert "$instance" in target["expr"], f"{panel['title']}: not filtered by instance"
            assert target["expr"].count("(") == target["expr"].count(")")


def test_alert_rules_structure() -> None:
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
    # What the issue asks to be alerted on.
    assert {
        "MarketdTickersStale",
        "MarketdNoFrames",
        "MarketdDeadLetterRate",
        "MarketdReconnectStorm",
        "MarketdComponentUnhealthy",
        "MarketdDependencyDown",
    } <= set(names)


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: apt-get install prometheus (scripts/bootstrap --dev)"
    return path


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_unit_tests_the_key_alerts(tmp_path: Path) -> None:
    description = {r["alert"]: r["annotations"]["description"] for r in _rules()}
    instance = {"instance": "m1:8000", "job": "marketd"}

    def series(name: str, values: str, **labels: str) -> dict[str, str]:
        rendered = ",".join(f'{k}="{v}"' for k, v in {**instance, **labels}.items())
        return {"series": f"{name}{{{rendered}}}", "values": values}

    def fired(alert: str, at: str, summary: str, **labels: str) -> dict[str, Any]:
        return {
            "eval_time": at,
            "alertname": alert,
            "exp_alerts": [
                {
                    "exp_labels": {"instance": "m1:8000", **labels},
                    "exp_annotations": {"summary": summary, "description": description[alert]},
                }
            ],
        }

    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # Frames until minute 3, then silence.
                    series(
                        "marketd_ws_last_frame_timestamp_seconds",
                        "0 60 120 180 180 180 180 180",
                        conn="0",
                    ),
                    # Three reconnects a minute.
                    series("marketd_ws_reconnects_total", "0+3x20", conn="0", reason="timeout"),
                    # BTCUSDT keeps being stored; ETHUSDT and SOLUSDT stop at minute 5.
                    series("marketd_tickers_stored_total", "0+60x20", symbol="BTCUSDT"),
                    series("marketd_tickers_stored_total", "0+60x5 300x15", symbol="ETHUSDT"),
                    series("marketd_tickers_stored_total", "0+60x5 300x15", symbol="SOLUSDT"),
                    series(
                        "marketd_kafka_delivery_failed_total", "0 0 0 5 5 5", topic="raw_trades"
                    ),
                    # Redis dies at minute 2: tickers unhealthy, the dependency down.
                    series("marketd_component_healthy", "1 1 0x10", component="tickers"),
                    series("marketd_component_healthy", "1x12", component="ingest"),
                    series("marketd_dependency_up", "1 1 0x10", dependency="redis"),
                ],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "MarketdNoFrames"},  # 60 s: not yet
                    fired(
                        "MarketdNoFrames",
                        "6m",
                        "marketd m1:8000: no WebSocket frame for 3m 0s",
                        severity="critical",
                    ),
                    fired(
                        "MarketdReconnectStorm",
                        "15m",
                        "marketd m1:8000: 30 reconnects in 10 minutes",
                        severity="warning",
                    ),
                    {"eval_time": "4m", "alertname": "MarketdTickersMostlyStale"},
                    fired(
                        "MarketdTickersMostlyStale",
                        "15m",
                        "marketd m1:8000: 66.67% of tickers stale",
                        severity="critical",
                    ),
                    {"eval_time": "2m", "alertname": "MarketdKafkaDeliveryFailed"},
                    fired(
                        "MarketdKafkaDeliveryFailed",
                        "3m",
                        "marketd m1:8000: Kafka refused 5 records on raw_trades",
                        severity="critical",
                        topic="raw_trades",
                    ),
                    {"eval_time": "2m", "alertname": "MarketdComponentUnhealthy"},
                    fired(
                        "MarketdComponentUnhealthy",
                        "3m",
                        "marketd m1:8000: tickers unhealthy for a minute",
                        severity="critical",
                        component="tickers",
                    ),
                    {"eval_time": "3m", "alertname": "MarketdDependencyDown"},
                    fired(
                        "MarketdDependencyDown",
                        "4m",
                        "marketd m1:8000: redis unreachable for 2 minutes",
                        severity="warning",
                        dependency="redis",
                    ),
                ],
            }
        ],
    }
    test_file = tmp_path / "alerts-test.yml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [_promtool(), "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
