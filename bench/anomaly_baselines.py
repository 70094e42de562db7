"""Which baseline for the anomaly z-scores: false alarms and misses of four estimators.

python bench/anomaly_baselines.py [--series 400] [--seed 1]

Pure Python, no Spark: each estimator scores every window of synthetic 1-minute series against the
previous 30 windows (threshold 3 for volume, 4 for returns), as spark/marketd_spark/anomalies.py
does. Reported per estimator:
  volume false alarms  windows flagged per 1,000 on steady series (Poisson trade counts, log-normal
                       trade sizes), no anomaly injected
  return false alarms  the same for log returns of a tick-quantised random walk (tick 0.01 at 100:
                       returns take few distinct values, the hard case for MAD)
  spikes found         share of 20x volume minutes detected 1..29 windows after a 400x outlier
Figures go to BENCHMARKS.md / spark/README.md ("Robust baselines").
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spark"))

from marketd_spark.anomalies import trimmed_z

Estimator = Callable[[float, list[float]], float | None]
BASELINE = 30


def mean_std(value: float, sample: list[float]) -> float | None:
    mean = statistics.fmean(sample)
    std = statistics.pstdev(sample, mu=mean)
    return None if std == 0 else (value - mean) / std


def median_mad(value: float, sample: list[float]) -> float | None:
    center = statistics.median(sample)
    mad = statistics.median([abs(x - center) for x in sample]) * 1.4826
    return None if mad == 0 else (value - center) / mad


def trimmed(value: float, sample: list[float]) -> float | None:
    r = trimmed_z(value, sample)  # what the jobs use
    return None if r is None else r[1]


def median_iqr(value: float, sample: list[float]) -> float | None:
    q1, _q2, q3 = statistics.quantiles(sample, n=4, method="inclusive")
    iqr = (q3 - q1) / 1.349
    return None if iqr == 0 else (value - statistics.median(sample)) / iqr


ESTIMATORS: dict[str, Estimator] = {
    "mean/stddev": mean_std,
    "median/MAD": median_mad,
    "trimmed 10% (used)": trimmed,
    "median/IQR": median_iqr,
}


def volume_series(rng: random.Random, n: int) -> list[float]:
    out = []
    for _ in range(n):
        trades = max(1, round(rng.gauss(50, math.sqrt(50))))
        out.append(sum(rng.lognormvariate(0, 1.0) for _ in range(trades)))
    return out


def return_series(rng: random.Random, n: int) -> list[float]:
    ticks, out = 10_000, []
    for _ in range(n + 1):
        step = sum(rng.choice((-1, 0, 1)) for _ in range(3))
        new = ticks + step
        out.append(math.log(new / ticks))
        ticks = new
    return out[1:]


def alarms(series: list[float], est: Estimator, z: float, two_sided: bool) -> tuple[int, int]:
    flagged = scored = 0
    for i in range(BASELINE, len(series)):
        score = est(series[i], series[i - BASELINE : i])
        scored += 1
        if score is not None and (abs(score) if two_sided else score) >= z:
            flagged += 1
    return flagged, scored


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", type=int, default=400)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    rng = random.Random(args.seed)
    vols = [volume_series(rng, 120) for _ in range(args.series)]
    rets = [return_series(rng, 120) for _ in range(args.series)]
    head = ("estimator", "volume false/1000", "return false/1000", "spikes found")
    print(f"{head[0]:<19} {head[1]:>18} {head[2]:>18} {head[3]:>13}")
    for name, est in ESTIMATORS.items():
        vf = vs = rf = rs = 0
        for v in vols:
            f, s = alarms(v, est, 3.0, two_sided=False)
            vf, vs = vf + f, vs + s
        for r in rets:
            f, s = alarms(r, est, 4.0, two_sided=True)
            rf, rs = rf + f, rs + s
        found = tried = 0
        for v in vols[: args.series // 4]:
            normal = statistics.median(v)
            for lag in range(1, BASELINE):
                series = [*v[:BASELINE], 400 * normal, *v[BASELINE : BASELINE + lag - 1]]
                score = est(20 * normal, series[-BASELINE:])
                tried += 1
                found += score is not None and score >= 3.0
        print(
            f"{name:<19} {1000 * vf / vs:>18.2f} {1000 * rf / rs:>18.2f} "
            f"{100 * found / tried:>12.1f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
