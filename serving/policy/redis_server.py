"""A local `redis-server` for the quota store: started by `keel serve` when the config points at
a loopback Redis that is not running, and by the tests. Nothing is persisted (quota state is
worth minutes; losing it on restart only forgives some usage).
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from urllib.parse import urlparse

INSTALL_HINT = "`make setup` installs it; or `apt-get install redis-server` (brew install redis on macOS)"
START_TIMEOUT_S = 10.0


class RedisServerError(RuntimeError):
    """Redis cannot be started or reached; str() is the message a user reads."""


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_answers(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts connections on host:port (a Redis asking for a password counts)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _stop_process(proc: subprocess.Popen, tmpdir: str | None) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


class RedisServer:
    """A `redis-server` child process on 127.0.0.1, no persistence; stopped by stop(), by leaving
    the `with` block, or when this Python process exits."""

    def __init__(self, port: int | None = None, dir: str | Path | None = None, bind: str = "127.0.0.1"):
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisServerError(f"redis-server is not installed (needed for quotas.backend: redis); {INSTALL_HINT}.")
        self.host = bind
        self.port = port or _free_port(bind)
        self._tmpdir: str | None = None  # ours to remove
        if dir is not None:
            self.dir = Path(dir)
        else:
            self._tmpdir = tempfile.mkdtemp(prefix="keel-redis-")
            self.dir = Path(self._tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        log_path = self.dir / f"redis-{self.port}.log"
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    exe,
                    "--port",
                    str(self.port),
                    "--bind",
                    bind,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "warning",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._finalizer = weakref.finalize(self, _stop_process, self._proc, self._tmpdir)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ping(bind, self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                output = log_path.read_text(errors="replace").strip()[-2000:]
                self.stop()
                raise RedisServerError(f"redis-server did not start on {bind}:{self.port}: {output or 'no output'}")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        self._finalizer()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ensure_local_redis(url: str) -> RedisServer | None:
    """For `keel serve`: a Redis at `url`, started here if it is ours to start.

    Something answers: None (use it). Nothing answers on a loopback host: start redis-server on
    that port and return it (the caller stops it). Nothing answers elsewhere: RedisServerError.
    """
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        if redis_answers_unix(parsed.path):
            return None
        raise RedisServerError(
            f"quotas.redis_url: nothing answers on the unix socket {parsed.path}; "
            "start Redis there, or use a redis://127.0.0.1:PORT URL and Keel starts one."
        )
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if redis_answers(host, port):
        return None
    if not _is_loopback(host):
        raise RedisServerError(
            f"quotas.redis_url: nothing answers at {host}:{port}; start Redis there (every gateway "
            "replica shares it), or point redis_url at a running Redis."
        )
    bind = "127.0.0.1" if host == "localhost" else host
    return RedisServer(port=port, bind=bind)


def redis_answers_unix(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            s.connect(path)
            return True
    except OSError:
        return False
