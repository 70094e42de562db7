"""The order-book alert rules (deploy/prometheus/marketd-alerts.yml, group marketd-books),
unit-tested with `promtool test rules` on synthetic series, like tests/ops/test_observability.py
does for the others."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.ops.test_observability import RULES, _promtool, _rules


def test_promtool_unit_tests_the_book_alerts(tmp_path: Path) -> None:
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
                    "exp_labels": {"instance": "m1:8000", "severity": "warning", **labels},
                    "exp_annotations": {"summary": summary, "description": description[alert]},
                }
            ],
        }

    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    # BTCUSDT out of sync from 1m for 45 s (a slow resync); ETHUSDT for 15 s.
                    series("marketd_book_in_sync", "1 1 1 1 0 0 0 0 1x20", symbol="BTCUSDT"),
                    series("marketd_book_in_sync", "1 1 1 1 0 1x22", symbol="ETHUSDT"),
                    # One audit mismatch of ETHUSDT at 2m; BTCUSDT audits agree.
                    series(
                        "marketd_book_audits_total",
                        "0x7 1x30",
                        symbol="ETHUSDT",
                        outcome="mismatch",
                    ),
                    series("marketd_book_audits_total", "0+1x40", symbol="BTCUSDT", outcome="ok"),
                    # SOLUSDT resyncs on a gap every 15 s.
                    series("marketd_book_resyncs_total", "0+1x60", symbol="SOLUSDT", reason="gap"),
                ],
                "alert_rule_test": [
                    {"eval_time": "1m15s", "alertname": "MarketdBookOutOfSync"},  # 15 s: not yet
                    fired(
                        "MarketdBookOutOfSync",
                        "1m45s",
                        "marketd m1:8000: the BTCUSDT book is out of sync for 30 s",
                        symbol="BTCUSDT",
                    ),
                    {"eval_time": "3m", "alertname": "MarketdBookOutOfSync"},  # back in sync
                    {"eval_time": "1m", "alertname": "MarketdBookAuditMismatch"},
                    fired(
                        "MarketdBookAuditMismatch",
                        "2m30s",
                        "marketd m1:8000: the ETHUSDT book disagreed with the exchange",
                        symbol="ETHUSDT",
                    ),
                    {"eval_time": "3m", "alertname": "MarketdBookResyncStorm"},
                    fired(
                        "MarketdBookResyncStorm",
                        "14m",
                        "marketd m1:8000: 40 SOLUSDT book resyncs in 10 minutes",
                        symbol="SOLUSDT",
                    ),
                ],
            }
        ],
    }
    test_file = tmp_path / "book-alerts-test.yml"
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
