"""SLOs as config (contract stub: the SLO work replaces this module).

`slos:` is a policy key (the gateways count good and bad events against it, live)."""

from __future__ import annotations

from serving.schema import Strict


class SloConfig(Strict):
    """One objective (to be defined)."""
