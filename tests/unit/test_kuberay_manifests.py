"""deploy/kuberay/rayservice.yaml read as KubeRay and Kubernetes read it (no cluster, no Ray).

What KubeRay does with it was read in ray-operator's source (common/pod.go, common/service.go,
rayservice_controller.go); each test names the behaviour it relies on.
"""

from __future__ import annotations

import inspect
import json
import os
from importlib import import_module
from pathlib import Path

import pytest
import yaml

from serving.config import load_config
from serving.kuberay import serve_config, serve_config_of, write_serve_config
from serving.launcher import CONTROL_LOOP_ENV

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "kuberay" / "rayservice.yaml"
KEEL_CONFIG = REPO / "deploy" / "kuberay" / "keel.yaml"
DOCS = list(yaml.safe_load_all(MANIFEST.read_text()))
RAYSERVICE = next(d for d in DOCS if d["kind"] == "RayService")
CLUSTER = RAYSERVICE["spec"]["rayClusterConfig"]
HEAD = CLUSTER["headGroupSpec"]["template"]
WORKERS = [g["template"] for g in CLUSTER["workerGroupSpecs"]]
SERVE = yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay's RayContainerIndex


def test_serve_config_is_the_keel_config_rendered(monkeypatch):
    """Hand edits to serveConfigV2 would be lost at the next render; a config edit not rendered
    would never reach the cluster."""
    monkeypatch.delenv("KEEL_MODELS_DIR", raising=False)
    cfg = load_config(KEEL_CONFIG, check_engine_args=False)
    assert RAYSERVICE["spec"]["serveConfigV2"] == serve_config(cfg), (
        "run: keel kuberay serve-config deploy/kuberay/keel.yaml --write deploy/kuberay/rayservice.yaml"
    )


def test_serve_config_parses_with_serve_schema_and_builds_keel_applications():
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(SERVE)
    assert schema.proxy_location == "Disabled"  # Keel's gateway owns :8000, not Ray's proxy
    names = [a.name for a in schema.applications]
    assert names == ["keel", "keel-model-llama-3-8b"]  # one application per model
    built = {}
    for app in schema.applications:
        module, attr = app.import_path.split(":")
        graph = getattr(import_module(module), attr)(app.args)
        built[app.name] = {d.name: d for d in build_app(graph, name=app.name).deployments}
        # Serve rejects an override of a deployment the application does not have.
        assert {d.name for d in app.deployments} <= set(built[app.name])
    assert set(built["keel"]) == {"gateway", "endpoint-registry"}
    gateway_resources = built["keel"]["gateway"].ray_actor_options["resources"]
    assert gateway_resources == {"keel-gateway": 1}
    engine = built["keel-model-llama-3-8b"]["engine-llama-3-8b"]
    assert engine.ray_actor_options["num_gpus"] == 2


def test_the_gateway_runs_where_the_serve_port_is():
    """The custom resource that pins the gateway is given to the head only, whose container
    declares the port named `serve` (KubeRay's serve Service and head health check use it)."""
    port = SERVE["applications"][0]["args"]["server"]["port"]
    head_ports = {p["name"]: p["containerPort"] for p in ray_container(HEAD)["ports"]}
    assert head_ports["serve"] == port
    assert "keel-gateway" in CLUSTER["headGroupSpec"]["rayStartParams"]["resources"]
    for group in CLUSTER["workerGroupSpecs"]:
        assert "keel-gateway" not in json.dumps(group["rayStartParams"])
        assert "serve" not in {p.get("name") for p in ray_container(group["template"]).get("ports", [])}


def test_traffic_goes_through_kuberays_serve_service_to_the_named_port_only():
    """KubeRay replaces the selector with its own (this cluster, ray.io/serve=true) and keeps a
    user port of the same name: the named target port leaves out the workers, which are Ready
    but run no gateway. No Service of our own selects a head (it would bypass the upgrade's
    traffic switch)."""
    ports = RAYSERVICE["spec"]["serveService"]["spec"]["ports"]
    assert ports == [{"name": "serve", "port": 8000, "targetPort": "serve"}]
    assert "selector" not in RAYSERVICE["spec"]["serveService"]["spec"]
    assert [d["kind"] for d in DOCS if d["kind"] == "Service"] == []
    assert RAYSERVICE["spec"]["upgradeStrategy"]["type"] == "NewCluster"


