"""Starting or joining Ray the same way in every stage.

On a laptop ``ray.init()`` starts a local cluster by itself; under ``ray job submit`` (or with
``RAY_ADDRESS`` set) the same call joins the running cluster. Tests set ``RAY_ADDRESS`` so that every
stage, in process or in a subprocess, shares the session's one cluster.
"""
from __future__ import annotations

import logging
import os


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"log_to_driver": True, "configure_logging": True, "logging_level": logging.WARNING}
    if not os.environ.get("RAY_ADDRESS") and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = os.environ.get("GROUNDUP_RAY_DASHBOARD", "0") == "1"
    ray.init(**kwargs)
