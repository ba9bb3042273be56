"""Anomaly detection settings (contract stub: the anomaly work replaces this module).

`anomalies:` is a policy key (the gateways run the detector, live)."""

from __future__ import annotations

from serving.schema import Strict


class AnomalyConfig(Strict):
    """Detector settings (to be defined)."""
