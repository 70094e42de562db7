"""Airflow-side assertions, run by tests/dags/test_airflow_dags.py with the Airflow venv's python.

Loads dags/ into a real DagBag and checks that every DAG imports, has its schedule, its tasks and
their dependencies. Not collected by pytest (the main venv has no Airflow); a failed assertion
exits non-zero with the reason on stderr.
"""

from __future__ import annotations

import os
import sys

from airflow.dag_processing.dagbag import DagBag

EXPECTED = {
    "marketd_ticker_monitor": {
        "schedule": "*/2 * * * *",
        "tasks": {"check_tickers": set()},
    },
    "marketd_streaming_processing": {
        "schedule": "*/5 * * * *",
        "tasks": {
            "preflight": {
                "supervise_trade_aggregation",
                "supervise_technical_indicators",
                "supervise_anomaly_detection",
            },
            "supervise_trade_aggregation": set(),
            "supervise_technical_indicators": set(),
            "supervise_anomaly_detection": set(),
        },
    },
    "marketd_data_quality": {
        "schedule": "0 * * * *",
        "tasks": {"check_trade_aggregates": set()},
    },
}


def main() -> None:
    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    assert not bag.import_errors, f"import errors: {bag.import_errors}"
    assert set(bag.dag_ids) == set(EXPECTED), f"DAGs: {sorted(bag.dag_ids)}"
    for dag_id, expected in EXPECTED.items():
        dag = bag.get_dag(dag_id)
        assert dag is not None
        expression = getattr(dag.timetable, "expression", None)
        assert expression == expected["schedule"], f"{dag_id}: schedule {expression!r}"
        assert dag.catchup is False, f"{dag_id}: catchup must be off"
        assert dag.max_active_runs == 1, f"{dag_id}: overlapping runs"
        assert "marketd" in dag.tags
        assert dag.doc_md, f"{dag_id}: no documentation"
        tasks = {t.task_id: set(t.downstream_task_ids) for t in dag.tasks}
        assert tasks == expected["tasks"], f"{dag_id}: tasks {tasks}"
    monitor = bag.get_dag("marketd_ticker_monitor")
    assert monitor.get_task("check_tickers").retries == 0  # the next run is the retry
    assert monitor.dagrun_timeout is not None
    assert monitor.dagrun_timeout.total_seconds() <= 120  # a hung check must not pile up runs
    # Exactly the three DAG files are parsed (.airflowignore keeps the helper package out), and
    # parsing them raised no warning (deprecated imports would show here).
    parsed = {stat.file: stat for stat in bag.dagbag_stats}
    assert set(parsed) == {
        "ticker_monitor_dag.py",
        "streaming_processing_dag.py",
        "data_quality.py",
    }, f"parsed files: {sorted(parsed)}"
    assert not bag.captured_warnings, f"warnings while parsing: {bag.captured_warnings}"
    print("airflow checks OK:", ", ".join(sorted(bag.dag_ids)))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as exc:
        print(f"airflow check failed: {exc}", file=sys.stderr)
        sys.exit(1)
