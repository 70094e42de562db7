"""Guards across process boundaries: the daemon's contract against the Spark jobs and the API.

The jobs' library lives in spark/ (not an installed package): put it on sys.path, as
tests/spark/conftest.py does. Nothing here starts Spark; the PostgreSQL guard uses the test
server from tests/support/postgres.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support.postgres import postgres_dsn, postgres_server  # noqa: F401

SPARK_DIR = Path(__file__).resolve().parents[2] / "spark"
if str(SPARK_DIR) not in sys.path:
    sys.path.insert(0, str(SPARK_DIR))
