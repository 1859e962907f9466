"""cluster/: every config parses and has what its consumer needs. Fast, no cluster, no cloud.

Launcher configs are also validated with Ray's own checks (``ray-schema.json`` through
``ray.autoscaler._private.util.validate_config``, after Ray fills in its defaults) when Ray is importable,
and the RayService's ``serveConfigV2`` with Serve's own ``ServeDeploySchema``.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
LAUNCHER_CONFIGS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY_KINDS = {
    "raycluster.yaml": "RayCluster",
    "rayjob-data.yaml": "RayJob",
    "rayjob-pretrain.yaml": "RayJob",
    "rayservice.yaml": "RayService",
}
SCRIPTS = [CLUSTER / "local_cluster.sh", CLUSTER / "submit.sh"]


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _has_ray() -> bool:
    return importlib.util.find_spec("ray") is not None


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path):
    assert isinstance(_load(path), dict)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_has_what_ray_up_needs(path):
    config = _load(path)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers",
                "idle_timeout_minutes", "setup_commands", "file_mounts"):
        assert key in config, f"{path.name}: no {key}"
    assert config["provider"]["type"] in ("aws", "gcp")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node_type in types.items():
        assert "resources" in node_type and "node_config" in node_type, name
        if name != config["head_node_type"]:
            assert node_type["min_workers"] == 0, f"{name}: workers should scale from zero"
            assert 0 < node_type["max_workers"] <= config["max_workers"], name
    gpu_types = [n for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    cpu_types = [n for n, t in types.items()
                 if n != config["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu_types, f"{path.name}: no node type declares GPU resources"
    assert cpu_types, f"{path.name}: no CPU-only worker type for Ray Data"
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    setup = " ".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install -e" in setup
    if config["provider"]["type"] == "gcp":
        for name in gpu_types:
            node_config = types[name]["node_config"]
            assert node_config["guestAccelerators"][0]["acceleratorCount"] == types[name]["resources"]["GPU"]
            assert {"onHostMaintenance": "TERMINATE"} in node_config["scheduling"]


@pytest.mark.skipif(not _has_ray(), reason="ray is not installed")
@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_own_schema(path):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = _load(path)
    jsonschema.validate(config, schema)  # as written
    validate_config(prepare_config(config))  # as `ray up` sees it, defaults filled in


@pytest.mark.parametrize("name,kind", sorted(KUBERAY_KINDS.items()))
def test_kuberay_manifest_kind(name, kind):
    manifest = _load(CLUSTER / "kuberay" / name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == kind
    assert manifest["metadata"]["name"]


def _cluster_specs():
    yield "raycluster.yaml", _load(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]
    yield "rayservice.yaml", _load(CLUSTER / "kuberay" / "rayservice.yaml")["spec"]["rayClusterConfig"]


@pytest.mark.parametrize("name,spec", list(_cluster_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_cluster_autoscales_gpu_workers(name, spec):
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values()
           if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                  for c in g["template"]["spec"]["containers"])]
    assert gpu, f"{name}: no worker group with nvidia.com/gpu"
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    assert all(g["minReplicas"] == 0 for g in gpu), "GPU workers should scale from zero"


def test_rayjobs_run_the_groundup_cli_on_the_cluster():
    cluster_name = _load(CLUSTER / "kuberay" / "raycluster.yaml")["metadata"]["name"]
    for name, stage in (("rayjob-data.yaml", "data"), ("rayjob-pretrain.yaml", "pretrain")):
        spec = _load(CLUSTER / "kuberay" / name)["spec"]
        words = spec["entrypoint"].split()
        assert words[:2] == ["groundup", stage]
        assert "--run" in words
        assert spec["clusterSelector"]["ray.io/cluster"] == cluster_name
        yaml.safe_load(spec["runtimeEnvYAML"])
    pretrain = _load(CLUSTER / "kuberay" / "rayjob-pretrain.yaml")["spec"]["entrypoint"]
    assert "train.use_gpu=true" in pretrain  # the head that runs the driver has no GPU


def test_rayservice_serve_config():
    serve_config = yaml.safe_load(_load(CLUSTER / "kuberay" / "rayservice.yaml")["spec"]["serveConfigV2"])
    apps = {a["name"]: a for a in serve_config["applications"]}
    assert apps["groundup"]["import_path"] == "serving.app:app_builder"
    assert apps["groundup"]["args"]["models"]
    assert apps["groundup"]["args"]["num_gpus"] >= 1
    if importlib.util.find_spec("ray.serve") is not None:
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(serve_config)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    assert script.stat().st_mode & 0o111, f"{script.name} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("args", [[], ["bogus-stage"], ["--no-wait"], ["--frobnicate", "data"]])
def test_submit_usage_on_bad_arguments(args):
    result = subprocess.run(["bash", str(CLUSTER / "submit.sh"), "--address", "127.0.0.1:1", *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "usage" in result.stderr.lower() or "cluster/submit.sh" in result.stderr


def test_local_cluster_usage_on_bad_arguments():
    result = subprocess.run(["bash", str(CLUSTER / "local_cluster.sh"), "bogus"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "start" in result.stderr and "stop" in result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    subprocess.run(["shellcheck", "-S", "warning", str(script)], check=True)
