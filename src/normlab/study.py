"""The main job (``normlab study``): run every claim and the comparison grid, then
write the report.

What it does, in order:

1. Finds the claims (:mod:`normlab.claims`, one module per claim). A claim whose
   ``requires`` do not import gets the verdict "not available" (with the missing
   names) instead of running.
2. Runs each remaining claim's ``measure`` -> ``judge`` -> ``plot`` in a worker
   process, and every run of the comparison grid (normalizer x batch size x learning
   rate x seed) as its own task, over ``workers`` processes (``forkserver`` start
   method, or ``spawn`` where there is none: never ``fork``, which can hang after torch
   has started threads; each worker uses one torch thread). A claim that raises gets
   "inconclusive" with the error and its traceback recorded; it never stops the study.
3. Writes ``out_dir/claims/<id>.json`` per claim, ``out_dir/grid.json``,
   ``out_dir/study.json`` (how it was run) and the report (:mod:`normlab.report`).

Resumable: every unit of work is stored by :class:`normlab.claims.RunContext` under
``out_dir/runs/`` (written atomically), so a study killed half-way redoes only the
missing runs. A finished claim's result is reused as is when it was measured with the
same budget, data, criterion and claim code (a digest of its module's source) and all
its run files are still there and readable;
otherwise the claim is measured again (its stored runs are reused, so only the missing
ones are computed). A corrupt file is reported with a warning naming it and redone.
A rerun of a finished study therefore only rewrites the report.

The grid trains ``models.cnn`` (width 16, depth 3) with every normalizer at every
batch size for the SAME NUMBER OF EPOCHS (so small batches take many more steps than
large ones), SGD with momentum 0.9 at a constant learning rate ``base_lr * factor *
batch / 32`` (the linear scaling rule, Goyal et al. 2017), ``factor`` in
``lr_factors`` (1/3, 1, 3 around ``base_lr = 0.05``), one run per seed of the budget.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import hashlib
import importlib
import inspect
import math
import multiprocessing
import os
import pkgutil
import platform
import shlex
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from normlab.claims.base import (
    BUDGETS,
    VERDICTS,
    Budget,
    Claim,
    RunContext,
    _key_to_filename,
    atomic_write_json,
    read_json,
)
from normlab.report import make_claim_plots, write_report

__all__ = ["run_study", "grid_config", "discover_claims", "select_claims", "format_claims_table",
           "GRID_NORMS", "GRID_NORMS_FULL"]

#: The normalizers of the grid at the quick and default budgets ...
GRID_NORMS = ("none", "bn", "gn", "ln", "in", "brn", "sn")
#: ... and at the full budget (attentive and online norm cost about twice BN per step).
GRID_NORMS_FULL = GRID_NORMS + ("an", "on")


def grid_config(budget: Budget) -> dict:
    """The comparison grid at ``budget`` (see the module docstring).

    Measured single-thread CPU cost on "digits": about 14 s per learning rate per seed
    and epoch for the 7 norms at batches (2, 16, 128), 17 s at (2, 8, 32, 128): quick
    about 45 s of CPU, default about 3.5 minutes.
    """
    return {
        "model": "cnn",
        "model_kwargs": {"width": 16, "depth": 3},
        "norms": list(budget.pick(quick=GRID_NORMS, default=GRID_NORMS, full=GRID_NORMS_FULL)),
        "batch_sizes": list(budget.pick(quick=(2, 16, 128), default=(2, 8, 32, 128),
                                        full=(2, 4, 8, 16, 32, 64, 128))),
        "base_lr": 0.05,
        "ref_batch": 32,
        "lr_factors": [1 / 3, 1.0, 3.0],
        "lr_scaling": "linear",
        "momentum": 0.9,
        "epochs": budget.pick(quick=1, default=2, full=6),
        "seeds": list(range(budget.seeds)),
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


def _claim_text(claim: Claim) -> dict:
    """The descriptive fields of a claim, as stored with its result."""
    return {"id": claim.id, "number": claim.number, "title": claim.title,
            "statement": claim.statement, "source": claim.source, "setup": claim.setup,
            "criterion": claim.criterion, "takeaway": claim.takeaway,
            "requires": list(claim.requires)}


def _code_sha1(claim: Claim) -> str | None:
    """A digest of the source files of the claim's measure and judge functions: a stored
    result is re-judged (its runs reused) when the claim's code changed."""
    digest = hashlib.sha1()
    try:
        for fn in (claim.measure, claim.judge):
            digest.update(Path(inspect.getsourcefile(fn)).read_bytes())
    except (TypeError, OSError):
        return None
    return digest.hexdigest()


