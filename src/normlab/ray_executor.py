"""The study's runs on a Ray cluster (``normlab study --executor ray``).

Ray is an optional dependency (``pip install normlab[cluster]``). Each run of the
study becomes one Ray task asking for one CPU (and one GPU with ``device="cuda"``);
the driver keeps stepping the claims' jobs (:mod:`normlab.executor`) and writes every
result that comes back, so the study folder has one writer and the resume and the
content-keyed cache work as with local workers. A task lost with a dead worker is
retried by Ray (``max_retries``), then reported to its claim as an error.

Without an address a local cluster is started on 127.0.0.1 with ``workers`` CPUs and
stopped at the end; with one (``--ray-address HOST:PORT`` or ``auto``) the driver joins
that cluster and leaves it running.
"""

from __future__ import annotations

from normlab.claims.base import execute

__all__ = ["execute_on_ray", "MAX_RETRIES"]

#: How often Ray re-runs a task whose worker died.
MAX_RETRIES = 2


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("normlab study --executor ray needs Ray: pip install "
                          "'normlab[cluster]' (or pip install ray)") from None
    return ray


def _run_task(spec) -> dict:
    import torch

    torch.set_num_threads(1)
    return execute(spec)


def execute_on_ray(sched, workers: int, address: str | None) -> None:
    """Step ``sched``'s jobs, computing their runs as Ray tasks (see the module
    docstring)."""
    ray = _ray()
    started_here = address is None
    if started_here:
        ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        _loop(ray, sched)
    finally:
        if started_here:
            ray.shutdown()


def _loop(ray, sched) -> None:
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(_run_task)
    refs = {}
    todo = sched.step_ready()
    while todo or refs:
        for spec in todo:
            gpus = 1 if spec.device == "cuda" else 0  # a run on CUDA asks Ray for a GPU
            refs[task.options(num_gpus=gpus).remote(spec)] = spec
        done, _ = ray.wait(list(refs), num_returns=1)
        for ref in done:
            spec = refs.pop(ref)
            try:
                stored = ray.get(ref)
            except Exception as err:  # the task raised, or its worker died MAX_RETRIES times
                sched.failed(spec, f"{type(err).__name__}: {err}")
            else:
                sched.stored(spec, stored)
        todo = sched.step_ready()
