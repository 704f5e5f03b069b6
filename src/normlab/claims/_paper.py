"""The papers' scale of the convolutional claims (``normlab study --scale paper
--data-dir DIR``): CIFAR-10 read from a folder, the CIFAR ResNets of He et al. (2016)
and their recipe, sized for hours on one GPU.

One place for what those claims share, so that a claim's paper setup says only what
differs from it:

- the data: CIFAR-10's official test set; a stratified fifth of the 50,000 training
  images, drawn by the seed, held out for validation (:func:`normlab.claims.design.split`);
- the model: ``normlab.models.resnet`` at ResNet-20 (:data:`RESNET20`; depth ``6n + 2``);
- the recipe (:data:`TRAIN`): SGD with momentum 0.9, weight decay 1e-4 on every
  parameter, a cosine schedule, random crops with 4-pixel padding and horizontal flips,
  from He et al.'s rate 0.1 at batch 128 scaled linearly to the batch
  (:func:`linear_lr`; Goyal et al. 2017);
- the arms: fixed rates (no selection, as in the papers), every arm and seed in one
  :meth:`normlab.claims.base.RunContext.map` call (:func:`run_arms`).

Not a claim module (the leading underscore keeps :func:`normlab.claims.all_claims`
from loading it as one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from normlab.claims.base import RunContext

__all__ = ["DATA", "MODEL", "RESNET20", "BASE_LR", "BASE_BATCH", "BATCH_SWEEP_EPOCHS", "TRAIN",
           "linear_lr", "num_train", "steps_for", "run_kwargs", "run_arms"]

DATA = "cifar10"
MODEL = "resnet"
#: ResNet-20: ``normlab.models.resnet`` with 3 basic blocks a stage, widths 16/32/64.
RESNET20 = {"width": 16, "depth": 3}
#: He et al.'s CIFAR rate and the batch it belongs to.
BASE_LR, BASE_BATCH = 0.1, 128
#: Epochs of every arm of the batch-size claims (7, 8 and 10): one value, so that the
#: arms they share (BN and GN at batch 4 and 32) are the same runs, computed once.
BATCH_SWEEP_EPOCHS = 10.0
#: He et al.'s recipe, passed to :func:`normlab.train.train` (the rate and steps apart).
TRAIN = {"momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine", "augment": "crop_flip"}


def linear_lr(batch: int, base_lr: float = BASE_LR) -> float:
    """``base_lr * batch / 128`` (the linear scaling rule), rounded to 6 significant
    digits so that the run key does not carry float noise."""
    return float(f"{base_lr * batch / BASE_BATCH:.6g}")


def num_train(ctx: RunContext) -> int:
    """Training images left after the validation fifth (40,000 for the real CIFAR-10)."""
    from normlab.claims.design import split

    return split(DATA, 0, data_dir=ctx.data_dir)[0].num_train


def steps_for(ctx: RunContext, epochs: float, batch: int, n_train: int) -> int:
    """``epochs`` passes over ``n_train`` images at ``batch``, times the budget's step
    scale."""
    return ctx.budget.steps(round(epochs * n_train / batch))


def run_kwargs(ctx: RunContext, *, norm: str, batch: int, seed: int, steps: int,
               lr: float | None = None, model_kwargs: Mapping | None = None) -> dict:
    """The :func:`normlab.claims.design.train_run` arguments of one paper-scale run:
    ResNet-20 (or ``model_kwargs``) with ``norm`` on CIFAR-10 from ``ctx.data_dir``, the
    recipe :data:`TRAIN`, at ``lr`` (default :func:`linear_lr` of ``batch``), evaluated
    on the test set at the end, the training loss logged about 200 times."""
    return {"model": MODEL, "norm": norm, "data": DATA, "data_dir": ctx.data_dir,
            "batch_size": batch, "lr": linear_lr(batch) if lr is None else lr,
            "steps": steps, "seed": seed,
            "model_kwargs": dict(RESNET20 if model_kwargs is None else model_kwargs),
            "train_kwargs": {**TRAIN, "eval_every": steps, "log_every": max(1, steps // 200)}}


def run_arms(ctx: RunContext, arms: Mapping[str, Mapping], epochs: float,
             fn: Callable | None = None) -> dict:
    """Train every arm on every seed of the budget at fixed rates, in one batch of runs.

    ``arms`` maps an arm's name to the keywords of :func:`run_kwargs` other than
    ``seed`` and ``steps`` (``norm`` and ``batch`` at least); each arm trains ``epochs``
    epochs with ``fn`` (a module-level run function taking the arguments of
    :func:`normlab.claims.design.train_run`; default ``train_run`` itself). Returns
    ``{"acc": {arm: [test accuracy in points per seed]}, "lr": {arm: rate}, "steps":
    {arm: steps}, "runs": {arm: [result per seed]}}``; a diverged run counts at chance
    (:func:`normlab.claims.design.accuracy_or_chance`).
    """
    from normlab.claims.design import accuracy_or_chance, train_run
    from normlab.claims.protocol import points

    n_train, seeds = num_train(ctx), list(ctx.seeds)
    kwargs, steps = [], {}
    for name, arm in arms.items():
        steps[name] = steps_for(ctx, epochs, arm["batch"], n_train)
        kwargs += [run_kwargs(ctx, seed=s, steps=steps[name], **arm) for s in seeds]
    results = ctx.map(train_run if fn is None else fn, kwargs)
    out: dict = {"acc": {}, "lr": {}, "steps": steps, "runs": {}}
    for i, name in enumerate(arms):
        chunk = results[i * len(seeds):(i + 1) * len(seeds)]
        out["runs"][name] = chunk
        out["acc"][name] = [points(accuracy_or_chance(r)) for r in chunk]
        out["lr"][name] = kwargs[i * len(seeds)]["lr"]
    return out
