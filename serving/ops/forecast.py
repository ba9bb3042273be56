"""Forecast a daily series (cost or tokens) over a horizon: trend + weekly season, with an interval.

With MIN_DAYS (two weeks) of history or more: statsmodels' ETSModel, additive error, additive
trend (linear or damped, whichever has the lower AICc), additive weekly season (Holt-Winters as
a state-space model), with its daily prediction intervals. The horizon's total interval is the
sum of the daily bounds, as if every day erred the same way: wider than a joint interval, on
purpose. Simulated paths from the fitted model (the
joint interval) cover too little because they take the fitted trend and season as exact: on 40
synthetic series (benchmarks/forecast_coverage.py) a 90% interval held the true 28-day total 25
times that way, 38 times as summed daily bounds. With less history a season cannot be told from
noise: the forecast is flat at the mean of the last 7 days, the interval the range of those days
times the horizon, and `method` says so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

MIN_DAYS = 14  # two weekly seasons: the least ETS needs to estimate a weekly pattern
SEASON = 7
MAX_HORIZON = 366
MAX_HISTORY = 3660


@dataclass
class Forecast:
    method: str  # what was fitted, in words (printed beside the numbers)
    history_days: int
    daily: np.ndarray  # point forecast per day of the horizon (>= 0)
    total: float
    lower: float  # interval of the total over the horizon
    upper: float
    daily_upper: np.ndarray  # upper end of each day's interval
    slope_per_day: float | None = None  # the fitted trend at the end of the history (ETS only)

    @property
    def peak(self) -> float:
        return float(self.daily.max()) if len(self.daily) else 0.0


def forecast(history: np.ndarray, horizon: int, level: float = 0.9) -> Forecast:
    """Forecast the next `horizon` days of a daily series (oldest first, one value a day)."""
    y = np.asarray(history, dtype=float)
    if not 1 <= horizon <= MAX_HORIZON:
        raise ValueError(f"horizon must be 1 to {MAX_HORIZON} days (got {horizon})")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1 (got {level})")
    if len(y) == 0:
        raise ValueError("no history to forecast from")
    y = y[-MAX_HISTORY:]
    if not np.all(np.isfinite(y)):
        raise ValueError("history holds a value that is not a finite number")
    if len(y) < MIN_DAYS:
        return _flat(y, horizon, f"flat: {len(y)} days of history (< {MIN_DAYS})")
    if np.ptp(y) == 0:
        return _flat(y, horizon, "flat: the same every day")
    try:
        return _ets(y, horizon, level)
    except (ValueError, ArithmeticError, np.linalg.LinAlgError) as e:  # a degenerate fit: say so, do not guess
        return _flat(y, horizon, f"flat: the trend + season fit failed ({e})")


def _ets(y: np.ndarray, horizon: int, level: float) -> Forecast:
    import pandas as pd
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    with warnings.catch_warnings():  # convergence chatter; a poor fit shows in the interval
        warnings.simplefilter("ignore")
        # A linear trend and a damped one, the lower AICc kept: a free trend can chase the noise
        # (its smoothing as high as the level's) and its interval then grows with the horizon squared.
        fits = [
            ETSModel(
                pd.Series(y), error="add", trend="add", seasonal="add", seasonal_periods=SEASON, damped_trend=damped
            ).fit(disp=False)
            for damped in (False, True)
        ]
        fit = min(fits, key=lambda f: f.aicc if np.isfinite(f.aicc) else np.inf)
        point = np.asarray(fit.forecast(horizon))
        frame = fit.get_prediction(start=len(y), end=len(y) + horizon - 1).summary_frame(alpha=1 - level)
    daily = np.clip(point, 0, None)  # usage and cost are never negative
    lower = np.clip(np.asarray(frame["pi_lower"]), 0, None)
    upper = np.clip(np.asarray(frame["pi_upper"]), 0, None)
    return Forecast(
        method="ETS: damped trend + weekly season" if fit.model.damped_trend else "ETS: trend + weekly season",
        history_days=len(y),
        daily=daily,
        total=float(daily.sum()),
        lower=float(lower.sum()),
        upper=float(upper.sum()),
        daily_upper=upper,
        slope_per_day=float(np.asarray(fit.states)[-1, 1]),
    )


def _flat(y: np.ndarray, horizon: int, method: str) -> Forecast:
    recent = y[-SEASON:]
    mean = float(recent.mean())
    return Forecast(
        method=method,
        history_days=len(y),
        daily=np.full(horizon, max(mean, 0.0)),
        total=max(mean, 0.0) * horizon,
        lower=max(float(recent.min()), 0.0) * horizon,
        upper=max(float(recent.max()), 0.0) * horizon,
        daily_upper=np.full(horizon, float(recent.max())),
    )
