"""The main job (``normlab study``): run every claim and the comparison grid, then
write the report.

What it does, in order:

1. Finds the claims (:mod:`normlab.claims`, one module per claim). A claim whose
   ``requires`` do not import gets the verdict "not available" (with the missing
   names) instead of running.
2. Measures every claim and the grid as *jobs* (:mod:`normlab.executor`): each job
   replays its ``measure`` over the stored runs and asks for the runs it is missing;
   the runs of every job go to ``workers`` processes one run at a time, and the
   driver writes each result under ``out_dir/runs/`` as it comes back. A run is keyed
   by its function, every argument and a hash of normlab's code
   (:func:`normlab.claims.base.make_spec`), so a study resumed after a change of code
   or of a claim's constants recomputes exactly what the change affects, and a
   rerun of a finished study computes nothing.
3. Judges each measurement by the one protocol of :mod:`normlab.claims.protocol`
   (intervals over seeds against thresholds declared before the run) and writes
   ``out_dir/claims/<id>.json``, ``out_dir/grid.json``, ``out_dir/study.json`` (how it
   was run: budget, code hash, normlab version, machine) and the report
   (:mod:`normlab.report`). A claim whose measurement raises gets "inconclusive" with
   the error and its traceback recorded; it never stops the study.

One study at a time writes a folder: a second one on the same folder is refused while
the first runs (an advisory lock that dies with its owner).

The grid trains ``models.cnn`` (width 16, depth 3) with every normalizer at every
batch size for the SAME NUMBER OF EPOCHS, SGD with momentum 0.9 at a constant learning
rate ``base_lr * factor * batch / 32`` (the linear scaling rule, Goyal et al. 2017),
``factor`` in ``lr_factors``, on seed-drawn splits. It describes; it decides nothing.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import math
import os
import pkgutil
import platform
import shlex
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from normlab.claims.base import (
    BUDGETS,
    SCALES,
    Budget,
    Claim,
    PendingRuns,
    RunContext,
    atomic_write_json,
    code_hash,
    read_json,
)
from normlab.claims.protocol import judge
from normlab.executor import execute_jobs, start_method
from normlab.report import make_claim_plots, write_report

__all__ = ["run_study", "grid_config", "discover_claims", "select_claims", "format_claims_table",
           "StudyLocked", "GRID_NORMS", "GRID_NORMS_FULL"]

#: The normalizers of the grid at the quick and default budgets ...
GRID_NORMS = ("none", "bn", "gn", "ln", "in", "brn", "sn")
#: ... and at the full budget (attentive and online norm cost about twice BN per step).
GRID_NORMS_FULL = GRID_NORMS + ("an", "on")


def grid_config(budget: Budget) -> dict:
    """The comparison grid at ``budget`` (see the module docstring): descriptive, so it
    runs 2 seeds at the default and full budgets and 1 at the quick one."""
    full = budget.name == "full"
    return {
        "model": "cnn",
        "model_kwargs": {"width": 16, "depth": 3},
        "norms": list(GRID_NORMS_FULL if full else GRID_NORMS),
        "batch_sizes": list(budget.pick(quick=(2, 16, 128), default=(2, 8, 32, 128))),
        "base_lr": 0.05,
        "ref_batch": 32,
        "lr_factors": [1 / 3, 1.0, 3.0],
        "lr_scaling": "linear",
        "momentum": 0.9,
        "epochs": budget.pick(quick=1, default=2),
        "seeds": list(range(budget.pick(quick=1, default=2))),
    }


# --------------------------------------------------------------------------- claims


@dataclass
class _Found:
    """A claim and where a worker can import it from (None: pass the object itself)."""

    claim: Claim
    module: str | None = None


def discover_claims(log: Callable[[str], None] | None = None) -> list[_Found]:
    """Every ``normlab/claims/cNN_*.py`` module's ``CLAIM``, by number. Unlike
    :func:`normlab.claims.all_claims`, a module that fails to import is reported (a
    warning naming it) and skipped, so one broken claim cannot stop the study."""
    import normlab.claims as pkg

    found: list[_Found] = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if not (info.name.startswith("c") and info.name[1:3].isdigit()):
            continue
        name = f"{pkg.__name__}.{info.name}"
        try:
            claim = importlib.import_module(name).CLAIM
        except Exception as err:  # a half-written claim module must not stop the study
            msg = f"normlab study: claim module {name} does not load ({type(err).__name__}: " \
                  f"{err}); skipped"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            if log:
                log(f"warning: {msg}")
            continue
        found.append(_Found(claim, name))
    found.sort(key=lambda f: f.claim.number)
    return found


def select_claims(selection: Iterable | None, log=None) -> list[_Found]:
    """The claims to run: all discovered ones for None, else each item of ``selection``
    as a :class:`Claim` object, an id or a number (ValueError for an unknown one)."""
    if selection is not None and not isinstance(selection, (list, tuple, set)):
        selection = [selection]
    needs_discovery = selection is None or any(not isinstance(s, Claim) for s in selection)
    known = discover_claims(log) if needs_discovery else []
    if selection is None:
        return known
    out: list[_Found] = []
    for item in selection:
        if isinstance(item, Claim):
            out.append(_Found(item, None))
            continue
        match = [f for f in known if str(item) in (f.claim.id, str(f.claim.number))]
        if not match:
            names = ", ".join(f"{f.claim.number}:{f.claim.id}" for f in known) or "none"
            raise ValueError(f"normlab study: unknown claim {item!r}; known: {names}")
        out.append(match[0])
    seen, unique = set(), []
    for f in out:
        if f.claim.id not in seen:
            seen.add(f.claim.id)
            unique.append(f)
    ids = [f.claim.id for f in unique]
    numbers = [f.claim.number for f in unique]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"normlab study: duplicate claim numbers among {ids}")
    return sorted(unique, key=lambda f: f.claim.number)


def _claim_text(claim: Claim, scale: str = "small") -> dict:
    """The descriptive fields of a claim at ``scale``, as stored with its result. The
    notes about the small setup (how it changed, why its scale may explain a difference
    from the paper, why its interval is not half the old protocol's noise figure) are
    left out at another scale, where the claim's setup for that scale says what was cut."""
    change = claim.criterion_change
    small = scale == "small"
    return {"id": claim.id, "number": claim.number, "title": claim.title, "scale": scale,
            "statement": claim.statement, "source": claim.source,
            "setup": claim.setup_at(scale),
            "criterion": claim.criterion_text(),
            "setup_change": claim.setup_change if small else "",
            "criterion_change": {"old": change[0], "new": change[1]} if change else None,
            "scale_note": claim.scale_note if small else "",
            "width_note": claim.width_note if small else "",
            "requires": list(claim.requires)}


def _budget_dict(budget: Budget) -> dict:
    return {"name": budget.name, "step_scale": budget.step_scale, "seeds": budget.seeds,
            "decisive": budget.decisive}


def json_safe(obj):
    """``obj`` as strict JSON data: NaN/inf -> None, numpy scalars/arrays and tensors ->
    Python numbers/lists, tuples -> lists, other objects -> their repr."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return json_safe(obj.tolist())
    return repr(obj)


# --------------------------------------------------------------------------- jobs


class _ClaimJob:
    """One claim's measurement as a job of :func:`normlab.executor.execute_jobs`."""

    def __init__(self, found: _Found, budget: Budget, out: Path, data: str, workers: int,
                 log: Callable[[str], None], device: str = "cpu", scale: str = "small",
                 data_dir: str | None = None):
        self.claim = found.claim
        self.budget, self.out, self.data, self.log = budget, out, data, log
        self.ctx = RunContext(self.claim.id, budget, out, data=data, plan=bool(workers),
                              device=device, scale=scale, data_dir=data_dir,
                              log=lambda line, _id=self.claim.id: log(f"  {_id}: {line}"))
        self.error: str | None = None
        self.tb: str | None = None
        self.measured: dict | None = None
        self.started: float | None = None
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.runs_done = 0
        self.finished = False
        self.warnings: list[str] = []

    def step(self):
        if self.finished:
            return None
        if self.started is None:
            self.started = time.perf_counter()
            self.log(f"[{self.claim.number:2d}] {self.claim.id}: started ({self.claim.title})")
        self.ctx.run_files, self.ctx.runs_done = set(), 0
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                measured = self.claim.measure(self.ctx)
            if not isinstance(measured, dict):
                raise TypeError(f"measure() returned {type(measured).__name__}, not a dict")
            self.measured = json_safe(measured)
        except PendingRuns as pending:
            return pending.specs
        except Exception as err:
            self.fail(f"{type(err).__name__}: {err}", traceback.format_exc())
            return None
        finally:
            self.runs_done += self.ctx.runs_done  # inline mode computes runs in measure
            self.warnings = sorted(set(self.warnings) | {str(w.message) for w in caught})
        self.finished = True
        return None

    def fail(self, error: str, tb: str | None = None) -> None:
        if not self.finished:
            self.error, self.tb, self.finished = error, tb, True

    def count(self, stored: dict) -> None:
        self.runs_done += 1
        self.cpu_seconds += float(stored.get("cpu_seconds") or 0.0)


def _runs_reused(job) -> int:
    """Runs the job asked for that were stored before it computed them: the stored run
    files it asked for, less those it computed (a run that failed is neither)."""
    stored = sum((job.ctx.run_dir / name).exists() for name in job.ctx.run_files)
    return max(0, stored - job.runs_done)


def _record(job: _ClaimJob) -> dict:
    """The claim's record (see :mod:`normlab.report` for its keys), judged by the
    protocol, with its plots drawn."""
    claim, budget = job.claim, job.budget
    data = job.data if job.ctx.scale == "small" else f"{job.ctx.scale} scale, {job.ctx.data_dir}"
    rec = {**_claim_text(claim, job.ctx.scale), "budget": budget.name,
           "budget_detail": _budget_dict(budget), "data": data, "missing": [],
           "measured": job.measured, "verdict": "inconclusive",
           "decisive": budget.decisive, "effects": [], "reason": "", "takeaway": "",
           "error": job.error, "traceback": job.tb, "plots": [], "plot_error": None,
           "seconds": round(time.perf_counter() - (job.started or time.perf_counter()), 2),
           "cpu_seconds": round(job.cpu_seconds, 2), "runs_done": job.runs_done,
           "runs_reused": _runs_reused(job),
           "run_files": sorted(job.ctx.run_files), "warnings": job.warnings}
    if job.error is None:
        try:
            rec.update(judge(claim, job.measured, budget.decisive))
            if job.ctx.scale != "small":  # the old protocol's noise was the small setup's
                for effect in rec["effects"]:
                    effect["previous_noise"] = None
        except Exception as err:
            rec["error"] = f"{type(err).__name__}: {err}"
            rec["traceback"] = traceback.format_exc()
    if rec["error"] is not None:
        rec["verdict"], rec["decisive"] = "inconclusive", False
        rec["reason"] = f"the measurement failed ({rec['error']})"
        return json_safe(rec)
    if claim.plot is not None:
        rec["plots"], rec["plot_error"] = make_claim_plots(claim, job.measured,
                                                           job.out / "plots")
    return json_safe(rec)


def _not_available(claim: Claim, missing: list, budget: Budget, data: str,
                   scale: str = "small") -> dict:
    return _unmeasured(claim, budget, data, scale, "not available",
                       "needs " + ", ".join(missing) + ", which do not import yet", missing)


def _not_run(claim: Claim, budget: Budget, data: str, scale: str) -> dict:
    return _unmeasured(claim, budget, data, scale, "not run at this scale",
                       f"no setup at the {scale} scale in this lab (the claim has one at the "
                       f"{' and '.join(claim.scales)} scale"
                       f"{'s' if len(claim.scales) > 1 else ''})", [])


def _unmeasured(claim, budget, data, scale, verdict, reason, missing) -> dict:
    return {**_claim_text(claim, scale), "budget": budget.name,
            "budget_detail": _budget_dict(budget), "data": data, "missing": missing,
            "measured": None, "verdict": verdict, "decisive": False, "effects": [],
            "reason": reason, "takeaway": "", "error": None, "traceback": None, "plots": [],
            "plot_error": None,
            "seconds": 0.0, "cpu_seconds": 0.0, "runs_done": 0, "runs_reused": 0,
            "run_files": [], "warnings": []}


def grid_measure(ctx: RunContext, config: dict, runs: list[dict]) -> list[dict]:
    """Every grid run's summary record (one ``ctx.map`` call for all of them)."""
    from normlab.claims.design import train_run

    results = ctx.map(train_run, [{
        "model": r["model"], "norm": r["norm"], "data": config["data"],
        "batch_size": r["batch_size"], "lr": r["lr"], "steps": r["steps"], "seed": r["seed"],
        "model_kwargs": r["model_kwargs"], "train_kwargs": r["train_kwargs"], "curve": True,
    } for r in runs])
    return [_grid_record(r, res) for r, res in zip(runs, results, strict=True)]


def _grid_record(run: dict, result: dict) -> dict:
    curve = result.get("curve") or {}
    evals = result.get("evals") or {}
    # The training loss of single batches is noisy (very much so at batch 2): keep the
    # mean over at most 50 consecutive bins of the logged steps.
    steps, losses = curve.get("step", []), curve.get("loss", [])
    per_bin = max(1, math.ceil(len(steps) / 50))
    bins = [(steps[i:i + per_bin], [v for v in losses[i:i + per_bin] if v is not None])
            for i in range(0, len(steps), per_bin)]
    return {
        "norm": run["norm"], "batch_size": run["batch_size"], "lr": run["lr"],
        "lr_factor": run["lr_factor"], "seed": run["seed"], "epochs": run["epochs"],
        "steps": run["steps"], "steps_done": result.get("steps_done"),
        "final_test_acc": result.get("final_test_acc"),
        "best_test_acc": result.get("best_test_acc"),
        "final_train_loss": result.get("final_train_loss"),
        "diverged": bool(result.get("diverged", False)), "error": None,
        "seconds": result.get("wall_time_s"),
        "evals": {"step": evals.get("step", []), "test_acc": evals.get("test_acc", [])},
        "loss_curve": {"step": [st[-1] for st, vs in bins if vs],
                       "loss": [sum(vs) / len(vs) for st, vs in bins if vs]},
    }


class _GridJob(_ClaimJob):
    """The comparison grid as a job: one batch of runs, then the summary."""

    def __init__(self, config: dict, runs: list[dict], budget, out, data, workers, log,
                 device="cpu"):
        grid_claim = Claim(number=0, id="grid", title="comparison grid", statement="",
                           source="", setup="",
                           measure=lambda ctx: {"runs": grid_measure(ctx, config, runs)})
        super().__init__(_Found(grid_claim), budget, out, data, workers, log, device)
        self.started = time.perf_counter()


def grid_runs(config: dict, num_train: int) -> list[dict]:
    """Every run of the grid ``config`` for a training set of ``num_train`` samples."""
    runs = []
    for norm in config["norms"]:
        for b in config["batch_sizes"]:
            steps = max(1, int(round(config["epochs"] * (num_train // b))))
            train_kwargs = {"log_every": max(1, steps // 200), "eval_every": max(1, steps // 20),
                            "momentum": config["momentum"]}
            for factor in config["lr_factors"]:
                lr = config["base_lr"] * factor
                if config.get("lr_scaling", "linear") == "linear":
                    lr *= b / config["ref_batch"]
                for seed in config["seeds"]:
                    runs.append({"model": config["model"],
                                 "model_kwargs": dict(config.get("model_kwargs") or {}),
                                 "norm": norm, "batch_size": b, "lr": float(f"{lr:.6g}"),
                                 "lr_factor": round(factor, 6), "seed": seed,
                                 "epochs": config["epochs"], "steps": steps,
                                 "train_kwargs": train_kwargs})
    return runs


# --------------------------------------------------------------------------- the lock


class StudyLocked(RuntimeError):
    """Another study is writing the folder."""


class _FolderLock:
    """An advisory lock on ``out/.normlab-study.lock`` (``fcntl.flock``): held while a
    study writes the folder and released by the system when its owner dies, even by
    SIGKILL, so a dead owner never holds it."""

    def __init__(self, out: Path):
        self.path = out / ".normlab-study.lock"
        self.fd: int | None = None

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(self.fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise StudyLocked(f"normlab study: another study (pid {owner}) is writing "
                              f"{self.path.parent}; wait for it to finish or stop it, or "
                              "choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the lock


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------- main


def _budget_of(budget: str | Budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if budget not in BUDGETS:
        raise ValueError(f"normlab study: unknown budget {budget!r}; "
                         f"expected one of {sorted(BUDGETS)}")
    return BUDGETS[budget]


def _machine() -> dict:
    import numpy
    import torch

    from normlab import __version__

    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "normlab": __version__}


def _default_command(budget: Budget, claims, data, out_dir, workers, grid,
                     scale: str = "small", data_dir: str | None = None) -> str:
    parts = ["normlab", "study"]
    if budget.name in ("quick", "full"):
        parts.append(f"--{budget.name}")
    if scale != "small":
        parts += ["--scale", scale, "--data-dir", str(data_dir)]
    if claims:
        parts += ["--claims", *[c.id if isinstance(c, Claim) else str(c) for c in claims]]
    if data != "digits":
        parts += ["--data", data]
    if grid is False:
        parts.append("--no-grid")
    if workers != 2:
        parts += ["--workers", str(workers)]
    parts += ["--out", str(out_dir)]
    text = " ".join(shlex.quote(p) for p in parts)
    if claims is not None and not claims:
        text += "  # from Python with claims=[]: the grid only"
    return text


def _plan_jobs(found, budget, out, data, workers, grid, log, device, scale="small",
               data_dir=None):
    """The claim jobs, the records of claims that are not available or not run at this
    scale, and the grid job (the grid has no setup but the small scale's)."""
    jobs, records = [], {}
    for f in found:
        missing = f.claim.missing_requirements()
        if scale not in f.claim.scales:
            records[f.claim.id] = _not_run(f.claim, budget, data, scale)
            log(f"[{f.claim.number:2d}] {f.claim.id}: not run at this scale ({scale}; "
                f"it has a setup at: {', '.join(f.claim.scales)})")
        elif missing:
            records[f.claim.id] = _not_available(f.claim, missing, budget, data, scale)
            log(f"[{f.claim.number:2d}] {f.claim.id}: not available (missing "
                f"{', '.join(missing)})")
        else:
            jobs.append(_ClaimJob(f, budget, out, data, workers, log, device, scale, data_dir))
            continue
        atomic_write_json(out / "claims" / f"{f.claim.id}.json", records[f.claim.id])
    grid_job, gcfg = None, None
    if grid and scale != "small":
        log(f"grid: not run at this scale ({scale}; the grid is a small-scale comparison)")
    elif grid:
        gcfg = grid_config(budget)
        if isinstance(grid, dict):
            unknown = set(grid) - set(gcfg)
            if unknown:
                raise ValueError(f"normlab study: unknown grid settings {sorted(unknown)}; "
                                 f"known: {sorted(gcfg)}")
            gcfg.update(grid)
        from normlab.claims.design import split

        fit = split(data, 0)[0]
        gcfg.update(data=data, num_train=fit.num_train, num_classes=fit.num_classes)
        grid_job = _GridJob(gcfg, grid_runs(gcfg, fit.num_train), budget, out, data, workers,
                            log, device)
    return jobs, records, grid_job, gcfg


def _progress(jobs, grid_job, log, t0):
    """``on_run`` for execute_jobs: counts each computed run against its job."""
    by_file = {}
    counter = {"n": 0}

    def on_run(stored: dict) -> None:
        counter["n"] += 1
        from normlab.claims.base import RunSpec

        name = RunSpec(stored["fn"], stored["kwargs"], stored["key"]).filename
        if not by_file:
            for job in jobs + ([grid_job] if grid_job else []):
                for f in job.ctx.run_files:
                    by_file.setdefault(f, job)
        job = by_file.get(name)
        if job is None:  # asked for after the index was built
            job = next((j for j in jobs + ([grid_job] if grid_job else [])
                        if name in j.ctx.run_files), None)
            by_file.clear()
        if job is not None:
            job.count(stored)
        if counter["n"] % 50 == 0:
            log(f"  {counter['n']} runs computed ({time.perf_counter() - t0:.0f} s)")
    return on_run


def _finish_claims(jobs, records, out, log):
    for job in jobs:
        rec = _record(job)
        records[job.claim.id] = rec
        atomic_write_json(out / "claims" / f"{job.claim.id}.json", rec)
        extra = f" [error: {rec['error']}]" if rec.get("error") else ""
        log(f"[{rec['number']:2d}] {rec['id']}: {rec['verdict']} ({rec['runs_done']} runs "
            f"computed, {rec['runs_reused']} reused, {rec['cpu_seconds']:.0f} s CPU){extra}")


def _write_meta(out, budget, data, workers, found, grid, started, wall, counters, command,
                executor, device, scale="small", data_dir=None, not_run=()):
    previous = read_json(out / "study.json")
    history = previous.get("history", []) if isinstance(previous, dict) else []
    history = (history + [{"started_at": started, "wall_seconds": wall, "budget": budget.name,
                           "scale": scale,
                           "runs_done": counters["runs_done"],
                           "runs_reused": counters["runs_reused"]}])[-20:]
    from normlab import __version__

    meta = {
        "budget": budget.name, "budget_detail": _budget_dict(budget), "data": data,
        "scale": scale, "data_dir": data_dir, "not_run_at_scale": list(not_run),
        "out_dir": str(out), "workers": workers, "executor": executor, "device": device,
        "start_method": start_method() if workers else "inline",
        "claims": [f.claim.id for f in found], "grid": bool(grid) and scale == "small",
        "started_at": started, "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "wall_seconds": wall, "runs_done": counters["runs_done"],
        "runs_reused": counters["runs_reused"], "history": history, "machine": _machine(),
        "code_hash": code_hash(), "normlab_version": __version__, "command": command,
    }
    atomic_write_json(out / "study.json", meta)


def resolve_device(device: str) -> str:
    """``"cpu"`` or ``"cuda"`` for ``device`` in cpu/cuda/auto; a clear error where CUDA
    is asked for and missing."""
    import torch

    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"normlab study: --device must be cpu, cuda or auto, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("normlab study: --device cuda, but torch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    return device


#: The files of CIFAR-10's python version, which the paper scale reads from --data-dir.
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def check_scale(scale: str, data_dir: str | os.PathLike | None) -> str | None:
    """The absolute data folder of ``scale`` (None at the small scale); a ValueError of
    one line where the scale is unknown, ``data_dir`` is missing at the paper scale or
    holds no CIFAR-10 batches, or is given at the small scale."""
    if scale not in SCALES:
        raise ValueError(f"normlab study: --scale must be one of {', '.join(SCALES)}, "
                         f"got {scale!r}")
    if scale == "small":
        if data_dir is not None:
            raise ValueError("normlab study: --data-dir is read at --scale paper only; the "
                             "small scale uses the embedded datasets (--data)")
        return None
    if data_dir is None:
        raise ValueError("normlab study: --scale paper needs --data-dir DIR, the folder of "
                         f"CIFAR-10's python batches ({', '.join(CIFAR10_FILES)})")
    root = Path(data_dir).expanduser().resolve()
    for folder in (root, root / "cifar-10-batches-py"):
        if all((folder / name).is_file() for name in CIFAR10_FILES):
            return str(root)
    missing = [n for n in CIFAR10_FILES if not (root / n).is_file()]
    raise ValueError(f"normlab study: --data-dir {data_dir} holds no CIFAR-10 python batches "
                     f"(missing {', '.join(missing)}, there and in cifar-10-batches-py/)")


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"normlab study: --out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"normlab study: cannot write into {out} (permission denied)")


def run_study(
    out_dir: str | os.PathLike = "normlab-study",
    budget: str | Budget = "default",
    claims: Sequence | None = None,
    data: str = "digits",
    workers: int = 2,
    grid: bool | dict = True,
    log: Callable[[str], None] = print,
    command: str | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    device: str = "cpu",
    scale: str = "small",
    data_dir: str | os.PathLike | None = None,
) -> dict:
    """Run the claims and the comparison grid into ``out_dir`` and write the report.

    Args:
        out_dir: the study folder (created; an existing one is resumed).
        budget: "quick", "default", "full" or a :class:`Budget`.
        claims: None for every claim, else ids, numbers or :class:`Claim` objects.
        data: the dataset of the grid.
        workers: worker processes (0: run everything in this process, for debugging).
            They start by ``forkserver`` (``spawn`` where there is none), so a script
            calling this with workers > 0 needs the ``if __name__ == "__main__":`` guard.
        grid: True for :func:`grid_config`, False for no grid, or a dict overriding
            entries of :func:`grid_config` (e.g. ``{"norms": ["bn", "gn"]}``).
        log: where progress lines go.
        command: the command line shown in the report under "how to reproduce".
        executor: ``"local"`` (worker processes on this machine) or ``"ray"`` (one Ray
            task a run, on the cluster at ``ray_address`` or on a local one of
            ``workers`` CPUs; see :mod:`normlab.ray_executor`). Both give the same
            results: every run is deterministic given its arguments.
        ray_address: the Ray cluster to join (``"auto"``, ``"HOST:PORT"``); None starts
            a local one.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA where torch sees a GPU): where
            the runs train. The device is part of every run's key, and runs on CUDA
            use torch's deterministic algorithms.
        scale: ``"small"`` (every claim's setup, on the embedded datasets) or
            ``"paper"`` (the papers' setups, ResNets on CIFAR-10, for the claims that
            have one; the others are "not run at this scale", and so is the grid).
        data_dir: at the paper scale, the folder of CIFAR-10's python batches (the
            same path on every machine of a Ray cluster); it is part of the key of
            every run that reads it.

    Returns:
        A summary: ``out_dir``, ``report`` (path of index.html), ``claims`` (the
        records), ``grid`` (grid.json's content or None), ``runs_done``,
        ``runs_reused``, ``warnings`` and ``wall_seconds``.

    Raises:
        StudyLocked: another study is writing ``out_dir``.
        ValueError: a bad argument, ``out_dir`` is a file or not writable, or
            ``data_dir`` holds no CIFAR-10 batches at the paper scale.
    """
    budget = _budget_of(budget)
    data_dir = check_scale(scale, data_dir)
    device = resolve_device(device)
    if workers < 0:
        raise ValueError(f"normlab study: workers must be >= 0, got {workers}")
    out = Path(out_dir)
    _prepare_out(out)
    found = select_claims(claims, log)
    previous = signal.getsignal(signal.SIGTERM)
    in_main = _in_main_thread()
    with _FolderLock(out):
        if in_main:
            signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return _run_locked(out, budget, found, claims, data, workers, grid, log, command,
                               executor, ray_address, device, scale, data_dir)
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _run_locked(out, budget, found, claims, data, workers, grid, log, command, executor,
                ray_address, device, scale="small", data_dir=None) -> dict:
    t0 = time.perf_counter()
    started = _dt.datetime.now().isoformat(timespec="seconds")
    plan = workers > 0 or executor != "local"
    jobs, records, grid_job, gcfg = _plan_jobs(found, budget, out, data, plan, grid, log,
                                               device, scale, data_dir)
    log(f"normlab study: {len(jobs)} claim(s), {'a grid, ' if grid_job else ''}scale {scale}"
        f"{f' (data {data_dir})' if data_dir else ''}, budget {budget.name} "
        f"({budget.seeds} seeds), "
        f"{workers} worker(s) ({executor}), device {device}; code {code_hash()[:12]}")
    all_jobs = jobs + ([grid_job] if grid_job else [])
    execute_jobs(all_jobs, workers, out / "runs", on_run=_progress(jobs, grid_job, log, t0),
                 executor=executor, ray_address=ray_address)
    _finish_claims(jobs, records, out, log)
    summary_grid = None
    if grid_job is not None:
        if grid_job.error:
            raise RuntimeError(f"normlab study: the grid failed: {grid_job.error}")
        summary_grid = {"config": gcfg, "runs": grid_job.measured["runs"]}
        atomic_write_json(out / "grid.json", json_safe(summary_grid))
    counters = {"runs_done": sum(j.runs_done for j in all_jobs),
                "runs_reused": sum(_runs_reused(j) for j in all_jobs)}
    wall = round(time.perf_counter() - t0, 1)
    not_run = [r["id"] for r in records.values() if r["verdict"] == "not run at this scale"]
    _write_meta(out, budget, data, workers, found, grid, started, wall, counters,
                command or _default_command(budget, claims, data, out, workers, grid, scale,
                                            data_dir),
                executor, device, scale, data_dir, not_run)
    report_path = write_report(out, claims={f.claim.id: f.claim for f in found}, log=log)
    ordered = sorted(records.values(), key=lambda r: r["number"])
    warns = sorted({w for r in ordered for w in r.get("warnings", [])})
    return {"out_dir": str(out), "report": str(report_path), "claims": ordered,
            "grid": summary_grid, "runs_done": counters["runs_done"],
            "runs_reused": counters["runs_reused"], "warnings": warns, "wall_seconds": wall}


def format_claims_table(records: Sequence[dict], width: int = 100) -> str:
    """A plain-text table: number, verdict and claim title on one line, the reason
    wrapped under it."""
    import textwrap

    lines = [f"{'#':>3}  {'verdict':15} claim / why"]
    for r in sorted(records, key=lambda r: r["number"]):
        lines.append(f"{r['number']:>3}  {r['verdict']:15} {' '.join(r['title'].split())}")
        reason = " ".join(str(r.get("reason", "")).split())
        lines += textwrap.wrap(reason, width=width, initial_indent=" " * 21,
                               subsequent_indent=" " * 21, max_lines=4, placeholder=" …")
    return "\n".join(lines)