def _budget_dict(budget: Budget) -> dict:
    return {"name": budget.name, "step_scale": budget.step_scale, "seeds": budget.seeds}


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


# --------------------------------------------------------------------------- workers


@dataclass
class _TrackingContext(RunContext):
    """A RunContext that remembers the keys a claim used (to check them on resume)."""

    keys_used: list = field(default_factory=list)

    def run(self, key, fn):
        self.keys_used.append(key)
        return super().run(key, fn)


_QUEUE = None  # the worker's channel to the main process (None: running inline)
_DATASETS: dict = {}  # datasets loaded in this worker, shared by its tasks


def _init_worker(queue) -> None:
    global _QUEUE
    _QUEUE = queue
    import torch

    # One intra-op thread per worker: these models are small, and the workers are as
    # many as the cores.
    torch.set_num_threads(1)


def _emit(kind: str, payload) -> None:
    if _QUEUE is not None:
        _QUEUE.put((kind, payload))
    elif kind == "log":
        print(payload, flush=True)


def _context(claim_id, budget, out_dir, data) -> _TrackingContext:
    ctx = _TrackingContext(claim_id, budget, Path(out_dir), data=data,
                           log=lambda line, _id=claim_id: _emit("log", f"  {_id}: {line}"))
    ctx._datasets = _DATASETS
    return ctx


