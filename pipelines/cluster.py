"""Joining or starting the Ray cluster every workflow step runs on."""

from __future__ import annotations

import os
import warnings


def init_ray(config) -> None:
    """Join the cluster we were submitted to (RAY_ADDRESS) or the configured `config.ray.address` ("local" starts a
    new local cluster), else let Ray find one started with `ray start` on this machine or start a local one with
    `config.ray.num_cpus`. Idempotent: the first step of a process decides."""
    join_ray(config.ray.address, config.ray.num_cpus)


def join_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """init_ray for commands whose only Ray settings are flags."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"log_to_driver": True, "include_dashboard": False}
    with warnings.catch_warnings():
        # Lance warns at every fork once it is imported; Ray starts its processes by fork + exec, and no Lance code
        # runs in between, so the warning would only be noise in every curate and train command's output.
        warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
