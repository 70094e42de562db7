"""spark-submit spark/trade_aggregation.py ... (or python spark/trade_aggregation.py ...).

OHLCV + VWAP + taker volumes per symbol in 1m/5m/15m windows from raw_trades; see spark/README.md.
"""

import sys

from marketd_spark.jobs.trade_aggregation import main

if __name__ == "__main__":
    sys.exit(main())