def _claim_task(ref, budget: Budget, out_dir: str, data: str) -> dict:
    """Measure, judge and plot one claim; write and return its record (never raises)."""
    claim = importlib.import_module(ref).CLAIM if isinstance(ref, str) else ref
    _emit("start", claim.id)
    out = Path(out_dir)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    record = {**_claim_text(claim), "budget": budget.name, "budget_detail": _budget_dict(budget),
              "data": data, "code_sha1": _code_sha1(claim), "missing": [], "measured": None,
              "verdict": "inconclusive",
              "reason": "", "error": None, "traceback": None, "plots": [], "plot_error": None}
    ctx = _context(claim.id, budget, out_dir, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            measured = claim.measure(ctx)
            if not isinstance(measured, dict):
                raise TypeError(f"measure() returned {type(measured).__name__}, not a dict")
            record["measured"] = json_safe(measured)
            verdict, reason = claim.judge(measured)
            if verdict not in VERDICTS[:3]:
                raise ValueError(f"judge() returned verdict {verdict!r}, expected one of "
                                 f"{VERDICTS[:3]}")
            record["verdict"], record["reason"] = verdict, str(reason)
        except Exception as err:
            record["verdict"] = "inconclusive"
            record["error"] = f"{type(err).__name__}: {err}"
            record["reason"] = f"the measurement failed ({record['error']})"
            record["traceback"] = traceback.format_exc()
        record["seconds"] = round(time.perf_counter() - wall0, 2)
        record["cpu_seconds"] = round(time.process_time() - cpu0, 2)
        if record["error"] is None and claim.plot is not None:
            record["plots"], record["plot_error"] = make_claim_plots(claim, record["measured"],
                                                                     out / "plots")
    record["runs_done"], record["runs_reused"] = ctx.runs_done, ctx.runs_reused
    record["run_files"] = sorted({_key_to_filename(k) for k in ctx.keys_used})
    record["warnings"] = sorted({str(w.message) for w in caught})
    atomic_write_json(out / "claims" / f"{claim.id}.json", record)
    _emit("finish", claim.id)
    return record


def _grid_task(run: dict, budget: Budget, out_dir: str, data: str) -> dict:
    """Train one grid configuration (cached) and return its summary record."""
    ctx = _context("grid", budget, out_dir, data)
    cpu0 = time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = ctx.train(model=run["model"], norm=run["norm"], data=data,
                               batch_size=run["batch_size"], lr=run["lr"], steps=run["steps"],
                               seed=run["seed"], train_kwargs=run["train_kwargs"],
                               model_kwargs=run["model_kwargs"], tag="grid")
            error = None
        except Exception as err:
            result, error = {}, f"{type(err).__name__}: {err}"
    curve = result.get("curve") or {}
    evals = result.get("evals") or {}
    # The training loss of single batches is noisy (very much so at batch 2): keep the
    # mean over at most 50 consecutive bins of the logged steps.
    steps, losses = curve.get("step", []), curve.get("loss", [])
    per_bin = max(1, math.ceil(len(steps) / 50))
    bins = [(steps[i:i + per_bin], [v for v in losses[i:i + per_bin] if v is not None])
            for i in range(0, len(steps), per_bin)]
    loss_curve = {"step": [st[-1] for st, vs in bins if vs],
                  "loss": [sum(vs) / len(vs) for st, vs in bins if vs]}
    record = {
        "norm": run["norm"], "batch_size": run["batch_size"], "lr": run["lr"],
        "lr_factor": run["lr_factor"], "seed": run["seed"], "epochs": run["epochs"],
        "steps": run["steps"], "steps_done": result.get("steps_done"),
        "final_test_acc": result.get("final_test_acc"),
        "best_test_acc": result.get("best_test_acc"),
        "final_train_loss": result.get("final_train_loss"),
        "diverged": bool(result.get("diverged", False)), "error": error,
        "seconds": result.get("wall_time_s"),
        # CPU of this call: the training's when it ran now, ~0 when it was stored before.
        "cpu_seconds_now": round(time.process_time() - cpu0, 3),
        "evals": {"step": evals.get("step", []), "test_acc": evals.get("test_acc", [])},
        "loss_curve": loss_curve,
    }
    return {"record": json_safe(record), "runs_done": ctx.runs_done,
            "runs_reused": ctx.runs_reused, "warnings": sorted({str(w.message) for w in caught})}


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
                lr = float(f"{lr:.6g}")
                for seed in config["seeds"]:
                    runs.append({"model": config["model"],
                                 "model_kwargs": dict(config.get("model_kwargs") or {}),
                                 "norm": norm, "batch_size": b,
                                 "lr": lr, "lr_factor": round(factor, 6), "seed": seed,
                                 "epochs": config["epochs"], "steps": steps,
                                 "train_kwargs": train_kwargs})
    return runs


# --------------------------------------------------------------------------- main


def _reusable(record, claim: Claim, budget: Budget, data: str, out: Path) -> bool:
    """Whether a stored claim record can stand: finished without error, with this budget,
    data and criterion, and every run file it used present and readable (a corrupt one
    is reported by read_json with a warning naming it)."""
    if not isinstance(record, dict) or record.get("error") or record.get("missing"):
        return False
    if record.get("verdict") not in VERDICTS[:3] or "measured" not in record:
        return False
    if record.get("budget_detail") != _budget_dict(budget) or record.get("data") != data:
        return False
    if record.get("criterion") != claim.criterion or record.get("code_sha1") != _code_sha1(claim):
        return False
    ok = True
    for name in record.get("run_files", []):
        stored = read_json(out / "runs" / claim.id / name)  # warns when corrupt
        if not (isinstance(stored, dict) and "result" in stored and "key" in stored):
            ok = False
    return ok


def _start_method() -> str:
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def _machine() -> dict:
    import numpy
    import torch

    from normlab import __version__

    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "normlab": __version__}


