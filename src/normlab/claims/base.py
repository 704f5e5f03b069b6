"""What a claim is, and the context it measures in.

A :class:`Claim` is data plus a measurement: the paper's statement and its source,
the small-scale setup that tests it, a criterion written before any run, a
``measure`` function that runs the experiment through a :class:`RunContext`, and a
``judge`` function that turns the measurement into a verdict. The verdict is
whatever the measurement says; a criterion is never tuned until it passes.

Each claim lives in its own module ``normlab/claims/cNN_<id>.py`` that defines a
module-level ``CLAIM = Claim(...)``; :func:`normlab.claims.all_claims` discovers them.

Measurements go through :meth:`RunContext.run` (or :meth:`RunContext.train`, built
on it), which stores every unit of work as its own JSON file, written atomically, so a
study killed half-way redoes only what is missing, and a corrupt file is reported and
redone rather than trusted.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "VERDICTS",
    "Budget",
    "BUDGETS",
    "Claim",
    "RunContext",
    "atomic_write_json",
    "read_json",
    "save_plot",
]

#: The possible verdicts. "not available" is for a claim whose layers have not landed.
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not available")


@dataclass(frozen=True)
class Budget:
    """How much compute a study spends.

    Claims scale their own numbers with it: ``budget.steps(400)`` is 400 training steps
    at the default budget, ``budget.seeds`` is how many seeds to repeat over, and
    ``budget.pick(quick=..., default=..., full=...)`` chooses anything else (a sweep,
    a depth list) by budget name.
    """

    name: str
    step_scale: float
    seeds: int

    def steps(self, default_steps: int, minimum: int = 10) -> int:
        return max(minimum, int(round(default_steps * self.step_scale)))

    def pick(self, quick, default, full=None):
        if self.name == "quick":
            return quick
        if self.name == "full" and full is not None:
            return full
        return default


#: quick: the whole study in at most 5 minutes on 2 cores; default: at most 30;
#: full: as long as it needs for tighter evidence.
BUDGETS = {
    "quick": Budget("quick", step_scale=0.25, seeds=1),
    "default": Budget("default", step_scale=1.0, seeds=2),
    "full": Budget("full", step_scale=3.0, seeds=5),
}


@dataclass(frozen=True)
class Claim:
    """One claim of a paper and how normlab tests it.

    Attributes:
        number: its place in the study's table (1, 2, ...).
        id: short identifier, e.g. ``"bn_fewer_steps"`` (file names, ``--claims``).
        title: one line for tables.
        statement: what the paper (or seed article) says, in its words where possible.
        source: the paper and where in it (section, table, figure).
        setup: data, model, budget and seeds of the small-scale test, in words.
        criterion: the rule that decides the verdict, written before any run, with its
            numbers (e.g. "BN reaches the baseline's best accuracy in at most 1/3 of
            the steps, in every seed").
        measure: ``measure(ctx) -> dict`` runs the experiment and returns the measured
            quantities (JSON-serialisable: numbers, strings, lists, dicts).
        judge: ``judge(measured) -> (verdict, reason)``, the criterion applied to the
            measurement; ``verdict`` is one of :data:`VERDICTS`, ``reason`` one or two
            sentences with the numbers that decided it.
        requires: dotted names that must import for the claim to run (e.g.
            ``"normlab.nn.SwitchableNorm"``); a missing one makes the verdict
            "not available" instead of an error.
        plot: optional ``plot(measured, out_dir) -> list[str]``, writes PNG files into
            ``out_dir`` and returns their file names.
        takeaway: optional one-line lesson for a practitioner, shown in the report.
    """

    number: int
    id: str
    title: str
    statement: str
    source: str
    setup: str
    criterion: str
    measure: Callable[[RunContext], dict]
    judge: Callable[[dict], tuple[str, str]]
    requires: tuple[str, ...] = ()
    plot: Callable[[dict, Path], list[str]] | None = None
    takeaway: str = ""

    def missing_requirements(self) -> list[str]:
        """The entries of ``requires`` that do not import."""
        missing = []
        for dotted in self.requires:
            module_name, _, attr = dotted.rpartition(".")
            try:
                module = importlib.import_module(module_name)
                getattr(module, attr)
            except (ImportError, AttributeError):
                try:
                    importlib.import_module(dotted)
                except ImportError:
                    missing.append(dotted)
        return missing


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as strict JSON to ``path`` atomically (temporary file + rename):
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=1, allow_nan=False, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_plot(fig, out_dir: str | os.PathLike, name: str) -> list[str]:
    """Lay out ``fig``, write it to ``out_dir/name`` (PNG, 110 dpi) and close it; returns
    ``[name]``, what a claim's ``plot`` returns."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(Path(out_dir) / name, dpi=110)
    plt.close(fig)
    return [name]


def read_json(path: str | os.PathLike):
    """The JSON in ``path``, or None if the file is missing or corrupt (a warning says
    which file was corrupt, so it is redone rather than trusted)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        warnings.warn(f"normlab: corrupt result file {path} ({err}); it will be redone",
                      RuntimeWarning, stacklevel=2)
        return None


def _key_to_filename(key: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)[:80]
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"{safe}-{digest}.json"


@dataclass
class RunContext:
    """Where a claim measures: its budget, its result folder, cached units of work.

    Attributes:
        claim_id: the claim being measured.
        budget: the :class:`Budget`.
        out_dir: the study folder; this claim's runs go to ``out_dir/runs/<claim_id>/``.
        log: a function taking one line of progress text.
        data: the default dataset name for claims that let the user choose
            (``normlab study --data``).
    """

    claim_id: str
    budget: Budget
    out_dir: Path
    log: Callable[[str], None] = print
    data: str = "digits"
    _datasets: dict = field(default_factory=dict, repr=False)
    runs_done: int = 0
    runs_reused: int = 0

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / "runs" / self.claim_id

    def run(self, key: str, fn: Callable[[], dict]) -> dict:
        """The result of ``fn()``, computed once per ``key`` and stored as JSON.

        ``key`` must name everything the result depends on (model, norm, batch size,
        learning rate, steps, seed ...). A stored result for the key is reused; a
        missing or corrupt one is computed and written atomically.
        """
        path = self.run_dir / _key_to_filename(key)
        stored = read_json(path)
        if isinstance(stored, dict) and stored.get("key") == key and "result" in stored:
            self.runs_reused += 1
            return stored["result"]
        start = time.perf_counter()
        result = fn()
        atomic_write_json(path, {"key": key, "result": result,
                                 "seconds": round(time.perf_counter() - start, 3)})
        self.runs_done += 1
        return result

    def dataset(self, name: str | None = None, seed: int = 0):
        """The :mod:`normlab.data` dataset ``name`` (default :attr:`data`), loaded once."""
        from normlab import data

        name = name or self.data
        if (name, seed) not in self._datasets:
            self._datasets[(name, seed)] = data.load(name, seed=seed)
        return self._datasets[(name, seed)]

    def train(
        self,
        *,
        model: str = "cnn",
        norm: str = "bn",
        data: str | None = None,
        batch_size: int = 32,
        lr: float = 0.05,
        steps: int = 200,
        seed: int = 0,
        model_kwargs: dict | None = None,
        train_kwargs: dict | None = None,
        tag: str = "",
    ) -> dict:
        """Train ``normlab.models.build(model, ..., norm=norm, **model_kwargs)`` on
        ``data`` with :func:`normlab.train.train` and return ``TrainResult.to_dict()``,
        cached under a key made of every argument (``tag`` distinguishes runs that
        differ in something the arguments do not show)."""
        data = data or self.data
        model_kwargs = dict(model_kwargs or {})
        train_kwargs = dict(train_kwargs or {})
        key = json.dumps({"model": model, "norm": norm, "data": data, "batch": batch_size,
                          "lr": lr, "steps": steps, "seed": seed, "model_kw": model_kwargs,
                          "train_kw": train_kwargs, "tag": tag}, sort_keys=True, default=str)

        def fn() -> dict:
            import torch

            from normlab import models
            from normlab.train import train

            ds = self.dataset(data)
            torch.manual_seed(seed)
            net = models.build(model, ds.in_shape, ds.num_classes, norm=norm, **model_kwargs)
            result = train(net, ds, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                           progress=False, **train_kwargs)
            return result.to_dict()

        return self.run(key, fn)
