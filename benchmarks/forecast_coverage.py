"""How often `keel cost forecast`'s interval holds the true total, on synthetic series.

    python benchmarks/forecast_coverage.py [--series 40] [--level 0.9]

Each series: 56 days of 100 + 2 x day + a weekly pattern + Gaussian noise (sd 4), then the 28
days after it. Counts how often the forecast's interval for the 28-day total holds the true
total: as shipped (daily bounds summed, serving.ops.forecast), and as the joint interval of 2000
paths simulated from the same fit (what was tried first).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd

from serving.ops.forecast import forecast

WEEK = np.array([10.0, 12.0, 11.0, 13.0, 9.0, -25.0, -30.0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=40)
    ap.add_argument("--level", type=float, default=0.9)
    args = ap.parse_args()
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    shipped = simulated = 0
    for seed in range(args.series):
        t = np.arange(84)
        y = 100 + 2.0 * t + WEEK[t % 7] + np.random.default_rng(seed).normal(0, 4, 84)
        truth = y[56:].sum()
        f = forecast(y[:56], 28, level=args.level)
        shipped += f.lower <= truth <= f.upper
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = ETSModel(pd.Series(y[:56]), error="add", trend="add", seasonal="add", seasonal_periods=7).fit(
                disp=False
            )
            totals = np.asarray(fit.simulate(28, repetitions=2000, anchor="end", rng=np.random.default_rng(seed))).sum(
                0
            )
        tail = (1 - args.level) / 2
        simulated += np.quantile(totals, tail) <= truth <= np.quantile(totals, 1 - tail)
    print(
        f"{args.level:.0%} interval of the 28-day total held the truth: summed daily bounds (shipped) "
        f"{shipped}/{args.series}, simulated paths {simulated}/{args.series}"
    )


if __name__ == "__main__":
    main()
