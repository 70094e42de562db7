"""Helpers of marketd's Airflow DAGs: settings lookup, Spark job supervision, data-quality checks.

Nothing here imports marketd (the daemon's dependencies are not installed in Airflow's
environment); `quality` and `spark_jobs` import no Airflow either, so they are unit-tested alone.
"""
