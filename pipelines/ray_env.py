"""Starting or joining Ray the same way in every stage.

On a laptop ``ray.init()`` starts a local cluster by itself; under ``ray job submit`` (or with
``RAY_ADDRESS`` set) the same call joins the running cluster. Tests set ``RAY_ADDRESS`` so that every
stage, in process or in a subprocess, shares the session's one cluster.
"""
from __future__ import annotations

import os
import socket

from pipelines.config import ConfigError

CONNECT_TIMEOUT_S = float(os.environ.get("GROUNDUP_RAY_CONNECT_TIMEOUT_S", "10"))


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    check_cluster_reachable()
    from pipelines import console  # Ray's own messages: to <run>/logs/<command>.log unless --verbose

    kwargs: dict = {"log_to_driver": True, **console.ray_init_logging()}
    if not os.environ.get("RAY_ADDRESS") and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = os.environ.get("GROUNDUP_RAY_DASHBOARD", "0") == "1"
    ray.init(**kwargs)
    console.after_ray_init()


def check_cluster_reachable(timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in one line, within ``timeout_s``, when the cluster ``ray.init()`` would join does not answer.

    A stale address (``RAY_ADDRESS``, or the file a ``ray start`` left behind) otherwise makes ray.init()
    retry "Failed to connect to GCS" for minutes. An address ray.init() resolves itself (``auto``) or a
    start of a fresh local cluster is not checked.
    """
    from ray._private.services import canonicalize_bootstrap_address

    from_env = os.environ.get("RAY_ADDRESS", "")
    try:
        address = canonicalize_bootstrap_address(from_env or None)
    except Exception:  # no cluster to find, or an address ray.init() will report better itself
        return
    if not address or from_env in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError):
        source = "RAY_ADDRESS" if from_env else "the address file of a previous `ray start` (/tmp/ray)"
        fix = "unset RAY_ADDRESS" if from_env else "run `ray stop`"
        raise ConfigError(f"cannot reach the Ray cluster at {from_env or address} (from {source}) within "
                          f"{timeout_s:.0f} s: start that cluster, or {fix} to let this command start a fresh "
                          "local one") from None
