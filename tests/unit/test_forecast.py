"""The forecast: trend + weekly season recovered from a synthetic series whose future is known."""

from __future__ import annotations

import numpy as np
import pytest

from serving.ops.forecast import MIN_DAYS, forecast

WEEK = np.array([10.0, 12.0, 11.0, 13.0, 9.0, -25.0, -30.0])  # weekdays busy, the weekend quiet


def synthetic(days: int, slope: float = 2.0, noise: float = 4.0, seed: int = 1) -> np.ndarray:
    """100 + slope x day + the weekly pattern + Gaussian noise."""
    t = np.arange(days)
    return 100 + slope * t + WEEK[t % 7] + np.random.default_rng(seed).normal(0, noise, days)


def test_the_known_future_falls_inside_the_interval_and_the_trend_is_recovered():
    y = synthetic(56 + 28)
    f = forecast(y[:56], horizon=28, level=0.9)
    assert f.method == "ETS: trend + weekly season"
    assert f.lower <= y[56:].sum() <= f.upper
    assert f.lower < f.total < f.upper
    assert f.slope_per_day == pytest.approx(2.0, abs=0.3)
    # the weekly shape carries into the forecast: its weekend days are the lowest of each week
    days = np.arange(56, 56 + 7)
    assert set(days[np.argsort(f.daily[:7])[:2]] % 7) == {5, 6}


def test_short_history_falls_back_to_a_flat_forecast_and_says_so():
    y = synthetic(10)
    f = forecast(y, horizon=30)
    assert f.method == "flat: 10 days of history (< 14)"
    assert f.total == pytest.approx(y[-7:].mean() * 30)
    assert f.lower == pytest.approx(y[-7:].min() * 30) and f.upper == pytest.approx(y[-7:].max() * 30)
    assert MIN_DAYS == 14


def test_a_series_that_never_changes_is_flat():
    f = forecast(np.full(30, 5.0), horizon=10)
    assert f.method == "flat: the same every day" and f.total == pytest.approx(50.0)


def test_forecasts_are_never_negative():
    y = np.maximum(synthetic(42, slope=-4.0), 0)  # a tenant winding down to nothing
    f = forecast(y, horizon=30)
    assert f.lower >= 0 and np.all(f.daily >= 0)


@pytest.mark.parametrize(
    "horizon, history, message",
    [
        (0, [1.0] * 20, "horizon must be 1 to 366"),
        (10, [], "no history"),
        (10, [1.0, float("nan")] * 10, "not a finite number"),
    ],
)
def test_bad_input_is_refused(horizon, history, message):
    with pytest.raises(ValueError, match=message):
        forecast(np.array(history), horizon)
