"""Shared fixtures. One local Ray cluster per test session, with two nodes (a head and a worker) so
that every integration test also exercises work spread across nodes. Subprocesses (the CLI) join it
through RAY_ADDRESS instead of starting their own."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"head": 1}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, resources={"worker_node": 1})
    cluster.wait_for_nodes()
    previous = os.environ.get("RAY_ADDRESS")
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
