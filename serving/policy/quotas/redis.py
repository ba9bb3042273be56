"""The Redis quota backend: counters shared by every gateway replica, one Lua script per
operation, on Redis's own clock."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any, Protocol

from serving.policy.quotas.backend import QuotaBackendError, Renewals
from serving.policy.quotas.gcra import (
    PERIOD_US,
    REQUESTS_PER_MINUTE,
    TOKEN_LIMITS,
    TOKENS_PER_DAY,
    TOKENS_PER_MINUTE,
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
    verdict,
)


class RedisSettings(Protocol):
    """What the backend reads from its config (QuotaBackendConfig has these)."""

    @property
    def redis_url(self) -> str: ...

    @property
    def timeout_s(self) -> float: ...

    @property
    def lease_s(self) -> float: ...

    @property
    def key_prefix(self) -> str: ...


#
# Per scope with limits, a sorted set `...:open` of its open reservation ids scored by lease
# end: concurrency counts it, and settle applies only to a reservation still in it, so settling
# twice (a retry), or releasing one that was never made, changes nothing. When a reserve call
# fails or its caller goes away, Redis may still run (or have run) the script: the gateway then
# abandons the reservation id, which releases it if it was made, and otherwise leaves a
# tombstone (`...:gone:<id>`) that makes the late script a no-op.

# KEYS: tombstone, one open-set per scope (S), one key per rate limit.
# ARGV: reservation id, lease µs, S, then the concurrency limit per scope (0: none),
#       then per rate limit this request's span and the tolerance, in µs.
# Returns {1 admitted | 0 rejected | 2 abandoned, now µs, open count per scope, TAT per rate limit};
# the counts and TATs are after the admission, or as they were on a rejection.
_RESERVE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {2} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rid, lease, S = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out, ok = {0, now}, true
for i = 1, S do
  redis.call('ZREMRANGEBYSCORE', KEYS[1 + i], '-inf', now)
  local open = redis.call('ZCARD', KEYS[1 + i])
  local limit = tonumber(ARGV[3 + i])
  if limit > 0 and open >= limit then ok = false end
  out[2 + i] = open
end
for j = 1, #KEYS - 1 - S do
  local span, tolerance = tonumber(ARGV[2 + S + 2 * j]), tonumber(ARGV[3 + S + 2 * j])
  local tat = tonumber(redis.call('GET', KEYS[1 + S + j]) or now)
  if tat < now then tat = now end
  if tat + span - now > tolerance then ok = false end
  out[2 + S + j] = tat
end
if not ok then return out end
out[1] = 1
for i = 1, S do
  redis.call('ZADD', KEYS[1 + i], now + lease, rid)
  redis.call('PEXPIRE', KEYS[1 + i], math.ceil(lease / 1000) + 1)
  out[2 + i] = out[2 + i] + 1
end
for j = 1, #KEYS - 1 - S do
  local new = out[2 + S + j] + tonumber(ARGV[2 + S + 2 * j])
  if new > now then
    redis.call('SET', KEYS[1 + S + j], string.format('%d', new), 'PX', math.ceil((new - now) / 1000))
  end
  out[2 + S + j] = new
end
return out
"""

# KEYS: tombstone, one open-set per scope (S), one key per token limit.
# ARGV: reservation id, S, 1 to abandon (leave a tombstone if the reservation is not open) or 0,
#       tombstone ms, then per token limit the TAT delta in µs (< 0 refunds, > 0 charges).
# Only an open reservation is settled: a retried settle, or the release of a reservation that
# was never made or whose lease ran out, changes nothing. Returns 1 if the reservation was open.
_SETTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rid, S = ARGV[1], tonumber(ARGV[2])
local was_open = 0
for i = 1, S do
  if redis.call('ZREM', KEYS[1 + i], rid) == 1 then was_open = 1 end
end
if was_open == 0 and ARGV[3] == '1' then
  redis.call('SET', KEYS[1], '1', 'PX', tonumber(ARGV[4]))
end
for j = 1, #KEYS - 1 - S do
  local d = tonumber(ARGV[4 + j])
  if was_open == 1 then
    local key = KEYS[1 + S + j]
    local tat = tonumber(redis.call('GET', key) or now)
    local new
    if d >= 0 then new = math.max(tat, now) + d else new = math.max(tat + d, now) end
    if new > now then
      redis.call('SET', key, string.format('%d', new), 'PX', math.ceil((new - now) / 1000))
    else
      redis.call('DEL', key)
    end
  end
