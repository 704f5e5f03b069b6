"""Runs the study's units of work in parallel, with the driver as the only writer.

A *job* (a claim's measurement, or the comparison grid) is stepped by calling its
``step()``: it replays the claim's ``measure`` over the stored results and either
finishes or returns the runs it still needs (:class:`normlab.claims.base.RunSpec`).
:func:`execute_jobs` sends those runs to worker processes, one run per task, writes
each result into the study folder as it comes back (atomically: the driver is the
only process that writes there) and steps a job again once all its runs are stored.
So N workers keep N runs busy across every claim at once, and a claim whose next
batch depends on the previous one (a learning rate chosen, then the seeds at it)
waits only for its own runs.

Workers start by ``forkserver`` (``spawn`` where there is none; never ``fork``, which
can hang after torch has started threads), use one torch thread each, and exit by
themselves when the driver dies (they poll its pid), so a killed study leaves no
process behind and, since workers never write, nothing is written into the folder
after the driver is gone. A run lost with its worker is retried once in a fresh
pool, then reported to its job as an error.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from normlab.claims.base import RunSpec, atomic_write_json, execute

__all__ = ["execute_jobs", "start_method", "EXECUTORS"]

#: The executors: local worker processes (the default) or a Ray cluster.
EXECUTORS = ("local", "ray")


def start_method() -> str:
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # the pid was reused by a process we may not signal
            os._exit(1)


def _init_worker(parent_pid: int) -> None:
    import torch

    # One intra-op thread per worker: the models are small and the workers are as many
    # as the cores. NORMLAB_WORKER_THREADS changes it: with more threads torch splits
    # its reductions differently, which changes results at the level of rounding only
    # (a check that verdicts do not hang on rounding); it is not part of a run's key, so
    # use it on a fresh study folder.
    torch.set_num_threads(int(os.environ.get("NORMLAB_WORKER_THREADS", "1")))
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _run_one(spec: RunSpec) -> dict:
    return execute(spec)


def _make_pool(workers: int) -> cf.ProcessPoolExecutor:
    mp = multiprocessing.get_context(start_method())
    if mp.get_start_method() == "forkserver":
        # Import the heavy modules once in the fork server, not in every worker.
        mp.set_forkserver_preload(["torch", "torch._dynamo", "sklearn.datasets",
                                   "normlab.claims.base", "normlab.claims.design",
                                   "normlab.train", "normlab.models", "normlab.data"])
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp,
                                  initializer=_init_worker, initargs=(os.getpid(),))


def _stop_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers now (Ctrl-C, SIGTERM)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()


class _Scheduler:
    """The bookkeeping of :func:`execute_jobs`: which run each job waits for."""

    def __init__(self, jobs, run_dir: Path, on_run: Callable[[dict], None]):
        self.ready = deque(jobs)
        self.waiting: dict[int, set] = {}
        self.waiters: dict[str, list] = {}
        self.specs: dict[str, RunSpec] = {}
        self.run_dir = run_dir
        self.on_run = on_run

    def step_ready(self) -> list[RunSpec]:
        """Step every ready job; return the runs no one has asked for yet."""
        new = []
        while self.ready:
            job = self.ready.popleft()
            specs = job.step()
            if not specs:
                continue
            self.waiting[id(job)] = {s.key for s in specs}
            for s in specs:
                if s.key not in self.waiters:
                    self.waiters[s.key], self.specs[s.key] = [], s
                    new.append(s)
                self.waiters[s.key].append(job)
        return new

    def stored(self, spec: RunSpec, stored: dict) -> None:
        atomic_write_json(self.run_dir / spec.filename, stored)
        self.on_run(stored)
        self._release(spec.key)

    def failed(self, spec: RunSpec, error: str) -> None:
        for job in self.waiters.get(spec.key, []):
            job.fail(f"run {spec.fn}({_short(spec.kwargs)}) failed: {error}")
        self._release(spec.key)

    def _release(self, key: str) -> None:
        for job in self.waiters.pop(key, []):
            need = self.waiting.get(id(job))
            if need is None:
                continue
            need.discard(key)
            if not need:
                del self.waiting[id(job)]
                self.ready.append(job)


def _short(kwargs: dict, limit: int = 160) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return text if len(text) <= limit else text[:limit] + "…"


def execute_jobs(jobs: Sequence, workers: int, run_dir: str | os.PathLike,
                 on_run: Callable[[dict], None] = lambda stored: None,
                 executor: str = "local", ray_address: str | None = None) -> None:
    """Step ``jobs`` until each has finished, computing their runs on ``workers``
    processes (0: in this process, one after the other). ``on_run(stored)`` is called
    after each computed run is written (for progress).

    ``executor="ray"`` sends each run to a Ray cluster instead (``ray_address``, or a
    local cluster of ``workers`` CPUs on 127.0.0.1 when None), one CPU a run; the
    results come back here and this process writes them, as with local workers.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"normlab study: unknown executor {executor!r}; expected one of "
                         f"{EXECUTORS}")
    sched = _Scheduler(jobs, Path(run_dir), on_run)
    if executor == "ray":
        from normlab.ray_executor import execute_on_ray

        execute_on_ray(sched, workers, ray_address)
        return
    if workers == 0:
        _execute_inline(sched)
        return
    attempts: dict[str, int] = {}
    todo = sched.step_ready()
    while todo:
        lost = _pool_round(sched, todo, workers, attempts)
        todo = lost + sched.step_ready()


def _execute_inline(sched: _Scheduler) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        todo = sched.step_ready()
        while todo:
            for spec in todo:
                try:
                    sched.stored(spec, execute(spec))
                except Exception as err:
                    sched.failed(spec, f"{type(err).__name__}: {err}")
            todo = sched.step_ready()
    finally:
        torch.set_num_threads(threads)


def _pool_round(sched: _Scheduler, todo: list, workers: int, attempts: dict) -> list:
    """Run ``todo`` and everything it unlocks in one pool; return the runs lost with a
    dead worker (to retry in a fresh pool)."""
    lost: list[RunSpec] = []
    pool = _make_pool(workers)
    futures = {}
    try:
        for spec in todo:
            futures[pool.submit(_run_one, spec)] = spec
        while futures:
            done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                spec = futures.pop(fut)
                _collect(sched, fut, spec, attempts, lost)
            if not lost:  # a broken pool takes no new work
                for spec in sched.step_ready():
                    futures[pool.submit(_run_one, spec)] = spec
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)
    return lost


def _collect(sched, fut, spec, attempts, lost) -> None:
    try:
        stored = fut.result()
    except cf.process.BrokenProcessPool as err:
        attempts[spec.key] = attempts.get(spec.key, 0) + 1
        if attempts[spec.key] < 2:
            lost.append(spec)
        else:
            sched.failed(spec, f"worker process died ({err})")
        return
    except Exception as err:
        sched.failed(spec, f"{type(err).__name__}: {err}")
        return
    sched.stored(spec, stored)
