"""`groundup serve` as an operator meets it: a used port is refused, resources are checked before deploying,
an unreachable Ray address fails in one line, and a model whose engine dies fails /health at once, ends
its open requests with OpenAI-shaped errors and is replaced."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipelines.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def groundup(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=environment, cwd=REPO)


def test_a_second_serve_on_a_used_port_is_refused_in_one_line(serving_app, serving_checkpoint):
    result = groundup("serve", "--model", f"other={serving_checkpoint}", "--port", str(serving_app.config.port),
                      "--no-ui")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert f"port {serving_app.config.port}" in line and "groundup (at /)" in line and "--replace" in line


def test_serve_on_another_port_of_a_cluster_already_serving_is_refused(serving_app, serving_checkpoint):
    from conftest import _free_port

    from serving.app import Config, check_port

    with pytest.raises(ConfigError, match=f"already runs on this cluster at port {serving_app.config.port}"):
        check_port(Config(models=[f"x={serving_checkpoint}"], port=_free_port(), block=False))


def test_resources_are_checked_before_deploying_and_two_models_fit_on_two_cpus(ray_cluster, serving_checkpoint):
    from serving.app import Config, check_resources, required_resources

    two = Config(models=[f"a={serving_checkpoint}", f"b={serving_checkpoint}"], block=False)
    assert required_resources(two)["CPU"] <= 2 and required_resources(two)["GPU"] == 0  # the defaults
    greedy = two.model_copy(update={"num_cpus": 40.0})
    with pytest.raises(ConfigError) as err:
        check_resources(greedy)
    message = str(err.value)
    assert "not enough CPUs" in message and "num_cpus=40" in message and "\n" not in message
    with pytest.raises(ConfigError, match="not enough GPUs.*num_gpus"):
        check_resources(two.model_copy(update={"num_gpus": 1.0}))
    check_resources(greedy.model_copy(update={"check_resources": False}))  # autoscaling clusters opt out


def test_an_unreachable_ray_address_fails_in_one_line(serving_checkpoint):
    from conftest import _free_port

    started = time.monotonic()
    result = groundup("serve", "--model", f"x={serving_checkpoint}", "--port", str(_free_port()), "--no-ui",
                      env={"RAY_ADDRESS": "127.0.0.1:1", "GROUNDUP_RAY_CONNECT_TIMEOUT_S": "5"})
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "127.0.0.1:1" in line and "RAY_ADDRESS" in line
    assert time.monotonic() - started < 90


def test_votes_default_to_the_served_models_run_directory(tmp_path, serving_checkpoint):
    import shutil

    from serving.app import Config

    run = tmp_path / "run"
    shutil.copytree(serving_checkpoint, run / "sft" / "model")
    (run / "sft" / "manifest.json").write_text("{}")
    config = Config(models=[f"chat={run / 'sft' / 'model'}"], block=False)
    assert config.resolved_database_url() == f"sqlite:///{run.resolve() / 'ui' / 'preferences.db'}"
    explicit = Config(models=[f"chat={run / 'sft' / 'model'}"], run=str(tmp_path / "elsewhere"), block=False)
    assert explicit.resolved_database_url() == f"sqlite:///{(tmp_path / 'elsewhere').resolve() / 'ui' / 'preferences.db'}"


def _wait(predicate, timeout_s: float, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval_s)


def test_a_dead_engine_fails_health_at_once_ends_requests_with_errors_and_is_replaced(serving_app):
    """Kill tiny-2's engine mid-stream: the stream ends with an error event (no odd finish_reason), a new
    request gets an OpenAI-shaped 503, /health says which model is down within seconds, and Serve replaces
    the replica (health check) so tiny-2 answers again; tiny is untouched throughout."""
    from ray import serve

    handle = serve.get_deployment_handle("model-tiny-2", app_name="groundup")
    before = handle.info.remote().result(timeout_s=60)
    assert before["engine_alive"]
    body = {"model": "tiny-2", "prompt": "Once upon a time", "max_tokens": 220, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{serving_app.api_url}/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))  # generating
        os.kill(before["engine_pid"], signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in rest if line != "data: [DONE]"]
    assert rest[-1] == "data: [DONE]" and "error" in events[-1]
    assert events[-1]["error"]["type"] == "server_error" and "Error" not in events[-1]["error"]["message"]
    assert all(c.get("finish_reason") in (None, "stop", "length") for e in events for c in e.get("choices", []))

    refused = httpx.post(f"{serving_app.api_url}/completions", timeout=60,
                         json={"model": "tiny-2", "prompt": "x", "max_tokens": 2})
    if refused.status_code != 200:  # unless Serve already replaced the replica
        assert refused.status_code in (500, 503) and refused.json()["error"]["type"] == "server_error"

    health = _wait(lambda: (r := httpx.get(f"{serving_app.base_url}/health", timeout=30)).status_code == 503 and r,
                   timeout_s=15, interval_s=0.2)
    assert health.json()["status"] == "unavailable" and health.json()["models"]["tiny"] == "ok"
    assert health.json()["models"]["tiny-2"] != "ok"
    assert httpx.post(f"{serving_app.api_url}/completions", timeout=60,
                      json={"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 200

    _wait(lambda: httpx.get(f"{serving_app.base_url}/health", timeout=30).status_code == 200, timeout_s=240)
    after = handle.info.remote().result(timeout_s=60)
    assert after["engine_alive"] and after["engine_pid"] != before["engine_pid"]
    again = httpx.post(f"{serving_app.api_url}/completions", timeout=60,
                       json={"model": "tiny-2", "prompt": "x", "max_tokens": 2, "ignore_eos": True})
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 2
