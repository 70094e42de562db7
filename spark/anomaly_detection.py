"""spark-submit spark/anomaly_detection.py ... (or python spark/anomaly_detection.py ...).

Volume spikes, price jumps, volatility changes, whale trades from raw_trades; see spark/README.md.
"""

import sys

from marketd_spark.jobs.anomaly_detection import main

if __name__ == "__main__":
    sys.exit(main())
