"""Cost settings (contract stub: the cost work replaces this module).

`costs:` is read by `keel cost` only: not policy, not server (a change restarts nothing)."""

from __future__ import annotations

from serving.schema import Strict


class CostConfig(Strict):
    """Prices and allocation (to be defined)."""