def _default_command(budget: Budget, claims, data, out_dir, workers, grid) -> str:
    parts = ["normlab", "study"]
    if budget.name in ("quick", "full"):
        parts.append(f"--{budget.name}")
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


def run_study(
    out_dir: str | os.PathLike = "normlab-study",
    budget: str | Budget = "default",
    claims: Sequence | None = None,
    data: str = "digits",
    workers: int = 2,
    grid: bool | dict = True,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> dict:
    """Run the claims and the comparison grid into ``out_dir`` and write the report.

    Args:
        out_dir: the study folder (created; an existing one is resumed).
        budget: "quick", "default", "full" or a :class:`Budget`.
        claims: None for every claim, else ids, numbers or :class:`Claim` objects.
        data: the dataset of the grid and of the claims that let the user choose.
        workers: worker processes (0: run everything in this process, for debugging).
            They start by ``forkserver`` (``spawn`` where there is none), so a script
            calling this with workers > 0 needs the ``if __name__ == "__main__":`` guard.
        grid: True for :func:`grid_config`, False for no grid, or a dict overriding
            entries of :func:`grid_config` (e.g. ``{"norms": ["bn", "gn"]}``).
        log: where progress lines go.
        command: the command line shown in the report under "how to reproduce".

    Returns:
        A summary: ``out_dir``, ``report`` (path of index.html), ``claims`` (the
        records), ``grid`` (grid.json's content or None), ``runs_done``,
        ``runs_reused``, ``warnings`` and ``wall_seconds``.
    """
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise ValueError(f"normlab study: unknown budget {budget!r}; "
                             f"expected one of {sorted(BUDGETS)}")
        budget = BUDGETS[budget]
    if workers < 0:
        raise ValueError(f"normlab study: workers must be >= 0, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    started = _dt.datetime.now().isoformat(timespec="seconds")
    found = select_claims(claims, log)
    seen_warnings: list[str] = []

    def warn(msg: str) -> None:
        if msg not in seen_warnings:
            seen_warnings.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log(f"warning: {msg}")

    # Which claims to measure, which to reuse, which are not available.
    records: dict[str, dict] = {}
    to_run: list[_Found] = []
    for f in found:
        c = f.claim
        missing = c.missing_requirements()
        path = out / "claims" / f"{c.id}.json"
        if missing:
            rec = {**_claim_text(c), "budget": budget.name, "budget_detail": _budget_dict(budget),
                   "data": data, "missing": missing, "measured": None,
                   "verdict": "not available", "reason": "needs " + ", ".join(missing)
                   + ", which do not import yet", "error": None, "traceback": None,
                   "plots": [], "plot_error": None, "seconds": 0.0, "cpu_seconds": 0.0,
                   "runs_done": 0, "runs_reused": 0, "run_files": [], "warnings": []}
            atomic_write_json(path, rec)
            records[c.id] = rec
            log(f"[{c.number:2d}] {c.id}: not available (missing {', '.join(missing)})")
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stored = read_json(path)
            reuse = _reusable(stored, c, budget, data, out)
        for w in caught:
            warn(str(w.message))
        if reuse:
            if any(stored.get(k) != v for k, v in _claim_text(c).items()):
                stored.update(_claim_text(c))  # refresh the words; the numbers stand
                atomic_write_json(path, stored)
            records[c.id] = stored
            log(f"[{c.number:2d}] {c.id}: {stored['verdict']} (stored result reused)")
        else:
            to_run.append(f)

    # The grid's runs.
    gcfg = None
    runs: list[dict] = []
    if grid:
        gcfg = grid_config(budget)
        if isinstance(grid, dict):
            unknown = set(grid) - set(gcfg)
            if unknown:
                raise ValueError(f"normlab study: unknown grid settings {sorted(unknown)}; "
                                 f"known: {sorted(gcfg)}")
            gcfg.update(grid)
        from normlab import data as data_mod

        ds = data_mod.load(data, seed=0)
        gcfg["data"], gcfg["num_train"], gcfg["num_classes"] = data, ds.num_train, ds.num_classes
        runs = grid_runs(gcfg, ds.num_train)

    tasks = [("claim", f.claim.id, (f.module or f.claim, budget, str(out), data), f)
             for f in to_run]
    tasks += [("grid", i, (r, budget, str(out), data), None) for i, r in enumerate(runs)]
    if tasks:
        log(f"normlab study: {len(to_run)} claim(s) to measure, {len(records)} done or not "
            f"available, {len(runs)} grid runs; budget {budget.name}, data {data}, "
            f"{workers} worker(s)")
    grid_records: list[dict | None] = [None] * len(runs)
    counters = {"runs_done": 0, "runs_reused": 0}
    done_claims = len(records)
    n_claims = len(found)
    grid_done = 0

    def on_result(task, result, err) -> None:
        nonlocal done_claims, grid_done
        kind, name, args, f = task
        if kind == "claim":
            if err is not None:  # the worker died (or could not unpickle the claim)
                c = f.claim
                result = {**_claim_text(c), "budget": budget.name,
                          "budget_detail": _budget_dict(budget), "data": data, "missing": [],
                          "measured": None, "verdict": "inconclusive",
                          "reason": f"the measurement failed ({err})", "error": err,
                          "traceback": None, "plots": [], "plot_error": None, "seconds": None,
                          "cpu_seconds": None, "runs_done": 0, "runs_reused": 0,
                          "run_files": [], "warnings": []}
                atomic_write_json(out / "claims" / f"{c.id}.json", result)
            records[name] = result
            done_claims += 1
            for w in result.get("warnings", []):
                warn(w)
            counters["runs_done"] += result.get("runs_done", 0)
            counters["runs_reused"] += result.get("runs_reused", 0)
            extra = f" [error: {result['error']}]" if result.get("error") else ""
            log(f"[{result['number']:2d}] {name}: {result['verdict']} in "
                f"{result.get('seconds') or 0:.1f} s ({result.get('cpu_seconds') or 0:.1f} s CPU, "
                f"{result.get('runs_done', 0)} runs done, {result.get('runs_reused', 0)} reused)"
                f" ({done_claims}/{n_claims}){extra}")
        else:
            if err is not None:
                r = args[0]
                result = {"record": {**{k: r[k] for k in ("norm", "batch_size", "lr",
                                                         "lr_factor", "seed", "epochs",
                                                         "steps")},
                                     "final_test_acc": None, "diverged": False, "error": err,
                                     "seconds": None},
                          "runs_done": 0, "runs_reused": 0, "warnings": []}
            grid_records[name] = result["record"]
            for w in result["warnings"]:
                warn(w)
            counters["runs_done"] += result["runs_done"]
            counters["runs_reused"] += result["runs_reused"]
            grid_done += 1
            if grid_done == len(runs) or grid_done % max(1, len(runs) // 10) == 0:
                log(f"grid: {grid_done}/{len(runs)} runs ({time.perf_counter() - t0:.0f} s)")

    def on_start(claim_id: str) -> None:
        f = next(f for f in to_run if f.claim.id == claim_id)
        log(f"[{f.claim.number:2d}] {claim_id}: started ({f.claim.title})")

    _execute(tasks, workers, on_result, on_start, log)

    summary_grid = None
    if gcfg is not None:
        summary_grid = {"config": gcfg, "runs": grid_records}
        atomic_write_json(out / "grid.json", json_safe(summary_grid))

    wall = round(time.perf_counter() - t0, 1)
    previous = read_json(out / "study.json")
    history = previous.get("history", []) if isinstance(previous, dict) else []
    history = (history + [{"started_at": started, "wall_seconds": wall, "budget": budget.name,
                           "runs_done": counters["runs_done"],
                           "runs_reused": counters["runs_reused"]}])[-20:]
    meta = {
        "budget": budget.name, "budget_detail": _budget_dict(budget), "data": data,
        "out_dir": str(out), "workers": workers,
        "start_method": _start_method() if workers else "inline",
        "claims": [f.claim.id for f in found], "grid": bool(grid),
        "started_at": started, "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "wall_seconds": wall, "runs_done": counters["runs_done"],
        "runs_reused": counters["runs_reused"], "history": history, "machine": _machine(),
        "command": command or _default_command(budget, claims, data, out, workers, grid),
    }
    atomic_write_json(out / "study.json", meta)
    claim_objs = {f.claim.id: f.claim for f in found}
    report_path = write_report(out, claims=claim_objs, log=log)
    ordered = sorted(records.values(), key=lambda r: r["number"])
    return {"out_dir": str(out), "report": str(report_path), "claims": ordered,
            "grid": summary_grid, "runs_done": counters["runs_done"],
            "runs_reused": counters["runs_reused"], "warnings": seen_warnings,
            "wall_seconds": wall}


def _execute(tasks: list, workers: int, on_result, on_start, log) -> None:
    """Run ``tasks`` (kind, name, args, found) and call ``on_result(task, result, error)``
    for each, in completion order. A task lost with its worker (the process died) is
    retried once in a fresh pool, then recorded as an error."""
    funcs = {"claim": _claim_task, "grid": _grid_task}
    if not tasks:
        return
    if workers == 0:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for task in tasks:
                if task[0] == "claim":
                    on_start(task[1])
                on_result(task, funcs[task[0]](*task[2]), None)
        finally:
            torch.set_num_threads(threads)
        return

    mp = multiprocessing.get_context(_start_method())
    if mp.get_start_method() == "forkserver":
        # Import the heavy modules once in the fork server, not in every worker (a
        # module that fails to import here is skipped silently by multiprocessing).
        # Importing pyplot does not pick a backend; plots call matplotlib.use("Agg").
        # torch._dynamo is what the first optimizer step imports (1.2 s of CPU).
        mp.set_forkserver_preload(["torch", "torch._dynamo", "sklearn.datasets",
                                   "matplotlib.pyplot",
                                   "normlab.claims.base", "normlab.train", "normlab.models",
                                   "normlab.data", "normlab.study"])
    pending = list(tasks)
    attempts: dict[int, int] = {}
    while pending:
        queue = mp.Queue()
        lost = []
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp,
                                    initializer=_init_worker, initargs=(queue,)) as ex:
            futures = {ex.submit(funcs[t[0]], *t[2]): t for t in pending}
            try:
                while futures:
                    done, _ = cf.wait(futures, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                    _drain(queue, on_start, log)
                    for fut in done:
                        task = futures.pop(fut)
                        try:
                            result, err = fut.result(), None
                        except cf.process.BrokenProcessPool as e:
                            attempts[id(task)] = attempts.get(id(task), 0) + 1
                            if attempts[id(task)] < 2:
                                lost.append(task)
                                continue
                            result, err = None, f"worker process died ({e})"
                        except Exception as e:  # e.g. the task could not be pickled
                            result, err = None, f"{type(e).__name__}: {e}"
                        on_result(task, result, err)
                _drain(queue, on_start, log)
            except BaseException:  # Ctrl-C: stop now; finished runs are already stored
                ex.shutdown(wait=False, cancel_futures=True)
                raise
        if lost:
            log(f"normlab study: a worker process died; retrying {len(lost)} task(s)")
        pending = lost


def _drain(queue, on_start, log) -> None:
    import queue as queue_mod

    while True:
        try:
            kind, payload = queue.get_nowait()
        except queue_mod.Empty:
            return
        except (EOFError, OSError):
            return
        if kind == "start":
            on_start(payload)
        elif kind == "log":
            log(payload)


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
