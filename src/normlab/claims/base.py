"""What a claim is, and the context it measures in.

A :class:`Claim` is data plus a measurement: the paper's statement and its source,
the small-scale setup that tests it, the effects it measures with the side of a
threshold the paper puts each on (:class:`normlab.claims.protocol.Effect`, declared
before any run), and a ``measure`` function that runs the experiment through a
:class:`RunContext` and returns each effect's per-seed values. The verdict comes from
the one protocol of :mod:`normlab.claims.protocol`, never from claim code.

Each claim lives in its own module ``normlab/claims/cNN_<id>.py`` that defines a
module-level ``CLAIM = Claim(...)``; :func:`normlab.claims.all_claims` discovers them.

Runs are keyed by content (:mod:`normlab.claims.runs`): a claim asks
``ctx.map(fn, [kwargs, ...])`` for the results of module-level functions, and the key
of each run is built from the function's name, every argument and a hash of the code
it depends on, so no claim writes a key by hand and a resumed study recomputes what a
code change affects.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from normlab.claims.protocol import Effect

__all__ = [
    "VERDICTS",
    "SCALES",
    "Budget",
    "BUDGETS",
    "Claim",
    "RunContext",
    "PendingRuns",
    "atomic_write_json",
    "read_json",
    "save_plot",
]

#: The possible verdicts. "not testable at this scale" is for a claim whose premise does
#: not hold at the lab's scale; "not available" for a claim whose layers have not landed;
#: "not run at this scale" for a claim with no setup at the study's scale (``--scale``).
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not testable at this scale",
            "not available", "not run at this scale")
#: The verdicts a measurement can give.
MEASURED_VERDICTS = VERDICTS[:4]
#: The scales of a study, separate from its budget: "small" runs every claim's setup on
#: the embedded datasets (2 CPU cores); "paper" runs the papers' setups (ResNets on
#: CIFAR-10 read from a folder) where a claim has one, sized for one GPU in hours.
SCALES = ("small", "paper")


@dataclass(frozen=True)
class Budget:
    """How much compute a study spends.

    ``seeds`` is how many seeds every effect is measured over (the paired design: one
    value per seed). The default and full budgets run the SAME setups (full only adds
    seeds, and reuses the default's runs), so a larger budget refines an interval and
    cannot measure a different experiment. The quick budget is a smoke test: its
    setups are shortened (``step_scale``, ``budget.pick(quick=...)``), so it measures a
    different, smaller experiment and ``decisive=False`` caps its verdicts at
    "inconclusive": a verdict of the quick budget can never contradict the default's.
    """

    name: str
    step_scale: float
    seeds: int
    decisive: bool = True

    def steps(self, default_steps: int, minimum: int = 10) -> int:
        return max(minimum, int(round(default_steps * self.step_scale)))

    def pick(self, quick, default):
        """``quick`` at the quick budget (and at a test's own budget), else ``default``."""
        return default if self.decisive else quick


#: quick: a smoke test of every claim in at most 5 minutes on 2 cores (decides
#: nothing); default: the declared setups over 10 seeds in at most 30 minutes (the
#: protocol's minimum is 5; 10 narrow a t interval to about 0.58 of its width at 5);
#: full: the same setups over 20 seeds.
BUDGETS = {
    "quick": Budget("quick", step_scale=0.25, seeds=2, decisive=False),
    "default": Budget("default", step_scale=1.0, seeds=10),
    "full": Budget("full", step_scale=1.0, seeds=20),
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
        setup: data, model, budget and seeds of the small-scale test, in words,
            including how each arm's learning rate is chosen and the step budget.
        measure: ``measure(ctx) -> dict`` runs the experiment and returns a JSON-safe
            dict whose ``"effects"`` entry maps each effect's key to its per-seed values
            (already in the effect's unit); anything else in it is raw measurement,
            kept for plots and the report.
        effects: the :class:`~normlab.claims.protocol.Effect` s, declared before any
            run; the protocol turns their values into intervals and the verdict.
        lessons: the takeaway's prose per verdict (``{"reproduced": ..., "not
            reproduced": ..., "inconclusive": ..., "not testable at this scale": ...}``
            or ``"default"``), with no measured number or direction in it: the report
            appends the measured effects.
        setup_change: what changed in the setup under the current protocol and why
            (written before its runs).
        criterion_change: ``(old rule, new rule)`` where the criterion was restated
            under the protocol, else None.
        scale_note: why the lab's small scale may make its verdict differ from the
            paper's.
        width_note: why an effect's interval is not at most half as wide as the noise
            figure the old protocol used (``Effect.previous_noise``), where it is not;
            the report shows it next to the widths.
        criterion: extra words on the criterion; the rule itself is generated from
            ``effects`` (:meth:`criterion_text`).
        requires: dotted names that must import for the claim to run (e.g.
            ``"normlab.nn.SwitchableNorm"``); a missing one makes the verdict
            "not available" instead of an error.
        plot: optional ``plot(measured, out_dir) -> list[str]``, writes PNG files into
            ``out_dir`` and returns their file names.
        scales: the study scales (:data:`SCALES`) ``measure`` has a setup for; it reads
            ``ctx.scale`` to pick one. At another scale the claim is "not run at this
            scale".
        paper_setup: the setup at the "paper" scale, in words (as ``setup``).
    """

    number: int
    id: str
    title: str
    statement: str
    source: str
    setup: str
    measure: Callable[[RunContext], dict]
    effects: tuple[Effect, ...] = ()
    lessons: Mapping[str, str] = field(default_factory=dict)
    setup_change: str = ""
    criterion_change: tuple[str, str] | None = None
    scale_note: str = ""
    width_note: str = ""
    criterion: str = ""
    requires: tuple[str, ...] = ()
    plot: Callable[[dict, Path], list[str]] | None = None
    scales: tuple[str, ...] = ("small",)
    paper_setup: str = ""

    def setup_at(self, scale: str) -> str:
        """The setup in words at ``scale``."""
        return self.paper_setup if scale == "paper" and self.paper_setup else self.setup

    def criterion_text(self) -> str:
        """The decision rule in words: each effect with its side of its threshold."""
        from normlab.claims.protocol import CONFIDENCE

        parts = []
        for e in self.effects:
            role = "premise (else not testable at this scale)" if e.role == "premise" else "claim"
            parts.append(f"{e.name} {e.rule()} [{role}]")
        rule = (f"Each effect's {round(100 * CONFIDENCE)}% paired interval over seeds must lie "
                "entirely on the stated side to reproduce, entirely on the other side (or "
                "inside the equivalence margin) not to; otherwise inconclusive. Effects: "
                + "; ".join(parts) + ".")
        return f"{rule} {self.criterion}".strip()

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
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; follow the umask instead
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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




# --------------------------------------------------------------------------- runs

#: Modules whose source does not change any run's result (presentation, the study
#: driver, the command line): they are left out of the code hash.
_PRESENTATION = ("normlab/report.py", "normlab/docs.py", "normlab/cli.py", "normlab/bench.py",
                 "normlab/study.py", "normlab/demo.py", "normlab/__main__.py")

_CODE_HASH: str | None = None


def code_hash() -> str:
    """A SHA-256 of normlab's own source that runs depend on: every ``.py``, ``.cpp``
    and ``.h`` file of the package except the presentation modules and the claim
    modules (a claim's runs name their own function, whose module is hashed with them
    by :func:`run_key`)."""
    global _CODE_HASH
    if _CODE_HASH is None:
        import hashlib

        import normlab

        root = Path(normlab.__file__).resolve().parent
        digest = hashlib.sha256()
        for path in sorted(root.rglob("*")):
            rel = "normlab/" + path.relative_to(root).as_posix()
            if path.suffix not in (".py", ".cpp", ".h") or "__pycache__" in rel:
                continue
            if rel in _PRESENTATION or _is_claim_module(rel):
                continue
            digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
        _CODE_HASH = digest.hexdigest()
    return _CODE_HASH


def _is_claim_module(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return rel.startswith("normlab/claims/c") and name[1:3].isdigit()


def _function_name(fn: Callable) -> str:
    name = f"{fn.__module__}:{fn.__qualname__}"
    if "<" in fn.__qualname__:
        raise TypeError(f"normlab.claims: a run function must be defined at module level "
                        f"(it is called by name in a worker), got {name}")
    return name


def resolve_function(name: str) -> Callable:
    """The module-level function ``"module:qualname"``."""
    module_name, _, qualname = name.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _module_source_hash(module_name: str) -> str:
    import hashlib

    module = importlib.import_module(module_name)
    try:
        return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()
    except (OSError, TypeError):
        return ""


def canonical_json(obj) -> str:
    """``obj`` as canonical JSON (sorted keys, no spaces): the text a run key hashes.
    Tuples become lists; anything that is not JSON data is an error, so a key never
    depends on an object's ``repr``."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class RunSpec:
    """One unit of work: ``fn(**kwargs)``, with the key its result is stored under."""

    fn: str
    kwargs: dict
    key: str
    device: str = "cpu"

    @property
    def filename(self) -> str:
        short = self.fn.rpartition(":")[2].replace(".", "_")[:40]
        return f"{short}-{self.key[:20]}.json"


def make_spec(fn: Callable | str, kwargs: Mapping, device: str = "cpu") -> RunSpec:
    """The :class:`RunSpec` of ``fn(**kwargs)`` on ``device``: its key hashes the
    function's name, the arguments, :func:`code_hash`, the device (where it is not the
    CPU) and, for a function defined in a claim module, that module's source."""
    import hashlib

    name = fn if isinstance(fn, str) else _function_name(fn)
    kwargs = json.loads(canonical_json(dict(kwargs)))  # tuples -> lists, checks JSON-ness
    module_name = name.partition(":")[0]
    rel = module_name.replace(".", "/") + ".py"
    extra = _module_source_hash(module_name) if _is_claim_module(rel) else ""
    content = {"fn": name, "kwargs": kwargs, "code": code_hash(), "module": extra}
    if device != "cpu":
        content["device"] = device
    text = canonical_json(content)
    return RunSpec(name, kwargs, hashlib.sha256(text.encode()).hexdigest(), device)


def execute(spec: RunSpec) -> dict:
    """Run ``spec`` here and return its stored form (result and timing)."""
    import time

    from normlab.claims.design import on_device

    fn = resolve_function(spec.fn)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with on_device(spec.device):
        result = fn(**spec.kwargs)
    if not isinstance(result, dict):
        raise TypeError(f"run function {spec.fn} returned {type(result).__name__}, not a dict")
    return {"key": spec.key, "fn": spec.fn, "kwargs": spec.kwargs, "device": spec.device,
            "code_hash": code_hash(),
            "result": _json_safe(result), "seconds": round(time.perf_counter() - wall0, 3),
            "cpu_seconds": round(time.process_time() - cpu0, 3)}


def _json_safe(obj):
    import math

    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return _json_safe(obj.tolist())
    return repr(obj)


class PendingRuns(Exception):  # noqa: N818 (a signal to the study driver, not an error)
    """Raised by :meth:`RunContext.map` in planning mode: these runs are not stored yet.

    The study driver catches it, computes the runs (in parallel, on its workers), stores
    them, and calls ``measure`` again, which then finds them and goes on to its next
    batch. ``measure`` must therefore be a deterministic function of the stored results.
    """

    def __init__(self, specs: list[RunSpec]):
        super().__init__(f"{len(specs)} run(s) pending")
        self.specs = specs


@dataclass
class RunContext:
    """Where a claim measures: its budget, the study folder, content-keyed runs.

    Attributes:
        claim_id: the claim being measured.
        budget: the :class:`Budget`.
        out_dir: the study folder; runs are stored under ``out_dir/runs/``.
        log: a function taking one line of progress text.
        data: the default dataset name for claims that let the user choose.
        plan: False (default): missing runs are computed here, one after the other.
            True (the study driver): :meth:`map` raises :class:`PendingRuns` listing
            the missing runs of the call, for the driver to compute in parallel.
        device: where the runs train (``"cpu"`` or ``"cuda"``); part of each run's key.
        scale: the study's scale (:data:`SCALES`); a claim picks its setup by it.
        data_dir: the folder of the datasets read from disk at the "paper" scale
            (CIFAR-10's python batches); None at the small scale. A claim passes it to
            its run functions (``train_run(data_dir=...)``), so it is part of every such
            run's key and paper-scale runs never share a key with small-scale ones.
    """

    claim_id: str
    budget: Budget
    out_dir: Path
    log: Callable[[str], None] = print
    data: str = "digits"
    plan: bool = False
    device: str = "cpu"
    scale: str = "small"
    data_dir: str | None = None
    runs_done: int = 0
    runs_reused: int = 0
    run_files: set = field(default_factory=set)

    @property
    def seeds(self) -> list[int]:
        """The seeds of the budget: ``[0, 1, ..., budget.seeds - 1]``."""
        return list(range(self.budget.seeds))

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / "runs"

    def path(self, spec: RunSpec) -> Path:
        return self.run_dir / spec.filename

    def stored(self, spec: RunSpec) -> dict | None:
        """The stored result of ``spec``, or None (missing, corrupt or another key)."""
        stored = read_json(self.path(spec))
        if isinstance(stored, dict) and stored.get("key") == spec.key and "result" in stored:
            return stored["result"]
        return None

    def map(self, fn: Callable, kwargs_list: list[Mapping]) -> list[dict]:
        """``[fn(**kw) for kw in kwargs_list]``, each computed once and stored.

        ``fn`` must be a module-level function returning a JSON-safe dict, and every
        argument it depends on must be in ``kw`` (a run is keyed by its function, its
        arguments and the code; see :func:`make_spec`). Ask for independent runs in one
        call: the study computes a call's missing runs in parallel.
        """
        specs = [make_spec(fn, kw, self.device) for kw in kwargs_list]
        results = [self.stored(s) for s in specs]
        missing = [s for s, r in zip(specs, results, strict=True) if r is None]
        self.run_files.update(s.filename for s in specs)
        if missing and self.plan:
            unique = list({s.key: s for s in missing}.values())
            raise PendingRuns(unique)
        out = []
        for spec, result in zip(specs, results, strict=True):
            if result is None:
                stored = execute(spec)
                atomic_write_json(self.path(spec), stored)
                result = stored["result"]
                self.runs_done += 1
            else:
                self.runs_reused += 1
            out.append(result)
        return out

    def run(self, fn: Callable, **kwargs) -> dict:
        """``fn(**kwargs)``, computed once and stored (see :meth:`map`)."""
        return self.map(fn, [kwargs])[0]

    def train(self, **kwargs) -> dict:
        """One :func:`normlab.claims.design.train_run` (see its arguments)."""
        from normlab.claims.design import train_run

        kwargs.setdefault("data", self.data)
        return self.run(train_run, **kwargs)