end
return was_open
"""

# KEYS: one scope's open-set. ARGV: lease µs, then reservation ids.
# Moves the lease end of each id still in the set to now + lease (ZADD XX adds none back).
_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[1])
local args = {}
for i = 2, #ARGV do
  args[#args + 1] = now + lease
  args[#args + 1] = ARGV[i]
end
redis.call('ZADD', KEYS[1], 'XX', unpack(args))
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease / 1000) + 1)
end
return 0
"""

_SHORT = {REQUESTS_PER_MINUTE: "rpm", TOKENS_PER_MINUTE: "tpm", TOKENS_PER_DAY: "tpd"}
_POOL_SIZE = 64
_TOMBSTONE_MS = 600_000  # far longer than any command waits in Redis's input buffer
_ABANDON_RETRY_DELAYS_S = (0.0, 0.5, 2.0)  # then the lease and the buckets' drain bound the damage


def _tenant_tag(scope: Scope) -> str:
    return "{" + scope.id.split("/", 1)[0] + "}"


def redis_key(prefix: str, scope: Scope, what: str) -> str:
    """`keel:{acme}:key:acme/key-1:tpm`; the tenant in braces keeps a tenant in one cluster slot.

    `what` is a limit name, or "open" for the scope's open reservations.
    """
    return f"{prefix}:{_tenant_tag(scope)}:{scope.name}:{scope.id}:{_SHORT.get(what, what)}"


# Commands are written in the Redis protocol (RESP) here, not through redis-py's command layer:
# its per-command machinery (argument encoding, connection pool, retry and observability hooks,
# a Task per write for the socket timeout) cost several times what the call itself does.


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _bulk_int(value: int) -> bytes:
    digits = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(digits), digits)


class _Script:
    """A Lua script as the head of an EVALSHA command, and of an EVAL one for when Redis lacks it."""

    def __init__(self, lua: str):
        body = lua.encode()
        self.evalsha = _bulk(b"EVALSHA") + _bulk(hashlib.sha1(body).hexdigest().encode())
        self.eval = _bulk(b"EVAL") + _bulk(body)  # EVAL also caches the script: EVALSHA works after


_RESERVE = _Script(_RESERVE_LUA)
_SETTLE = _Script(_SETTLE_LUA)
_RENEW = _Script(_RENEW_LUA)


