"""python spark/migrate.py --dsn postgresql://... : create or upgrade the analytics tables.

Applies marketd_spark/migrations/*.sql not applied yet (tracked in schema_migrations); safe to
rerun.
"""

import argparse
import os
import sys

from marketd_spark.migrations import migrate

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", default=os.environ.get("POSTGRES_DSN", ""))
    args = p.parse_args()
    if not args.dsn:
        p.error("--dsn (or POSTGRES_DSN) is required")
    applied = migrate(args.dsn)
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    sys.exit(0)
