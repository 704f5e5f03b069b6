"""What the paper-scale tests (``normlab study --scale paper``) share: generated
CIFAR-10 files (the real dataset cannot be downloaded here), a tiny budget, a context
that records the runs a claim asks for at the declared setup without training, and the
checks every claim's record from a paper-scale study must pass."""

import json
import pickle

import numpy as np

from normlab.claims.base import BUDGETS, Budget, RunContext

#: 2 seeds and the fewest steps (the minimum of 10 a run); decides nothing.
TINY = Budget("test", step_scale=0.001, seeds=2, decisive=False)


def write_cifar(folder, per_class=1, seed=0):
    """The six python batches of CIFAR-10's format, 10 * per_class images each with
    every class per_class times (so a stratified validation fifth exists)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).tolist()
        x = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": labels}, f, protocol=2)
    return folder


#: The data folder the recording context names (never read: nothing trains).
FOLDER = "/data/cifar-10-batches-py"


def recording_ctx(tmp_path, monkeypatch, fn, result_of):
    """A default-budget paper-scale context on 40,000 training images (the real
    CIFAR-10 less its validation fifth) whose ``map`` records every distinct run it is
    asked for (all of ``fn``) and answers ``result_of(kwargs)``: the declared setup's
    exact runs, with nothing trained. Returns ``(ctx, runs)``, ``runs`` keyed by the
    run's canonical JSON."""
    from normlab.claims import _paper

    monkeypatch.setattr(_paper, "num_train", lambda ctx: 40_000)
    ctx = RunContext("test", BUDGETS["default"], tmp_path, log=lambda line: None,
                     scale="paper", data_dir=FOLDER)
    runs = {}

    def fake_map(f, kwargs_list):
        assert f is fn
        for kw in kwargs_list:
            runs[json.dumps(kw, sort_keys=True)] = kw
        return [result_of(kw) for kw in kwargs_list]

    ctx.map = fake_map
    return ctx, runs


def check_paper_record(rec, out, claim):
    """A claim's record from a paper-scale study at :data:`TINY` in folder ``out``:
    measured without error at the paper setup, one value a seed for every declared
    effect, judged (never decisively) and plotted."""
    assert rec["error"] is None and rec["scale"] == "paper", rec["error"]
    assert rec["verdict"] == "inconclusive"  # the tiny budget decides nothing
    assert rec["setup"] == claim.paper_setup
    assert rec["plot_error"] is None and rec["plots"]
    assert all((out / "plots" / p).stat().st_size > 0 for p in rec["plots"])
    effects = rec["measured"]["effects"]
    assert set(effects) == {e.key for e in claim.effects}
    assert all(len(v) == TINY.seeds for v in effects.values())
    assert {r["key"] for r in rec["effects"]} == set(effects)
