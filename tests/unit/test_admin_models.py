"""The admin API of the model registry through the real gateway: admin keys only, strict bodies,
registration in a child process whose job any gateway reads from the models directory."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx

from serving.gateway.server import Gateway, GatewaySettings
from serving.gateway.stages import Pipeline, default_stages
from serving.model_registry.jobs import JOB_ID, JOBS_DIR, RegistrationJobs
from tests.unit.fake_engine import FakeEngine
from tests.unit.model_registry_fixtures import blocking_model, edit_json
from tests.unit.test_policy_gateway import ADMIN_KEY, APP_KEY, Harness, error_of, policy

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
REGISTER = "/v1/admin/models/register"
JOB_WAIT_S = 120  # a job imports vLLM (seconds), on 2 shared cores beside the rest of the suite


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 4 * JOB_WAIT_S))


class Admin(Harness):
    """A gateway with tenants (acme has an app key and an admin key) registering into BASE."""

    def __init__(self, tmp_path: Path, base: Path):
        super().__init__(policy(tmp_path), {"demo": FakeEngine()})
        self.base = base

    async def __aenter__(self):
        await super().__aenter__()
        self.gw.registrations.models_dir = self.base
        return self

    async def register(self, **body):
        return await self.client.post(REGISTER, json=body, headers=ADMIN)

    async def finished(self, job_id: str, client: httpx.AsyncClient | None = None) -> dict:
        """The job once it has succeeded or failed."""
        deadline = time.monotonic() + JOB_WAIT_S
        while True:
            resp = await (client or self.client).get(f"{REGISTER}/{job_id}", headers=ADMIN)
            assert resp.status_code == 200, resp.text
            job = resp.json()
            if job["status"] != "running" or time.monotonic() > deadline:
                return job
            await asyncio.sleep(0.2)


def test_admin_model_routes_refuse_no_key_401_and_an_app_key_403_on_the_audit_trail(tmp_path, models_base):
    routes = [("GET", "/v1/admin/models"), ("POST", REGISTER), ("GET", f"{REGISTER}/reg-{'0' * 32}")]

    async def go():
        async with Admin(tmp_path, models_base) as h:
            out = []
            for method, path in routes:
                for key in (None, APP_KEY):
                    headers = {"authorization": f"Bearer {key}"} if key else {}
                    resp = await h.client.request(method, path, headers=headers, json={})
                    out.append((path, resp.status_code, error_of(resp)["code"] if key else None))
            return out, h.audit_records()

    out, records = run(go())
    assert out == [(p, s, code) for _, p in routes for s, code in ((401, None), (403, "admin_only"))]
    assert [(r["path"], r["status"]) for r in records] == [(p, s) for p, s, _ in out]
    assert not (models_base / JOBS_DIR).exists()


def test_registration_bodies_are_checked_strictly_400_naming_the_field(tmp_path, models_base, model_dir):
    a_file = model_dir / "config.json"
    ok = {"name": "m", "version": "1", "path": str(model_dir)}
    cases = [
        ({"version": "1", "path": str(model_dir)}, "name", "`name` is required"),
        ({**ok, "paths": "/x"}, "paths", "`paths` is not a field of a registration (fields: name, version, path"),
        ({**ok, "name": "../etc"}, "name", "use letters, digits"),
        ({**ok, "version": "1/2"}, "version", "use letters, digits"),
        ({**ok, "name": "m" * 129}, "name", "at most 128"),
        ({**ok, "path": "weights/m"}, "path", "weights/m: not an absolute path"),
        ({**ok, "path": str(a_file)}, "path", f"{a_file}: not a directory"),
        ({**ok, "path": str(tmp_path / "nope")}, "path", "no such directory on this node"),
        ({**ok, "path": "/" + "a" * 5000}, "path", "at most 4096 characters"),
        ({**ok, "path": 7}, "path", "valid string"),
        ({**ok, "chat": "yes"}, "chat", "valid boolean"),
        ({**ok, "gpu_memory_gib": 0}, "gpu_memory_gib", "greater than 0"),
        ({**ok, "gpu_memory_gib": "80"}, "gpu_memory_gib", "valid number"),
        ({**ok, "gpu_memory_gib": 1e9}, "gpu_memory_gib", "less than or equal to 65536"),
        ({**ok, "tensor_parallel_size": 0}, "tensor_parallel_size", "greater than or equal to 1"),
        ({**ok, "tensor_parallel_size": 1.5}, "tensor_parallel_size", "valid integer"),
        ({**ok, "tensor_parallel_size": 4096}, "tensor_parallel_size", "less than or equal to 1024"),
        ({**ok, "gpu_memory_utilization": 1.5}, "gpu_memory_utilization", "less than or equal to 1"),
        ({**ok, "gpu_memory_utilization": True}, "gpu_memory_utilization", "valid number"),
    ]

    async def go():
        async with Admin(tmp_path, models_base) as h:
            out = [(await h.register(**body)) for body, _, _ in cases]
            raw = [await h.client.post(REGISTER, content=c, headers=ADMIN) for c in (b"{nope", b"[1]", b"")]
            return out, raw

    out, raw = run(go())
    for (body, param, text), resp in zip(cases, out):
        assert resp.status_code == 400, (body, resp.text)
        err = error_of(resp)
        assert (err["param"], err["type"]) == (param, "invalid_request_error") and text in err["message"], err
    assert [(r.status_code, error_of(r)["code"]) for r in raw] == [
        (400, "invalid_json"),
        (400, "invalid_body"),
        (400, "invalid_body"),
    ]
    assert not (models_base / JOBS_DIR).exists(), "a refused body starts no job"


def test_a_registration_runs_in_a_child_process_and_any_gateway_reads_its_job(tmp_path, models_base, model_dir):
    async def go():
        async with Admin(tmp_path, models_base) as h:
            started = await h.register(name="m", version="1", path=str(model_dir), gpu_memory_gib=80)
            job = await h.finished(started.json()["id"])
            # Another gateway replica sharing the models directory (open: no tenants) answers too.
            other = Gateway(
                GatewaySettings(port=0),
                ["demo"],
                Pipeline(default_stages(["demo"])),
                registrations=RegistrationJobs(models_base),
            )
            await other.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{other.port}", timeout=10) as c:
                    seen = await h.finished(job["id"], c)
                    listed = (await c.get("/v1/admin/models")).json()
            finally:
                await other.stop()
            return started, job, seen, listed

    started, job, seen, listed = run(go())
    first = started.json()
    assert started.status_code == 202 and JOB_ID.fullmatch(first["id"])
    assert started.headers["location"] == f"{REGISTER}/{first['id']}"
    assert {k: first[k] for k in ("status", "name", "version", "path", "gpu_memory_gib")} == {
        "status": "running",
        "name": "m",
        "version": "1",
        "path": str(model_dir),
        "gpu_memory_gib": 80,
    }
    assert job["status"] == "succeeded", job
    assert job["pid"] != os.getpid()  # hashed in a child process, not the gateway's
    result = job["result"]
    assert result["ref"] == "m@1" and result["new"] is True and result["architectures"] == ["LlamaForCausalLM"]
    assert result["manifest"] == str(models_base / "m" / "versions" / "1.yaml")
    assert Path(result["manifest"]).is_file()
    sizes = {f["name"]: f["size"] for f in result["files"]}
    assert sizes["model.safetensors"] == (model_dir / "model.safetensors").stat().st_size
    assert result["bytes"] == sum(sizes.values())
    assert result["memory"]["gpu_memory_gib"] == 80 and result["memory"]["headroom_bytes_per_gpu"] > 0
    assert job["message"].startswith("registered m@1: LlamaForCausalLM, 2,229,504 parameters")
    assert seen == job
    [m] = listed["data"]
    assert m["latest"] == "1" and [(v["ref"], v["state"]) for v in m["versions"]] == [("m@1", "registered")]


def test_a_truncated_safetensors_job_fails_naming_the_file_as_the_cli_does(tmp_path, models_base, model_dir):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1000])

    async def go():
        async with Admin(tmp_path, models_base) as h:
            started = await h.register(name="m", version="1", path=str(model_dir))
            return started, await h.finished(started.json()["id"])

    started, job = run(go())
    assert started.status_code == 202 and job["status"] == "failed" and "result" not in job
    assert job["error"].startswith("refused to register m@1:\n")
    assert (
        f"{weights}: truncated: its header describes {len(data):,} bytes, the file has {len(data) - 1000:,}"
        in job["error"]
    )
    assert not (models_base / "m").exists()


def test_registering_a_version_again_same_bytes_succeeds_other_bytes_fail_naming_the_file(
    tmp_path, models_base, two_versions
):
    v1, v2 = two_versions  # m@1 and m@2 registered already
    edit_json(v1 / "generation_config.json", top_p=0.5)

    async def go():
        async with Admin(tmp_path, models_base) as h:
            same = await h.register(name="m", version="2", path=str(v2))
            other = await h.register(name="m", version="1", path=str(v1))
            return [await h.finished(r.json()["id"]) for r in (same, other)]

    same, other = run(go())
    assert same["status"] == "succeeded" and same["result"]["new"] is False
    assert same["message"].startswith("m@2 is already registered with these bytes")
    assert other["status"] == "failed" and "m@1 is already registered with other bytes" in other["error"]
    assert f"{v1 / 'generation_config.json'}: differs" in other["error"]


def test_unknown_or_malformed_job_ids_are_404(tmp_path, models_base):
    async def go():
        async with Admin(tmp_path, models_base) as h:
            ids = [f"reg-{'0' * 32}", "reg-..%2F..%2Fpolicy", "reg-..", "reg-" + "A" * 32, "x" * 300]
            return [await h.client.get(f"{REGISTER}/{i}", headers=ADMIN) for i in ids]

    for resp in run(go()):
        err = error_of(resp)
        assert resp.status_code == 404 and err["code"] == "job_not_found" and err["type"] == "not_found_error"


def test_more_registrations_than_the_limit_are_429_and_stopping_the_gateway_ends_them(
    tmp_path, models_base, demo_weights
):
    path = str(blocking_model(tmp_path, demo_weights))

    async def go():
        async with Admin(tmp_path, models_base) as h:
            started = [await h.register(name="m", version=str(i), path=path) for i in range(3)]
            running = [(await h.client.get(f"{REGISTER}/{r.json()['id']}", headers=ADMIN)).json() for r in started[:2]]
        return started, running

    started, running = run(go())
    assert [r.status_code for r in started] == [202, 202, 429]
    err = error_of(started[2])
    assert err["code"] == "too_many_registrations" and "already running 2 registrations" in err["message"]
    assert started[2].headers["retry-after"] == "30"
    assert [j["status"] for j in running] == ["running", "running"]
    ended = RegistrationJobs(models_base)
    for r in started[:2]:
        job = ended.read(r.json()["id"])
        assert job["status"] == "failed" and "its gateway replica stopped" in job["error"]
