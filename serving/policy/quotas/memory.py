"""The in-memory quota backend: counters in one gateway process."""

from __future__ import annotations

import time

from serving.policy.quotas.backend import Renewals
from serving.policy.quotas.gcra import (
    TOKEN_LIMITS,
    US,
    Admission,
    Reservation,
    Scope,
    admission,
    check_tokens,
    limited_scopes,
    limits_of,
    new_reservation_id,
    settle_delta_us,
    settled_tat,
    verdict,
)


class MemoryQuotaBackend:
    """Counters in this process: right for a single gateway process. Not thread-safe: use it from
    one event loop (each call runs to completion without awaiting, so it is atomic there)."""

    def __init__(self, clock=time.time, lease_s: float = 900.0):
        self._clock = clock
        self._lease_us = round(lease_s * US)
        self._tats: dict[tuple[str, str, str], int] = {}  # (scope name, scope id, limit) -> TAT µs
        self._open: dict[tuple[str, str], dict[str, int]] = {}  # scope -> {reservation id: lease end µs}
        self._renewals = Renewals(self._lease_us, self.renew)

    def _now(self) -> int:
        return round(self._clock() * US)

    def _ledger(self, scope: Scope, now: int) -> dict[str, int]:
        """The scope's open reservations whose lease has not run out."""
        leases = self._open.setdefault((scope.name, scope.id), {})
        for rid in [rid for rid, until in leases.items() if until <= now]:
            del leases[rid]
        return leases

    async def reserve(self, scopes: list[Scope], tokens: int, request_id: str) -> Admission:
        check_tokens(tokens)
        limits, now, rid = limits_of(scopes), self._now(), new_reservation_id(request_id)
        states = []
        for lim in limits:
            if lim.is_rate:
                states.append(max(self._tats.get((lim.scope.name, lim.scope.id, lim.name), now), now))
            else:
                states.append(len(self._ledger(lim.scope, now)))
        worst, retry_us, never_fits = verdict(limits, tokens, now, states)
        limited = limited_scopes(scopes)
        if worst < 0:
            for scope in limited:
                self._ledger(scope, now)[rid] = now + self._lease_us
            for i, lim in enumerate(limits):
                if lim.is_rate:
                    states[i] += lim.span_us(lim.cost(tokens))
                    self._tats[(lim.scope.name, lim.scope.id, lim.name)] = states[i]
                else:
                    states[i] += 1
        adm = admission(limits, scopes, tokens, rid, now, states, worst, retry_us, never_fits)
        if adm.allowed and limited:
            assert adm.reservation is not None  # an admission holds its reservation
            self._renewals.opened(adm.reservation)
        return adm

    async def renew(self, reservations: list[Reservation]) -> None:
        """Extends the lease of each reservation that is still open to now + lease."""
        now = self._now()
        for r in reservations:
            for scope in limited_scopes(r.scopes):
                leases = self._open.get((scope.name, scope.id))
                if leases is not None and r.id in leases:
                    leases[r.id] = now + self._lease_us

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        self.settle_now(reservation, actual_tokens)

    def settle_now(self, reservation: Reservation, actual_tokens: int) -> None:
        """settle, without a coroutine: nothing here waits, so the gateway calls it inline."""
        check_tokens(actual_tokens)
        if reservation.settled:
            return
        reservation.settled = True
        self._renewals.closed(reservation)
        now = self._now()
        was_open = False
        for scope in limited_scopes(reservation.scopes):
            was_open |= self._ledger(scope, now).pop(reservation.id, None) is not None
        if not was_open:
            return  # its lease ran out: it stays charged as reserved (see redis._SETTLE_LUA)
        for lim in limits_of(reservation.scopes):
            if lim.name in TOKEN_LIMITS:
                key = (lim.scope.name, lim.scope.id, lim.name)
                delta = settle_delta_us(lim, reservation.tokens, actual_tokens)
                self._tats[key] = settled_tat(self._tats.get(key, now), now, delta)

    async def close(self) -> None:
        self._renewals.close()