def test_no_container_command_so_kuberay_builds_ray_start():
    """A `command` is prepended to KubeRay's `ulimit ...; ray start ...` with `&&`."""
    for template in [HEAD, *WORKERS]:
        assert "command" not in ray_container(template) and "args" not in ray_container(template)


def test_workers_have_a_readiness_probe_that_asks_no_gateway():
    """KubeRay injects, for RayService workers without one, a probe that greps
    localhost:8000/-/healthz, where workers run no gateway: they would never be Ready."""
    for template in WORKERS:
        probe = ray_container(template)["readinessProbe"]
        assert probe["httpGet"] == {"path": "/api/healthz", "port": 52365}


def test_pods_get_the_serve_control_loop_keel_serve_sets():
    for template in [HEAD, *WORKERS]:
        env = {e["name"]: e["value"] for e in ray_container(template).get("env", [])}
        assert {k: env.get(k) for k in CONTROL_LOOP_ENV} == CONTROL_LOOP_ENV


def test_the_weights_claim_is_declared_read_only_many_and_mounted_where_manifests_point():
    claims = {d["metadata"]["name"]: d for d in DOCS if d["kind"] == "PersistentVolumeClaim"}
    weights = load_config(KEEL_CONFIG, check_engine_args=False)
    path = SERVE["applications"][1]["args"]["weights_path"]
    assert weights.models["llama-3-8b"].weights == "llama-3-8b-instruct"
    for template in [HEAD, *WORKERS]:
        vols = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = [m for m in ray_container(template)["volumeMounts"] if "persistentVolumeClaim" in vols[m["name"]]]
        assert mounts, "every pod mounts the weights (the head: the gateway's tokenizers)"
        for m in mounts:
            claim = vols[m["name"]]["persistentVolumeClaim"]["claimName"]
            assert set(claims[claim]["spec"]["accessModes"]) & {"ReadOnlyMany", "ReadWriteMany"}
            assert m["readOnly"] and path.startswith(m["mountPath"] + "/")


@pytest.mark.parametrize(
    "doc, kind",
    [
        (HEAD, "V1PodTemplateSpec"),
        *[(w, "V1PodTemplateSpec") for w in WORKERS],
        (RAYSERVICE["spec"]["serveService"], "V1Service"),
        *[(d, "V1PersistentVolumeClaim") for d in DOCS if d["kind"] != "RayService"],
    ],
)
def test_kubernetes_objects_parse_with_the_kubernetes_client_and_lose_no_field(doc, kind):
    """The client ignores keys it does not know, so a typo shows as a field lost on the way
    back: what it serializes must be what the manifest says."""
    from kubernetes.client import ApiClient

    class Response:  # what older clients take: a response with .data
        data = json.dumps(doc)

    client = ApiClient()
    if "content_type" in inspect.signature(client.deserialize).parameters:
        obj = client.deserialize(Response.data, kind, "application/json")
    else:
        obj = client.deserialize(Response(), kind)
    assert client.sanitize_for_serialization(obj) == json.loads(json.dumps(doc))


def test_dockerfile_installs_what_kuberay_probes_use_and_finds_manifests():
    text = (REPO / "Dockerfile.gpu").read_text()
    apt = next(line for line in text.splitlines() if "apt-get install" in line)
    assert " wget " in apt  # KubeRay's exec probes: wget ... | grep success
    assert "ENV KEEL_MODELS_DIR=/app/models" in text and "COPY models ./models" in text


def test_write_serve_config_replaces_only_the_block(tmp_path):
    f = tmp_path / "rs.yaml"
    f.write_text("# keep me\nspec:\n  serveConfigV2: |\n    old: 1\n\n    older: 2\n  rayClusterConfig:\n    x: 1\n")
    assert write_serve_config(f, "applications: []\nproxy_location: Disabled\n")
    assert f.read_text() == (
        "# keep me\nspec:\n  serveConfigV2: |\n    applications: []\n    proxy_location: Disabled\n"
        "  rayClusterConfig:\n    x: 1\n"
    )
    assert not write_serve_config(f, "applications: []\nproxy_location: Disabled\n")
    doc = "kind: RayService\n" + f.read_text().split("\n", 1)[1]
    assert serve_config_of(doc) == "applications: []\nproxy_location: Disabled\n"


def test_serve_config_prints_only_yaml_on_stdout():
    """So `keel kuberay serve-config keel.yaml > serve.yaml` works: vLLM, which checks the engine
    arguments, logs to stdout."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "kuberay", "serve-config", str(KEEL_CONFIG)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout) == SERVE
