"""Registrations as background jobs: what the admin API starts and reads.

A registration hashes every byte of the weights (minutes for a large model), so a gateway never
runs one itself: it starts `python -m serving.model_registry.jobs JOB_FILE PARENT_PID`, a child
process that dies with the gateway (PR_SET_PDEATHSIG), runs at a lower CPU priority than the
data path, and keeps the job's state in MODELS_DIR/.jobs/ID.json (written whole: a temporary
file, then a rename). Every gateway replica that shares the models directory answers for every
job by reading that file; while the job runs, the child touches it every few seconds, so a job
whose process vanished (its node went down) reads as failed on any replica.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ConfigDict, Field, field_validator

from serving.config import ConfigError, default_models_dir
from serving.model_registry.manifest import RegistrationError, check_name
from serving.model_registry.memory import VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
from serving.schema import Strict

JOB_ID = re.compile(r"reg-[0-9a-f]{32}")  # checked before a job id becomes a file name
JOBS_DIR = ".jobs"  # under the models directory; not a model name (those start with a letter or digit)
MAX_RUNNING = 2  # per gateway replica: each job reads the disk flat out and keeps a core hashing
JOB_NICE = 10  # below the gateway and the engines (nice 0), above nothing that matters
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0  # a running job's file untouched this long: its process is gone
KEEP_FINISHED_S = 7 * 86400  # finished jobs' files are removed when a job starts this much later
_SOURCE_ROOT = Path(__file__).resolve().parents[2]  # what `-m serving...` needs on the path


class RegistrationRequest(Strict):
    """The body of POST /v1/admin/models/register: `keel models register`'s arguments."""

    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as given: no "true" for true

    name: str = Field(description="The model's name (letters, digits, '.', '_', '-').")
    version: str = Field(description="The version to register, as `--version`.")
    path: str = Field(
        min_length=1, max_length=4096, description="The weights directory on the serving nodes, absolute."
    )
    chat: bool = Field(True, description="Require a chat template (false: `--no-chat`).")
    gpu_memory_gib: float | None = Field(
        None, gt=0, le=65536, description="Refuse weights that do not fit a GPU of this many GiB."
    )
    tensor_parallel_size: int = Field(1, ge=1, le=1024)
    gpu_memory_utilization: float = Field(VLLM_DEFAULT_GPU_MEMORY_UTILIZATION, gt=0, le=1)

    @field_validator("name", "version")
    @classmethod
    def _file_name(cls, value: str, info) -> str:
        return check_name("model name" if info.field_name == "name" else "version", value)


class TooManyRegistrations(Exception):
    """This replica already runs its share of registrations."""


def check_weights_dir(path: str) -> None:
    """What can be refused before a job starts: the path must be an absolute directory."""
    if not os.path.isabs(path):
        raise RegistrationError(
            f"{path}: not an absolute path (the weights directory as the serving "
            "nodes see it, e.g. /models/support-bot-ft3)"
        )
    if not os.path.exists(path):
        raise RegistrationError(f"{path}: no such directory on this node")
    if not os.path.isdir(path):
        raise RegistrationError(f"{path}: not a directory (give the model's directory, not a file in it)")


