"""Shared fixtures. One local Ray cluster per test session, with two nodes (a head and a worker) so
that every integration test also exercises work spread across nodes. Subprocesses (the CLI) join it
through RAY_ADDRESS instead of starting their own."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def pytest_collection_modifyitems(config, items):
    """Tests that use the session's Serve deployment run last. Its replicas keep their CPU shares for the
    rest of the session, and a 2-worker training run started after it would wait for CPUs forever (a
    starved Ray Train run hangs rather than fails)."""
    items.sort(key=lambda item: "serving_app" in getattr(item, "fixturenames", ()))  # stable: order kept otherwise


@pytest.fixture(scope="session")
def object_store():
    """An S3-compatible object store for the session: moto's standalone server (a real HTTP S3 API
    in its own process). The AWS_* variables point every S3 client at it (pyarrow reads
    AWS_ENDPOINT_URL), and they are set before the Ray cluster starts so its workers inherit them.
    Yields the name of an empty bucket."""
    import subprocess
    import sys
    import time

    import httpx

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(endpoint, timeout=2)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the moto S3 server did not start")
            time.sleep(0.2)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="groundup-test", AWS_SECRET_ACCESS_KEY="groundup-test",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("groundup-test")
    yield "groundup-test"
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster(object_store):
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.ray_env import dashboard_kwargs

    # The dashboard (State API) is on, at an address every process of the cluster inherits: Ray Train
    # frees a stopped Tune trial's workers only once the State API answers (see ray_env.dashboard_kwargs).
    # No RAY_ADDRESS while the nodes start, so none of their workers inherits one naming another cluster.
    previous = os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"head": 1}, **dashboard_kwargs()},
    )
    cluster.add_node(num_cpus=2, resources={"worker_node": 1})
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address, log_to_driver=True)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous


@pytest.fixture(scope="session")
def builtin_tokenizer(tmp_path_factory):
    """A small tokenizer trained once on the built-in corpus, for tests that need real token ids."""
    from model.tokenizer import train_tokenizer
    from pipelines.data.builtin import iter_builtin_documents

    texts = [doc["text"] for doc in iter_builtin_documents()]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tokenizer"), vocab_size=2048)


# ---- a data stage run and a pretraining run, built once and shared by every stage's tests --------
PRETRAIN_OVERRIDES = (
    "model=1m", "sequence_length=64", "seed=0",
    "train.num_workers=2", "train.precision.dtype=fp32", "train.length.steps=8",
    "train.batch.micro_batch_size=2", "train.batch.global_batch_tokens=512",  # 8 seqs: 2 micro x 2 accum x 2
    "train.optimizer.lr=3e-3", "train.schedule.warmup_steps=1",
    "train.checkpoint.every_steps=4", "train.checkpoint.keep=2",
    "train.eval.every_steps=4", "train.eval.max_rows=16", "train.eval.samples=1", "train.eval.sample_tokens=8",
    "train.log_every=4",
)


@pytest.fixture(scope="session")
def builtin_data_dir(ray_cluster, tmp_path_factory):
    """The data stage's output for the built-in corpus (1024-token vocabulary, 64-token rows, exact dedup
    only): ``<tmp>/data``. Read-only for tests; link it into a run directory with :func:`run_with_data`."""
    from pipelines.config import build_config
    from pipelines.data.stage import Config, run

    root = tmp_path_factory.mktemp("builtin-data")
    run(build_config(Config, overrides=[f"run={root}", "tokenizer.vocab_size=1024", "pack.sequence_length=64",
                                        "dedup.near=false"]))
    return root / "data"


def run_with_data(tmp_path_factory, data_dir, name: str):
    """A fresh run directory whose ``data/`` is the shared data stage output (a symlink)."""
    run = tmp_path_factory.mktemp(name)
    (run / "data").symlink_to(data_dir)
    return run


@pytest.fixture(scope="session")
def pretrained_run(builtin_data_dir, tmp_path_factory):
    """(run directory, manifest) of an uninterrupted ZeRO-0 pretraining run on the shared data
    (PRETRAIN_OVERRIDES: preset 1m, 2 workers, 8 steps, fp32). ``<run>/pretrain/model`` is its export."""
    from pipelines.config import build_config
    from pipelines.pretrain import Config, run

    directory = run_with_data(tmp_path_factory, builtin_data_dir, "pretrained")
    config = build_config(Config, overrides=[f"run={directory}", *PRETRAIN_OVERRIDES, "train.zero.stage=0"])
    return directory, run(config)


# ---- serving fixtures (shared with the UI's browser tests) ---------------------------------------
@pytest.fixture(scope="session")
def serving_checkpoint(tmp_path_factory, builtin_tokenizer):
    """A tiny real checkpoint (preset "1m", untrained weights) written with save_checkpoint."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.llama import Transformer

    torch.manual_seed(0)
    model = Transformer(preset("1m", vocab_size=builtin_tokenizer.vocab_size))
    return save_checkpoint(model, tmp_path_factory.mktemp("serving") / "tiny", builtin_tokenizer)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, timeout_s: float = 240.0) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not healthy after {timeout_s}s")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def serving_app(ray_cluster, serving_checkpoint, tmp_path_factory):
    """`groundup serve`'s deployment on the session cluster, on a free port, serving the tiny checkpoint
    as models "tiny" and "tiny-2" (plus the UI at /ui when ui/app.py exists). Also deploys a second API
    application at /secure with API keys ["test-key-1", "test-key-2"] and a rate limit of 5/minute.

    Yields a namespace: base_url (http://127.0.0.1:PORT), api_url (base_url + "/v1"), secure_api_url,
    ui_url (or None), config (serving.app.Config), models, api_keys, rate_limit_per_minute."""
    from types import SimpleNamespace

    from ray import serve

    from serving.app import Config, build_application, deploy, ui_available

    port = _free_port()
    database_url = f"sqlite:///{tmp_path_factory.mktemp('ui-store') / 'preferences.db'}"
    config = Config(models=[f"tiny={serving_checkpoint}", f"tiny-2={serving_checkpoint}"], port=port,
                    num_cpus=0.5, max_batch_size=8, default_max_tokens=32, max_tokens_per_request=4096, ui=ui_available(),
                    database_url=database_url, block=False)
    urls = deploy(config)
    secure = config.model_copy(update={"models": config.models[:1], "api_keys": ["test-key-1", "test-key-2"],
                                       "rate_limit_per_minute": 5})
    serve.run(build_application(secure), name="groundup-secure", route_prefix="/secure", blocking=False)
    base_url = f"http://127.0.0.1:{port}"
    _wait_healthy(f"{base_url}/health")
    _wait_healthy(f"{base_url}/secure/health")
    yield SimpleNamespace(base_url=base_url, api_url=f"{base_url}/v1", secure_api_url=f"{base_url}/secure/v1",
                          ui_url=urls.get("ui") if config.ui else None, config=config, models=["tiny", "tiny-2"],
                          api_keys=["test-key-1", "test-key-2"], rate_limit_per_minute=5)
    serve.shutdown()


@pytest.fixture(scope="session")
def serving_base_url(serving_app) -> str:
    return serving_app.base_url


@pytest.fixture(scope="session")
def openai_client(serving_app):
    """The official openai client pointed at the serving_app's API (no retries)."""
    import openai

    return openai.OpenAI(base_url=serving_app.api_url, api_key="unused", max_retries=0, timeout=120)