class RedisQuotaBackend:
    """Counters in Redis, shared by every gateway replica; Redis's clock is the one clock.

    Each key expires once its state equals "empty" (a TAT in the past, no open reservation), so
    idle tenants leave nothing behind.

    Connections are redis-py's (URL, TLS, AUTH, database, handshake, socket timeouts, parser), at
    most _POOL_SIZE, each running one command at a time; the backend keeps the idle ones itself.
    """

    def __init__(self, cfg: RedisSettings):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._cfg = cfg
        self._lease_us = round(cfg.lease_s * US)
        # No retries: a quota check must answer within about timeout_s or let the gateway decide.
        # The pool is only a factory of configured connections: nothing is taken from it.
        self._factory = aioredis.ConnectionPool.from_url(
            cfg.redis_url,
            socket_timeout=cfg.timeout_s,
            socket_connect_timeout=cfg.timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._connections: list = []  # every connection made, for close()
        self._idle: list = []  # last in, first out: a few stay busy, the rest idle
        self._slots = asyncio.Semaphore(_POOL_SIZE)
        # Waiting for a connection is bounded too, but longer: under a burst, it is normal.
        self._slot_wait_s = max(1.0, 4 * cfg.timeout_s)
        self._keys: dict[tuple[str, str], tuple[str, bytes, dict[str, bytes]]] = {}
        self._background: set[asyncio.Task] = set()  # settles and abandons nobody waits for
        self._closing = asyncio.Event()
        self._renewals = Renewals(self._lease_us, self.renew)

    # --- the Redis call ---

    async def _call(self, script: _Script, keys: list[bytes], args: list[bytes]) -> Any:  # the script's reply
        """EVALSHA `script` with `keys` and `args` (each already a RESP bulk string)."""
        import redis.exceptions

        try:
            body = b"".join([_bulk_int(len(keys)), *keys, *args])
            head = b"*%d\r\n" % (3 + len(keys) + len(args))
            conn = await self._acquire()
            try:
                try:
                    return await self._roundtrip(conn, head + script.evalsha + body)
                except redis.exceptions.NoScriptError:  # a restarted or flushed Redis
                    return await self._roundtrip(conn, head + script.eval + body)
            except redis.exceptions.ResponseError:
                raise  # an answer: the connection is in step
            except BaseException:
                try:
                    await conn.disconnect(nowait=True)  # it may get a late reply: never reuse it as is
                except Exception:  # noqa: BLE001 - the error being raised is the one to report
                    pass
                raise
            finally:
                self._idle.append(conn)
                self._slots.release()
        except (redis.exceptions.RedisError, OSError, asyncio.TimeoutError) as e:
            raise QuotaBackendError(f"quota store {self._cfg.redis_url}: {type(e).__name__}: {e}") from e

    async def _acquire(self):
        import redis.exceptions

        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), self._slot_wait_s)
            except asyncio.TimeoutError:
                raise redis.exceptions.ConnectionError("No connection available.") from None
        else:
            await self._slots.acquire()  # returns at once
        if self._idle:
            return self._idle.pop()
        try:
            conn = self._factory.make_connection()  # not connected yet: no I/O here
        except BaseException:
            self._slots.release()
            raise
        self._connections.append(conn)
        return conn

    async def _roundtrip(self, conn, command: bytes) -> object:
        import redis.exceptions

        if conn.is_connected:
            # As redis-py's pool does: a connection Redis closed (restart, idle timeout), or one
            # holding unread data, is replaced instead of failing the call.
            try:
                stale = await _can_read(conn)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                stale = True
            if stale:
                await conn.disconnect()
        if not conn.is_connected:
            await conn.connect()
        elif conn.health_check_interval:  # set by the URL's health_check_interval: PING if idle that long
            await conn.check_health()
        writer = getattr(conn, "_writer", None)  # redis-py's stream (4.2 to 8.x at least)
        if writer is None:
            await conn.send_packed_command(command, check_health=False)  # slower: a Task per write
        else:
            try:
                # No drain: one command of a few hundred bytes at a time never fills the transport's
                # buffer, and the reply's socket timeout bounds a Redis that does not answer.
                writer.write(command)
            except RuntimeError as e:  # uvloop: the transport is already closed
                raise redis.exceptions.ConnectionError(f"Error writing to {self._cfg.redis_url}: {e}") from e
        return await conn.read_response()

    # --- keys and arguments ---

    def _scope_keys(self, scope: Scope) -> tuple[str, bytes, dict[str, bytes]]:
        """(tombstone key prefix, open-set key, key per rate limit), the keys as RESP bulk strings."""
        keys = self._keys.get((scope.name, scope.id))
        if keys is None:
            prefix = self._cfg.key_prefix
            keys = (
                f"{prefix}:{_tenant_tag(scope)}:gone:",
                _bulk(redis_key(prefix, scope, "open").encode()),
                {name: _bulk(redis_key(prefix, scope, name).encode()) for name in PERIOD_US},
            )
            if len(self._keys) >= 65536:  # scopes come from the configuration: this is a backstop
                self._keys.clear()
            self._keys[(scope.name, scope.id)] = keys
        return keys

    def _tombstone(self, scopes: list[Scope], rid: str) -> bytes:
        return _bulk((self._scope_keys(scopes[0])[0] + rid).encode())

    async def reserve(self, scopes: list[Scope], tokens: int, request_id: str) -> Admission:
        check_tokens(tokens)
        limits, limited, rid = limits_of(scopes), limited_scopes(scopes), new_reservation_id(request_id)
        if not limits:
            return Admission(True, Reservation(rid, tuple(scopes), tokens, time.time()))
        rates = [lim for lim in limits if lim.is_rate]
        keys = [self._tombstone(limited, rid)]
        keys += [self._scope_keys(s)[1] for s in limited]
        keys += [self._scope_keys(lim.scope)[2][lim.name] for lim in rates]
        args = [_bulk(rid.encode()), _bulk_int(self._lease_us), _bulk_int(len(limited))]
        args += [_bulk_int(s.limits.concurrent_requests or 0) for s in limited]
        for lim in rates:
            never = lim.cost(tokens) > lim.capacity  # a tolerance of -1 makes the script reject it
            args += [_bulk_int(lim.span_us(lim.cost(tokens))), _bulk_int(-1 if never else lim.tolerance_us)]
        # Shielded: a caller going away does not cut the call (and its connection) short, and
        # once it ends we know whether there is anything to release.
        task = asyncio.ensure_future(self._call(_RESERVE, keys, args))
        try:
            reply = [int(x) for x in await asyncio.shield(task)]
        except asyncio.CancelledError:
            self._keep(task)
            task.add_done_callback(lambda t: self._abandon_unless_rejected(t, limited, tokens, rid))
            raise
        except QuotaBackendError:
            self._abandon(limited, tokens, rid)  # the script may have run, or may run later
            raise
        if reply[0] == 2:
            raise QuotaBackendError(f"reservation {rid} was abandoned")  # unreachable: ids are unique
        admitted, now, opens, tats = reply[0], reply[1], reply[2 : 2 + len(limited)], reply[2 + len(limited) :]
        open_of = {(s.name, s.id): n for s, n in zip(limited, opens)}
        tat_of = iter(tats)
        states = [next(tat_of) if lim.is_rate else open_of[(lim.scope.name, lim.scope.id)] for lim in limits]
        worst, retry_us, never_fits = -1, 0, False
        if not admitted:
            # Same arithmetic, same state: this names the limit and tells "never fits" from "wait".
            worst, retry_us, never_fits = verdict(limits, tokens, now, states)
        adm = admission(limits, scopes, tokens, rid, now, states, worst, retry_us, never_fits)
        if adm.allowed:
            assert adm.reservation is not None  # an admission holds its reservation
            self._renewals.opened(adm.reservation)
        return adm

    async def renew(self, reservations: list[Reservation]) -> None:
        """Extends the lease of each reservation still open to now + lease (Redis's clock): one
        call per scope. Raises QuotaBackendError."""
        by_scope: dict[bytes, list[bytes]] = {}
        for r in reservations:
            for scope in limited_scopes(r.scopes):
                by_scope.setdefault(self._scope_keys(scope)[1], []).append(_bulk(r.id.encode()))
        failed: QuotaBackendError | None = None
        for key, ids in by_scope.items():  # every scope, even after one failed
            for at in range(0, len(ids), 1000):  # bounded arguments per call
                try:
                    await self._call(_RENEW, [key], [_bulk_int(self._lease_us), *ids[at : at + 1000]])
                except QuotaBackendError as e:
                    failed = failed or e
        if failed is not None:
            raise failed

    def _abandon_unless_rejected(self, task: asyncio.Task, limited, tokens: int, rid: str) -> None:
        if not task.cancelled() and task.exception() is None and int(task.result()[0]) == 0:
            return  # rejected: nothing was taken
        self._abandon(limited, tokens, rid)

    def _keep(self, task: asyncio.Task) -> None:
        """Hold a task nobody may await until it ends (close waits for it)."""
        self._background.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # marked retrieved: its caller may have gone away

    def _abandon(self, limited: list[Scope], tokens: int, rid: str) -> None:
        self._keep(asyncio.ensure_future(self._abandon_with_retries(limited, tokens, rid)))

    async def _abandon_with_retries(self, limited: list[Scope], tokens: int, rid: str) -> None:
        keys, args = self._settle_call(limited, tokens, 0, rid, abandon=True)
        for delay in _ABANDON_RETRY_DELAYS_S:
            if delay:
                try:
                    await asyncio.wait_for(self._closing.wait(), delay)
                    return  # closing: the lease and the drain take it from here
                except asyncio.TimeoutError:
                    pass
            try:
                await self._call(_SETTLE, keys, args)
                return
            except QuotaBackendError:
                continue

    def _settle_call(self, limited: list[Scope], reserved: int, actual: int, rid: str, abandon: bool):
        token_limits = [lim for lim in limits_of(limited) if lim.name in TOKEN_LIMITS]
        keys = [self._tombstone(limited, rid)] + [self._scope_keys(s)[1] for s in limited]
        keys += [self._scope_keys(lim.scope)[2][lim.name] for lim in token_limits]
        args = [_bulk(rid.encode()), _bulk_int(len(limited)), _bulk_int(int(abandon)), _bulk_int(_TOMBSTONE_MS)]
        args += [_bulk_int(settle_delta_us(lim, reserved, actual)) for lim in token_limits]
        return keys, args

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        check_tokens(actual_tokens)
        limited = limited_scopes(reservation.scopes)
        if reservation.settled or not limited:
            return
        self._renewals.closed(reservation)  # settled or not, this gateway stops renewing it
        keys, args = self._settle_call(limited, reservation.tokens, actual_tokens, reservation.id, abandon=False)
        # Shielded and kept: a settle the caller stops waiting for still happens. On an error the
        # caller may retry: the script is idempotent.
        task = asyncio.ensure_future(self._call(_SETTLE, keys, args))
        self._keep(task)
        await asyncio.shield(task)
        reservation.settled = True

    async def close(self) -> None:
        """Waits briefly for settles and abandons still in flight, then disconnects."""
        self._closing.set()
        self._renewals.close()
        deadline = time.monotonic() + max(1.0, 4 * self._cfg.timeout_s)
        while self._background and time.monotonic() < deadline:  # a reserve ending here adds an abandon
            await asyncio.wait(set(self._background), timeout=deadline - time.monotonic())
        for task in self._background:
            task.cancel()
        # As redis-py's pool disconnects: all at once, the first failure raised.
        results = await asyncio.gather(*(c.disconnect() for c in self._connections), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed


async def _can_read(conn) -> bool:
    """Whether a connection has data waiting or was closed (redis-py 5 names it can_read_destructive)."""
    check = getattr(conn, "can_read", None) or conn.can_read_destructive
    return await check()
