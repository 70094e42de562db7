"""Settings of the DAGs: an Airflow Variable, else an environment variable, else a default.

`get("marketd_bin", "MARKETD_BIN", "marketd")` reads the Variable `marketd_bin`; without it the
worker's $MARKETD_BIN; without that the default. Called inside tasks only (at run time), never at
DAG parse time, so parsing stays free of metadata-database round trips.
"""

from __future__ import annotations

import os


def get(variable: str, env: str, default: str) -> str:
    from airflow.sdk import Variable

    fallback = os.environ.get(env, default)
    value = Variable.get(variable, default=fallback)
    return str(value).strip() if value is not None else fallback
