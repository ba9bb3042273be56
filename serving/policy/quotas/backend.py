"""What every quota backend is (`QuotaBackend`), the error it raises, and the lease renewals they share.

Concurrency: the open reservations of a scope, each with a lease (`lease_s`, default 15 min)
after which it no longer counts, so a gateway that crashed cannot hold a slot forever. The
gateway that made a reservation renews its lease every lease_s/3 while the request runs
(`Renewals`), so a request longer than the lease keeps its slot and its refund; only a gateway
that stopped renewing (it died, or could not reach Redis for a whole lease) loses them. A lease
that did run out leaves its request charged as reserved: settling applies only to an open
reservation, which is also what makes settling idempotent (a retried settle, or a release of
what was never reserved, changes nothing). Rejected for concurrency, a request is told to
retry after 1 s.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from serving.policy.quotas.gcra import US, Admission, Reservation, Scope

log = logging.getLogger(__name__)


class QuotaBackendError(Exception):
    """The quota store could not answer (Redis down, timed out); the gateway picks fail-open/closed."""


class QuotaBackend(Protocol):
    async def reserve(self, scopes: list[Scope], tokens: int, request_id: str) -> Admission: ...

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None: ...

    async def renew(self, reservations: list[Reservation]) -> None: ...

    async def close(self) -> None: ...


_RENEW_RETRY_S = 1.0


class Renewals:
    """The reservations this gateway process holds open, with their leases renewed every
    lease/3 (through the backend's `renew`) until they are settled. One asyncio task, running
    only while something is open."""

    def __init__(self, lease_us: int, renew):
        self._open: dict[str, Reservation] = {}
        self._renew = renew  # async (list[Reservation]) -> None
        self.interval_s = lease_us / US / 3
        self._task: asyncio.Task | None = None

    def opened(self, reservation: Reservation) -> None:
        self._open[reservation.id] = reservation
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def closed(self, reservation: Reservation) -> None:
        self._open.pop(reservation.id, None)

    async def _run(self) -> None:
        failing = False
        try:
            while self._open:
                # After a failure, retry within a second: a lease must not run out for a blip.
                await asyncio.sleep(min(self.interval_s, _RENEW_RETRY_S) if failing else self.interval_s)
                if not self._open:
                    break
                try:
                    await self._renew(list(self._open.values()))
                    if failing:
                        log.warning("quota leases are renewed again")
                    failing = False
                except QuotaBackendError as e:
                    if not failing:  # once per outage; the next tick retries
                        log.warning(
                            "could not renew %d quota leases (%s); they run out unless a later renewal succeeds",
                            len(self._open),
                            e,
                        )
                    failing = True
        finally:
            self._task = None

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
