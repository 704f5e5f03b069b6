"""The lab's one experimental design, shared by every claim.

- **Splits drawn by the seed.** Seed ``s`` draws the stratified train/test split of the
  dataset (:func:`normlab.data.load` with ``seed=s``) and then a stratified validation
  part of the training split (:func:`split`): the model trains on the rest ("fit"),
  the learning rate is chosen on validation accuracy, and the test set is only
  reported. Because every seed has its own test set, the seed-to-seed spread of an
  effect holds the test set's sampling noise as well as the training noise, and the
  protocol's t interval over seeds counts both.
- **Paired arms.** Within a seed every arm gets the same split, the same batch order
  (:func:`normlab.train.batch_indices` seeded by the seed) and the same initial
  weights wherever the shapes allow (``torch.manual_seed(seed)`` before the model is
  built, so layers of the same shapes draw the same values).
- **Learning rates chosen fairly.** :func:`select_lr` trains an arm at every rate of a
  grid on the selection seeds and picks the best mean validation accuracy; a choice at
  the edge of the grid extends the grid (x3 or /3) until it is bracketed or the
  extension limit is reached (reported). Test accuracy never chooses anything.
- **One run function.** :func:`train_run` builds a :mod:`normlab.models` model and
  trains it with :func:`normlab.train.train`; it is what ``ctx.train`` and most
  claims' ``ctx.map`` calls run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence

__all__ = ["VAL_FRACTION", "split", "train_run", "with_validation", "select_lr",
           "select_lrs", "accuracy_or_chance",
           "LR_EXTEND", "MAX_EXTENSIONS", "current_device", "on_device"]

#: The share of the training split held out for validation.
VAL_FRACTION = 0.2
#: The factor a grid is extended by when its best rate sits at an edge ...
LR_EXTEND = 3.0
#: ... at most this many times.
MAX_EXTENSIONS = 2

_CACHE: dict = {}
_DEVICE = ["cpu"]


def current_device() -> str:
    """The device the current run trains on (``"cpu"`` unless the study was started
    with ``--device cuda``); run functions pass it to :func:`normlab.train.train`."""
    return _DEVICE[-1]


@contextlib.contextmanager
def on_device(device: str):
    """Runs inside train on ``device``; on CUDA with deterministic algorithms where
    torch has them (a run's result must not depend on the order of float sums)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"normlab: a run's device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        import os

        import torch

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    _DEVICE.append(device)
    try:
        yield device
    finally:
        _DEVICE.pop()


def split(data: str, seed: int, val_fraction: float = VAL_FRACTION,
          data_dir: str | None = None):
    """``(fit, val)``: the dataset ``data`` with the train/test split of ``seed``, where
    ``fit`` is a :class:`normlab.data.Dataset` holding the training part minus a
    stratified validation part (its test set is the seed's test set) and ``val`` is the
    pair ``(x_val, y_val)``. A dataset read from a folder (``data="cifar10"``,
    ``data_dir=FOLDER``) keeps its official train/test split; only the validation part
    is drawn by the seed. Loaded once per process."""
    key = (data, int(seed), float(val_fraction), None if data_dir is None else str(data_dir))
    if key not in _CACHE:
        import dataclasses

        from normlab import data as data_mod

        ds = data_mod.load(data, seed=int(seed), root=data_dir)
        fit_idx, val_idx = data_mod.stratified_split(ds.y_train.numpy(), val_fraction,
                                                     seed=10_000 + int(seed))
        fit = dataclasses.replace(ds, x_train=ds.x_train[fit_idx], y_train=ds.y_train[fit_idx])
        _CACHE[key] = (fit, (ds.x_train[val_idx], ds.y_train[val_idx]))
    return _CACHE[key]


def train_run(*, model: str = "cnn", norm: str = "bn", data: str = "digits",
              batch_size: int = 32, lr: float = 0.05, steps: int = 200, seed: int = 0,
              model_kwargs: Mapping | None = None, train_kwargs: Mapping | None = None,
              curve: bool = False, data_dir: str | None = None) -> dict:
    """Build ``normlab.models.build(model, ..., norm=norm, **model_kwargs)`` with
    ``torch.manual_seed(seed)``, train it on the seed's fit split (of ``data`` read from
    ``data_dir`` where it is a folder format, see :func:`split`) with
    :func:`normlab.train.train` (``train_kwargs`` pass through) and return the
    training result with the final validation accuracy and loss added (``val_acc``,
    ``val_loss``; ``None`` when the run diverged). ``curve=False`` drops the per-step
    training curve from the stored result (the evaluation curve is kept)."""
    import torch

    from normlab import models
    from normlab.train import train

    fit, (x_val, y_val) = split(data, seed, data_dir=data_dir)
    device = current_device()
    torch.manual_seed(seed)
    net = models.build(model, fit.in_shape, fit.num_classes, norm=norm, **dict(model_kwargs or {}))
    result = train(net, fit, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                   progress=False, device=device, **dict(train_kwargs or {})).to_dict()
    return with_validation(result, net, (x_val, y_val), fit.num_classes, device, curve)


def with_validation(result: dict, net, val, num_classes: int, device: str,
                    curve: bool = False) -> dict:
    """A run's result dict (``TrainResult.to_dict()``) with the trained ``net``'s final
    validation accuracy and loss on ``val = (x_val, y_val)`` (``val_acc``, ``val_loss``:
    None when the run diverged) and ``num_classes`` added; ``curve=False`` drops the
    per-step training curve (the evaluation curve is kept). Shared by every run
    function that trains one network."""
    from normlab.train import evaluate

    val_acc = val_loss = None
    if not result["diverged"]:
        val_loss, val_acc = evaluate(net, val[0], val[1], device=device)
    result.update(val_acc=_finite(val_acc), val_loss=_finite(val_loss), num_classes=num_classes)
    if not curve:
        result.pop("curve", None)
    return result


def _finite(x):
    return x if x is not None and math.isfinite(x) else None


def accuracy_or_chance(result: Mapping, key: str = "final_test_acc") -> float:
    """The run's accuracy, or chance (1 / classes) where the run diverged, produced
    none, or its outputs went non-finite (the matching loss, e.g. ``final_test_loss``
    for ``final_test_acc``, stored as None): such an arm counts as having learned
    nothing, never as missing."""
    value = result.get(key)
    loss = result.get(key.replace("_acc", "_loss"), 0.0)
    if value is None or not math.isfinite(value) or loss is None:
        # a run whose outputs went non-finite (its loss stored as None) scores 0 by
        # argmax over NaN logits; it learned nothing, which is chance, not worse
        return 1.0 / float(result.get("num_classes") or 10)
    return float(value)


def select_lr(ctx, fn: Callable, make_kwargs: Callable[[float, int], Mapping],
              grid: Sequence[float], seeds: Sequence[int],
              score: Callable[[Mapping], float] | None = None) -> dict:
    """Choose a learning rate for one arm on validation data.

    Runs ``fn(**make_kwargs(lr, seed))`` for every ``lr`` of ``grid`` and every seed of
    ``seeds`` (one ``ctx.map`` call per round, so they run in parallel), scores each
    rate by the mean over seeds of ``score(result)`` (default: validation accuracy,
    chance for a diverged run) and returns the best. If the best rate is the smallest
    or largest of the grid, the grid is extended by :data:`LR_EXTEND` on that side and
    the round repeated, at most :data:`MAX_EXTENSIONS` times.

    Returns ``{"lr": best, "grid": [...], "scores": {lr: mean score}, "bracketed":
    bool}`` (``bracketed`` False when the best is still at an edge after the last
    extension; the report shows it).
    """
    score = score or (lambda r: accuracy_or_chance(r, "val_acc"))
    lrs = sorted(float(f"{lr:.6g}") for lr in grid)
    scores: dict[float, float] = {}
    for extension in range(MAX_EXTENSIONS + 1):
        todo = [lr for lr in lrs if lr not in scores]
        results = ctx.map(fn, [make_kwargs(lr, s) for lr in todo for s in seeds])
        for i, lr in enumerate(todo):
            chunk = results[i * len(seeds):(i + 1) * len(seeds)]
            scores[lr] = sum(score(r) for r in chunk) / len(chunk)
        # ties go to the smaller rate, the more conservative choice
        best = max(lrs, key=lambda lr: (scores[lr], -lr))
        at_low, at_high = best == lrs[0] and len(lrs) > 1, best == lrs[-1]
        if not (at_low or at_high) or extension == MAX_EXTENSIONS:
            break
        new = best / LR_EXTEND if at_low else best * LR_EXTEND
        lrs = sorted(set(lrs) | {float(f"{new:.6g}")})
    bracketed = lrs[0] < best < lrs[-1]
    return {"lr": best, "grid": lrs, "scores": {str(lr): scores[lr] for lr in lrs},
            "bracketed": bracketed}


def select_lrs(ctx, fn: Callable, makes: Mapping[str, Callable[[float, int], Mapping]],
               grid: Sequence[float], seeds: Sequence[int],
               score: Callable[[Mapping], float] | None = None) -> dict:
    """:func:`select_lr` for several arms (``makes``: arm name -> its ``make_kwargs``),
    every arm's first round asked for in one ``ctx.map`` call so that the arms' runs
    are computed in parallel (each arm's selection then finds them stored; an
    extension round is per arm). Returns ``{arm: select_lr's record}``."""
    lrs = [float(f"{lr:.6g}") for lr in grid]
    ctx.map(fn, [make(lr, s) for make in makes.values() for lr in lrs for s in seeds])
    return {arm: select_lr(ctx, fn, make, grid, seeds, score=score)
            for arm, make in makes.items()}
