"""DAG tests: the helper package is imported from dags/ (as Airflow does); Airflow itself runs in
its own virtualenv (.venv-airflow, created by scripts/airflow-venv.sh) as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
AIRFLOW_VENV = Path(os.environ.get("AIRFLOW_VENV", ROOT / ".venv-airflow"))

if str(DAGS) not in sys.path:
    sys.path.insert(0, str(DAGS))


@pytest.fixture(scope="session")
def airflow_python() -> Path:
    """The Airflow venv's python, created or updated by scripts/airflow-venv.sh (a no-op when
    it is up to date)."""
    result = subprocess.run(
        [str(ROOT / "scripts/airflow-venv.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "AIRFLOW_VENV": str(AIRFLOW_VENV)},
    )
    assert result.returncode == 0, f"scripts/airflow-venv.sh failed:\n{result.stderr[-3000:]}"
    python = AIRFLOW_VENV / "bin/python"
    assert python.is_file()
    return python


@pytest.fixture(scope="session")
def airflow_home(airflow_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of an isolated Airflow: temp AIRFLOW_HOME, SQLite, our dags/, no examples."""
    home = tmp_path_factory.mktemp("airflow-home")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "PATH": f"{airflow_python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    result = subprocess.run(
        [str(airflow_python.parent / "airflow"), "db", "migrate"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return env
