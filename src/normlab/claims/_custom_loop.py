"""A short training loop for the claims whose runs :func:`normlab.train.train` cannot
drive, and small summaries shared by claims 15 to 21.

``train`` sets one learning rate for every parameter group at every step, so it cannot
run Fixup's optimiser (scalar biases and multipliers at a tenth of the rate), a torch
``LRScheduler`` (Arpit et al.'s quadratic warm-up) or a regression loss. :func:`fit`
does what ``train`` does (the same seeded batches, :func:`normlab.train.batch_indices`;
the same schedules, :func:`normlab.train.lr_at`; the same evaluation,
:func:`normlab.train.evaluate`; a non-finite loss stops the run as "diverged") with
per-group learning-rate factors, an optional scheduler and an optional callback after
every optimizer step.

Not a claim module (the leading underscore keeps :func:`normlab.claims.all_claims`
from loading it as one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from normlab.train import batch_indices, evaluate, lr_at


def fit(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor | None = None,
    y_test: Tensor | None = None,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    param_groups: list[dict] | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    schedule: str = "constant",
    scheduler: Callable[[torch.optim.Optimizer], object] | None = None,
    eval_every: int | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    classification: bool = True,
    after_step: Callable[[torch.optim.Optimizer], None] | None = None,
) -> dict:
    """Train ``model`` for ``steps`` steps and return a JSON-safe dict.

    Args:
        param_groups: optimiser groups (each with its own ``"lr"``); every group keeps
            the ratio of its rate to ``lr`` under the schedule. Default: one group of
            all parameters with ``weight_decay``.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        schedule: ``"constant"`` or ``"cosine"`` (as :func:`normlab.train.lr_at`),
            ignored when ``scheduler`` is given.
        scheduler: ``scheduler(opt)`` returns a torch LR scheduler stepped after every
            optimizer step; it then owns the rates.
        classification: accuracy is measured (cross-entropy by default); otherwise only
            losses (``loss_fn`` required).
        after_step: ``after_step(opt)`` after every optimizer step (and scheduler step).

    Returns:
        ``{"steps_done", "diverged", "diverged_step", "curve": {"step", "loss", "lr"},
        "evals": {"step", "test_loss", "test_acc"}, "final_test_acc",
        "final_test_loss", "final_train_loss"}``; non-finite numbers become None.
    """
    if not classification and loss_fn is None:
        raise ValueError("fit: a regression run needs loss_fn")
    loss_fn = loss_fn or nn.functional.cross_entropy
    eval_every = eval_every or max(steps // 10, 1)
    if param_groups is None:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                         "lr": lr, "weight_decay": weight_decay}]
    factors = [g.get("lr", lr) / lr for g in param_groups]
    if optimizer == "sgd":
        opt = torch.optim.SGD(param_groups, lr=lr, momentum=momentum)
    elif optimizer == "adam":
        opt = torch.optim.Adam(param_groups, lr=lr)
    else:
        raise ValueError(f"fit: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    sched = scheduler(opt) if scheduler is not None else None
    batches = batch_indices(len(x_train), batch_size, seed)
    out = {"steps_done": 0, "diverged": False, "diverged_step": None,
           "curve": {"step": [], "loss": [], "lr": []},
           "evals": {"step": [], "test_loss": [], "test_acc": []}}

    def run_eval(step: int) -> None:
        if x_test is None:
            return
        if classification:
            loss, acc = evaluate(model, x_test, y_test, 512, loss_fn)
        else:
            was = model.training
            model.eval()
            with torch.no_grad():
                loss, acc = float(loss_fn(model(x_test), y_test)), None
            model.train(was)
        out["evals"]["step"].append(step)
        out["evals"]["test_loss"].append(_finite(loss))
        out["evals"]["test_acc"].append(acc)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for step in range(steps):
            if sched is None:
                now = lr_at(step, steps, lr, schedule)
                for group, factor in zip(opt.param_groups, factors, strict=True):
                    group["lr"] = now * factor
            idx = next(batches)
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            value = float(loss.detach())
            out["curve"]["step"].append(step + 1)
            out["curve"]["loss"].append(_finite(value))
            out["curve"]["lr"].append(opt.param_groups[0]["lr"])
            if not math.isfinite(value):
                out["diverged"], out["diverged_step"] = True, step
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if after_step is not None:
                after_step(opt)
            out["steps_done"] = step + 1
            if (step + 1) % eval_every == 0 and step + 1 < steps:
                run_eval(step + 1)
        if not out["diverged"]:
            run_eval(out["steps_done"])
    evals = out["evals"]
    out["final_test_loss"] = evals["test_loss"][-1] if evals["step"] else None
    out["final_test_acc"] = evals["test_acc"][-1] if evals["step"] else None
    if out["diverged"]:
        out["final_test_acc"] = out["final_test_loss"] = None
    losses = [v for v in out["curve"]["loss"][: out["steps_done"]] if v is not None]
    tail = max(1, math.ceil(0.1 * len(losses))) if losses else 0
    out["final_train_loss"] = sum(losses[-tail:]) / tail if losses else None
    return out


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# ----------------------------------------------------------------- summaries


def mean(values: Sequence[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def seed_range(values: Sequence[float]) -> float:
    """Max minus min over seeds (0 for one seed)."""
    values = list(values)
    return max(values) - min(values) if values else 0.0


def acc_or_chance(result: dict, num_classes: int) -> float:
    """A run's final test accuracy; a diverged run (no accuracy) counts as chance."""
    acc = result.get("final_test_acc")
    return 1.0 / num_classes if acc is None or result.get("diverged") else float(acc)


def noise_floor(*groups: Sequence[float], floor: float = 0.01) -> float:
    """The larger of ``floor`` and the seed ranges of ``groups`` (accuracies per seed):
    differences smaller than this are within seed-to-seed noise."""
    return max([floor, *(seed_range(g) for g in groups)])


def pct(x: float | None) -> str:
    """An accuracy in [0, 1] as percentage points with one decimal."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def smooth(values: Sequence[float | None], window: int) -> list[float | None]:
    """Trailing moving average (None entries skipped) over ``window`` values."""
    out: list[float | None] = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1): i + 1] if v is not None]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return out