class RegistrationJobs:
    """One gateway replica's registrations: starts jobs (at most max_running at once), reaps its
    own children, and reads any job's file."""

    def __init__(self, models_dir: Path | None = None, max_running: int = MAX_RUNNING):
        self.models_dir = Path(models_dir) if models_dir else default_models_dir()
        self.max_running = max_running
        self._children: dict[str, tuple[subprocess.Popen, Path]] = {}  # job id -> (process, job file)

    def start(self, request: RegistrationRequest) -> dict:
        """Write the job's file and start its process; the job as first written.

        Call it from the thread that lives as long as the gateway: the kernel sends a child its
        parent-death signal when the *thread* that started it exits."""
        if self.running() >= self.max_running:
            raise TooManyRegistrations(
                f"this gateway replica is already running {self.max_running} registrations (each reads "
                "and hashes every byte of its weights); retry when one has finished"
            )
        jobs = self.models_dir / JOBS_DIR
        jobs.mkdir(parents=True, exist_ok=True)
        _remove_old_jobs(jobs)
        job_id = f"reg-{uuid.uuid4().hex}"
        file = jobs / f"{job_id}.json"
        job = {
            "id": job_id,
            "object": "model.registration",
            "status": "running",
            **request.model_dump(),
            "created": _now(),
            "finished": None,
        }
        write_job(file, job)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_ENGINE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SOURCE_ROOT), env.get("PYTHONPATH")]))
        with open(jobs / f"{job_id}.log", "wb") as log:  # the child's warnings, and a crash's traceback
            proc = subprocess.Popen(
                [sys.executable, "-m", "serving.model_registry.jobs", str(file), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                close_fds=True,
            )
        self._children[job_id] = (proc, file)
        return job

    def running(self) -> int:
        """How many of this replica's jobs are running; a finished child is reaped, and its job
        marked failed if the child ended without saying how it went."""
        for job_id, (proc, file) in list(self._children.items()):
            code = proc.poll()
            if code is not None:
                del self._children[job_id]
                _fail_if_unfinished(file, _exit_reason(code))
        return len(self._children)

    def read(self, job_id: str) -> dict | None:
        """The job with this id, from its file; None if there is none (or the id is malformed)."""
        if not JOB_ID.fullmatch(job_id):
            return None
        file = self.models_dir / JOBS_DIR / f"{job_id}.json"
        try:
            job = json.loads(file.read_text())
            age = time.time() - file.stat().st_mtime
        except FileNotFoundError:
            return None
        if job.get("status") == "running" and age > STALE_AFTER_S:
            job.update(
                status="failed",
                error=f"the registration's process stopped without a result (no word "
                f"from it for {age:.0f} s: its gateway replica or node went away); register again",
            )
        return job

    def stop(self) -> None:
        """End this replica's jobs (the gateway is stopping); their files say so."""
        for job_id, (proc, file) in list(self._children.items()):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            del self._children[job_id]
            _fail_if_unfinished(file, "stopped: its gateway replica stopped")


def write_job(file: Path, job: dict) -> None:
    """Replace FILE whole: a reader on any node sees the old state or the new one, never half."""
    tmp = file.with_name(f".{file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(job, indent=1))
    os.replace(tmp, file)


def _fail_if_unfinished(file: Path, why: str) -> None:
    try:
        job = json.loads(file.read_text())
    except (OSError, ValueError):
        return
    if job.get("status") == "running":
        job.update(
            status="failed",
            finished=_now(),
            error=f"the registration's process ended without a result ({why}; its log: "
            f"{file.with_suffix('.log')}); register again",
        )
        write_job(file, job)


def _exit_reason(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return f"killed by {name}" + (" (out of memory?)" if code == -signal.SIGKILL else "")
    return f"exit status {code}"


def _remove_old_jobs(jobs: Path) -> None:
    cutoff = time.time() - KEEP_FINISHED_S
    for f in jobs.glob("reg-*"):
        try:
            if f.stat().st_mtime < cutoff:  # running jobs are touched every few seconds
                f.unlink()
        except FileNotFoundError:
            pass


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- the child process ---------------------------------------------------------------------------


def run_job(file: Path) -> dict:
    """Register what the job file asks for and write the outcome into it; the final job."""
    from serving.model_registry.cli import refusal_text, registered_text
    from serving.model_registry.store import register_version

    job = json.loads(file.read_text())
    job.update(pid=os.getpid(), host=socket.gethostname())
    write_job(file, job)
    done = threading.Event()
    threading.Thread(target=_heartbeat, args=(file, done), daemon=True, name="keel-job-heartbeat").start()
    req = RegistrationRequest.model_validate({k: job[k] for k in RegistrationRequest.model_fields})

    def progress(weight_file: Path, size: int) -> None:
        job.update(hashing=weight_file.name, hashing_bytes=size)
        write_job(file, job)

    try:
        found, new = register_version(
            file.parent.parent,
            req.name,
            req.version,
            req.path,
            chat=req.chat,
            gpu_memory_gib=req.gpu_memory_gib,
            tensor_parallel_size=req.tensor_parallel_size,
            gpu_memory_utilization=req.gpu_memory_utilization,
            progress=progress,
        )
        job.update(status="succeeded", message=registered_text(found, new), result=_summary(found, new))
    except (RegistrationError, ConfigError) as e:
        job.update(status="failed", error=refusal_text(req.name, req.version, e))
    except Exception as e:  # noqa: BLE001 - an unreadable disk, a full one: said in the job, traced in the log
        traceback.print_exc()
        job.update(status="failed", error=f"registering {req.name}@{req.version} failed: {type(e).__name__}: {e}")
    for key in ("hashing", "hashing_bytes"):
        job.pop(key, None)
    job["finished"] = _now()
    done.set()
    write_job(file, job)
    return job


def _summary(found, new: bool) -> dict:
    m = found.manifest
    return {
        "ref": found.ref,
        "new": new,
        "manifest": str(found.file),
        "path": m.path,
        "architectures": list(m.architectures),
        "parameter_count": m.parameter_count,
        "dtypes": dict(m.dtypes),
        "bytes": sum(f.size for f in m.files),
        "digest": m.digest,
        "files": [f.model_dump() for f in m.files],
        "memory": m.memory.model_dump(mode="json"),
    }


def _heartbeat(file: Path, done: threading.Event) -> None:
    while not done.wait(HEARTBEAT_S):
        try:
            os.utime(file)
        except OSError:
            pass


def _lower_priority() -> None:
    """Hashing yields the CPU to the gateway and engines on the same node."""
    try:
        os.nice(max(0, JOB_NICE - os.nice(0)))
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    from serving.engine.server import die_with_parent

    file, parent = sys.argv[1:] if argv is None else argv
    die_with_parent(int(parent))  # before anything slow: a job never outlives its gateway
    _lower_priority()
    return 0 if run_job(Path(file))["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
