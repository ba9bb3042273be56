"""Where a rollout's state lives between looks and across restarts: `<state_dir>/<model>.json`.

Written whole after every transition (a tmp file, then os.replace: a crash leaves the old file or
the new one, never half of one). `<model>.lock` is flocked by the process driving the rollout,
so two controllers never drive one model; `<model>.request` carries `keel rollout promote` or
`abort` from another shell to that process (a file of its own, so the controller's next write of
the state cannot lose it).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from serving.rollout.decide import PROMOTED, RolloutState

PROMOTE_NOW, ABORT = "promote", "abort"


class RolloutBusy(RuntimeError):
    """Another process drives this rollout."""


class StateStore:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def _path(self, model: str, suffix: str) -> Path:
        return self.dir / (quote(model, safe="") + suffix)

    def load(self, model: str) -> RolloutState | None:
        path = self._path(model, ".json")
        try:
            return RolloutState.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a rollout state file ({e}); move it away to start over") from None

    def save(self, state: RolloutState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(state.model, ".json")
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(state.to_dict(), f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def models(self) -> list[str]:
        return sorted(s.model for p in self.dir.glob("*.json") if (s := self.load_path(p)) is not None)

    def peek(self, model: str) -> RolloutState | None:
        """The model's state, or None when it has none or its file is damaged (`load` says which)."""
        return self.load_path(self._path(model, ".json"))

    def load_path(self, path: Path) -> RolloutState | None:
        try:
            return RolloutState.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    # -- one driver per model ------------------------------------------------------------------

    def lock(self, model: str, wait_s: float = 0.0) -> int:
        """Hold the model's lock for this process's life (or until unlock); RolloutBusy if it is
        still taken after `wait_s` (a driver waits a little: `driven()` takes it for an instant)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(model, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RolloutBusy(f"the rollout of {model} is driven by {holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        return fd

    @staticmethod
    def unlock(fd: int) -> None:
        os.close(fd)  # releases the flock

    def driven(self, model: str) -> bool:
        try:
            self.unlock(self.lock(model))
        except RolloutBusy:
            return True
        return False

    # -- requests from another shell -----------------------------------------------------------

    def request(self, model: str, action: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(model, ".request")
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(action)
        os.replace(tmp, path)

    def take_request(self, model: str) -> str | None:
        path = self._path(model, ".request")
        try:
            action = path.read_text().strip()
        except FileNotFoundError:
            return None
        path.unlink(missing_ok=True)
        return action if action in (PROMOTE_NOW, ABORT) else None


def undone_promotions(store: StateStore, current, new) -> list[str]:
    """Why applying `new` (a StackState) over `current` would quietly undo a rollout that was
    promoted: the stack serves the promoted weights and the config still names the ones before
    (nobody set `weights:` after the promotion). One line per model; [] when nothing is undone."""
    problems = []
    for model, now in current.models.items():
        state = store.peek(model)  # a damaged file guards nothing; `keel rollout status` names it
        want = new.models.get(model)
        if state is None or state.phase != PROMOTED or want is None:
            continue
        serving, asked = now.args.get("weights"), want.args.get("weights")
        if serving == state.to_version and asked == state.from_version:
            when = datetime.fromtimestamp(state.updated_at, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            problems.append(
                f"models.{model}.weights: the stack serves {serving}, promoted by `keel rollout` "
                f"at {when}; this config says {asked}, which would roll {model} back"
            )
    return problems
