"""Hostile configuration through the real CLI: exit 2 and one bounded line, never a traceback.

Each case runs `marketd run` in a subprocess, as an operator would: a config error must be found
before anything starts, so the daemon never runs (the subprocess timeout would catch it).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from marketd.config import SETTINGS, EachValue, Range, load_config
from marketd.errors import ConfigError

PROJECT = Path(__file__).resolve().parents[2]

# The test runner's environment without any marketd setting: each case sets only its own.
_SETTING_VARS = {s.meta.env for s in SETTINGS.values()} | {"MARKETD_COMPONENTS", "MARKETD_CONFIG"}
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in _SETTING_VARS}


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "marketd.cli", "run", *args],
        cwd=tmp_path,  # no stray .env
        env={**CLEAN_ENV, "PYTHONPATH": str(PROJECT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode, proc.stderr


def assert_one_line(code: int, stderr: str, *needles: str) -> str:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-2000:]
    assert len(lines) == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    line = lines[0]
    assert line.startswith("marketd: config error: ")
    assert len(line) < 1200
    for needle in needles:
        assert needle in line, line
    return line


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


FILES: list[tuple[str, Callable[[Path], Path], tuple[str, ...]]] = [
    (
        "binary",
        lambda d: _write(d / "bin.toml", bytes(range(256)) * 4),
        ("--config", "bin.toml", "not UTF-8"),
    ),
    (
        "utf-16",
        lambda d: _write(d / "u16.toml", "[batch]\nsize = 5\n".encode("utf-16")),
        ("--config", "u16.toml", "not UTF-8"),
    ),
    (
        "array nested 100,000 deep",
        lambda d: _write(d / "deep.toml", b"x = " + b"[" * 100_000 + b"]" * 100_000 + b"\n"),
        ("--config", "deep.toml", "nested too deeply"),
    ),
    (
        "50 MB value",
        lambda d: _write(
            d / "big.toml", b'[kafka]\nbootstrap_servers = "' + b"a" * 50_000_000 + b'"\n'
        ),
        ("kafka.bootstrap_servers", "big.toml:2", "50,000,000 characters", "at most 4096"),
    ),
    (
        "50 MB stream name",
        lambda d: _write(d / "bigs.toml", b'[binance]\nstreams = ["' + b"a" * 50_000_000 + b'"]\n'),
        ("binance.streams", "bigs.toml:2", "at most"),
    ),
    (
        "nan in TOML",
        lambda d: _write(d / "nan.toml", b"[binance]\nping_interval_s = nan\n"),
        ("binance.ping_interval_s", "nan.toml:2", "finite"),
    ),
    (
        "a control character in a key",
        lambda d: _write(d / "ctl.toml", b'[batch]\n"si\\nze" = 1\n'),
        ("si\\nze", "unknown key"),
    ),
]


@pytest.mark.parametrize(("make", "needles"), [c[1:] for c in FILES], ids=[c[0] for c in FILES])
def test_hostile_config_file(
    tmp_path: Path, make: Callable[[Path], Path], needles: tuple[str, ...]
) -> None:
    path = make(tmp_path)
    code, stderr = run_cli(tmp_path, "--config", str(path))
    assert_one_line(code, stderr, *needles)


ENVS: list[tuple[dict[str, str], tuple[str, ...]]] = [
    ({"PING_INTERVAL_SECONDS": "nan"}, ("binance.ping_interval_s", "env PING_INTERVAL_SECONDS")),
    ({"BATCH_TIMEOUT_MS": "inf"}, ("batch.timeout_ms", "env BATCH_TIMEOUT_MS", "finite")),
    ({"BATCH_TIMEOUT_MS": "-inf"}, ("batch.timeout_ms", "finite")),
    ({"BATCH_SIZE": "100000000"}, ("batch.size", "env BATCH_SIZE", "<= 100000")),
    ({"BATCH_SIZE": "9" * 5000}, ("batch.size", "integer", "characters")),
    ({"TICKER_TTL_SECONDS": "1e400"}, ("tickers.ttl_s", "integer")),
    ({"RECONNECT_MAX_DELAY_SECONDS": "1e308"}, ("binance.reconnect_max_delay_s", "<= 3600")),
    (
        {"BINANCE_STREAMS": "btcusdt@trade,币安人生usdt@trade"},
        ("binance.streams", "env BINANCE_STREAMS", "币安人生usdt@trade", "ASCII"),
    ),
    ({"BINANCE_STREAMS": "BTCUSDT@trade"}, ("binance.streams", "lower-case")),
    ({"API_PORT": "0"}, ("api.port", "env API_PORT", ">= 1 and <= 65535")),
    ({"REDIS_URL": "redis://localhost:99999/0"}, ("redis.url", "env REDIS_URL", "Port out of")),
    ({"API_HOST": "not a host"}, ("api.host", "env API_HOST", "host name or an IP address")),
    (
        {"API_HOST": "no-such-host.invalid"},
        ("api.host", "env API_HOST", "cannot be resolved", "127.0.0.1"),
    ),
    ({"MARKETD_COMPONENTS": "x" * 100_000}, ("components", "100,000 characters", "ingest")),
]


@pytest.mark.parametrize(("env", "needles"), ENVS, ids=[next(iter(e)) for e, _ in ENVS])
def test_hostile_environment(tmp_path: Path, env: dict[str, str], needles: tuple[str, ...]) -> None:
    code, stderr = run_cli(tmp_path, env=env)
    assert_one_line(code, stderr, *needles)


def test_api_port_in_use_is_one_line_naming_api_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = run_cli(tmp_path, env={"API_PORT": str(port)})
    assert_one_line(code, stderr, "api.port", "env API_PORT", "already in use", str(port))


def test_a_long_value_is_truncated_in_the_error_line(tmp_path: Path) -> None:
    toml = tmp_path / "m.toml"
    toml.write_text('[kafka]\ncompression = "' + "z" * 3000 + '"\n')
    with pytest.raises(ConfigError) as info:
        load_config(toml, environ={}, dotenv=None)
    assert "z" * 100 not in str(info.value) and "3,000 characters" in str(info.value)
    assert "snappy, gzip" in str(info.value)


def test_a_binary_dotenv_is_one_config_error(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_bytes(b"\xff\xfeB\x00A\x00")
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, dotenv=dotenv)
    assert info.value.key == ".env" and "not UTF-8" in info.value.problem


def _bounded(check: Any) -> bool:
    if isinstance(check, EachValue):
        check = check.range
    return isinstance(check, Range) and math.isfinite(check.low) and math.isfinite(check.high)


@pytest.mark.parametrize(
    "key", sorted(k for k, s in SETTINGS.items() if s.type in (int, float, dict[str, float]))
)
def test_every_numeric_setting_has_both_bounds(key: str) -> None:
    s = SETTINGS[key]
    assert s.meta.check is not None and _bounded(s.meta.check), f"{key}: declare a Range"
    if s.type is not dict[str, float]:
        s.meta.check(s.default)  # the default is allowed


def test_importing_and_loading_the_config_imports_no_component() -> None:
    code = (
        "import sys\n"
        "from marketd.config import load_config\n"
        "load_config(environ={'BINANCE_STREAMS': 'btcusdt@trade,!miniTicker@arr',"
        " 'MARKETD_COMPONENTS': 'all'}, dotenv=None)\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('marketd'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**CLEAN_ENV, "PYTHONPATH": str(PROJECT)},
        timeout=60,
    ).stdout.split()
    components = ("ingest", "tickers", "api", "kafka", "analytics", "spool", "testing")
    leaked = [m for m in out if m.split(".")[1:2] and m.split(".")[1] in components]
    assert leaked == [], leaked
    assert "marketd.config" in out
