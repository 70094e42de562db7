"""spark-submit spark/technical_indicators.py ... (or python spark/technical_indicators.py ...).

SMA, EMA, RSI, MACD, Bollinger bands and VWAP per closed kline from raw_klines; see spark/README.md.
"""

import sys

from marketd_spark.jobs.technical_indicators import main

if __name__ == "__main__":
    sys.exit(main())
