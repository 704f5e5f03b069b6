"""One plain, deterministic training loop for classification, with a progress bar.

:func:`train` takes any ``nn.Module`` mapping a batch of ``x`` to class logits and any
``(x, y)`` tensors (or a :class:`normlab.data.Dataset`), runs a fixed number of
optimizer steps, and returns a :class:`TrainResult` whose :meth:`TrainResult.to_dict`
is JSON-serialisable: the loss and accuracy curves, the test accuracy at each
evaluation, timings, whether it diverged, and the configuration.

Determinism: batches come from a ``torch.Generator`` seeded with ``seed`` (a fresh
permutation every epoch, the last partial batch dropped, since batch norm needs more
than one sample), and the global torch RNG (dropout, stochastic layers) is seeded with
``seed`` inside a forked RNG state, so the caller's RNG is left as it was. Same model
initial state + same data + same seed = the same numbers, bit for bit, on the same
machine and thread count.

Divergence: a non-finite training loss (or gradient norm, when clipping), or a loss
above ``divergence_loss``, stops the run before the update and marks it
``diverged``; nothing raises.

Distributed training: nothing here assumes a single process. Pass the model already
wrapped (e.g. in ``DistributedDataParallel``) together with ``rank`` and
``world_size``: every rank draws the same permutation (same seed) and takes its own
slice of each global batch of ``batch_size * world_size`` samples (``batch_size`` is
per rank); only rank 0 shows progress.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from normlab.nn.checks import check_int, check_number

__all__ = ["TrainResult", "train", "evaluate", "batch_indices", "lr_at", "crop_flip",
           "AUGMENTATIONS"]

#: What ``train(augment=...)`` accepts besides None.
AUGMENTATIONS = ("crop_flip",)


@dataclass
class TrainResult:
    """What :func:`train` measured.

    Attributes:
        steps: optimizer steps requested. steps_done: steps actually taken.
        diverged: the run stopped on a non-finite (or too large) loss or gradient.
        diverged_step: the step at which it did (0-based), else None.
        diverged_reason: why.
        final_test_acc, final_test_loss: on the test set after the last step (None
            without test data). best_test_acc: the best over the evaluations.
        final_train_loss: mean of the training losses logged over the last 10% of the
            steps taken (at least one).
        wall_time_s: the whole call; train_time_s: the steps only (no evaluation).
        steps_per_s, samples_per_s: training speed (samples summed over ranks).
        num_params: trainable parameters of the model.
        curve: ``{"step": [...], "loss": [...], "acc": [...], "lr": [...]}``, the
            training batch's loss and accuracy every ``log_every`` steps (step counts
            from 1 = after the first update's forward).
        evals: ``{"step": [...], "test_acc": [...], "test_loss": [...]}``.
        config: the hyper-parameters of the run.
    """

    steps: int
    steps_done: int = 0
    diverged: bool = False
    diverged_step: int | None = None
    diverged_reason: str | None = None
    final_test_acc: float | None = None
    final_test_loss: float | None = None
    best_test_acc: float | None = None
    final_train_loss: float | None = None
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    steps_per_s: float = 0.0
    samples_per_s: float = 0.0
    num_params: int = 0
    curve: dict = field(default_factory=lambda: {"step": [], "loss": [], "acc": [], "lr": []})
    evals: dict = field(default_factory=lambda: {"step": [], "test_acc": [], "test_loss": []})
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-safe dict: non-finite floats (a diverged loss) become None."""
        return _json_safe(asdict(self))

    def to_json(self, path: str | os.PathLike | None = None, indent: int | None = 2) -> str:
        """The result as JSON text (strict: no NaN), also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.device | torch.dtype):
        return str(obj)
    return repr(obj)


# --------------------------------------------------------------------------- pieces


def batch_indices(n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
                  ) -> Iterator[Tensor]:
    """Endless batches of indices into ``n`` samples: each epoch a permutation drawn by
    a generator seeded with ``seed``, cut into global batches of
    ``batch_size * world_size`` (the last partial one dropped); ``rank`` gets slice
    ``[rank * batch_size, (rank + 1) * batch_size)`` of each."""
    global_bs = batch_size * world_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if n < global_bs:
        raise ValueError(f"{n} training samples cannot fill one batch of {batch_size}"
                         + (f" x {world_size} ranks" if world_size > 1 else ""))
    gen = torch.Generator().manual_seed(int(seed))
    per_epoch = n // global_bs
    lo, hi = rank * batch_size, (rank + 1) * batch_size
    while True:
        perm = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            yield perm[b * global_bs:(b + 1) * global_bs][lo:hi]


def lr_at(step: int, steps: int, lr: float, schedule: str = "constant",
          warmup_steps: int = 0) -> float:
    """The learning rate of (0-based) ``step``: linear warm-up from ``lr/warmup_steps``
    over ``warmup_steps``, then ``"constant"`` or ``"cosine"`` (half a cosine from
    ``lr`` to 0 over the remaining steps)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(steps - warmup_steps, 1)
        t = min(max(step - warmup_steps, 0), span) / span
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")


def crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    r"""The standard CIFAR augmentation (He et al. 2016): pad each image with ``pad``
    zeros on every side, crop it back to its size at a random offset and flip it
    left-right with probability 1/2.

    For image :math:`n` with offsets :math:`a_n, b_n` drawn uniformly from
    :math:`\{0, \dots, 2\,\mathrm{pad}\}` and a flip :math:`f_n \in \{0, 1\}`, and
    :math:`\tilde x` the zero-padded batch,

    .. math::
        y_{n,c,i,j} = \tilde x_{n,\,c,\,i + a_n,\,j'_n + b_n}, \qquad
        j'_n = \begin{cases} W - 1 - j & f_n = 1 \\ j & f_n = 0. \end{cases}

    Args:
        x: a batch of images.
        generator: the CPU generator the offsets and flips are drawn from (so the
            augmentation is reproducible and leaves the global RNG alone).
        pad: the padding, in pixels. Default: 4.

    Shape:
        - Input: :math:`(N, C, H, W)`.
        - Output: :math:`(N, C, H, W)`, on the device of the input.
    """
    if x.dim() != 4:
        raise ValueError(f"crop_flip: expected images (N, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"crop_flip: pad must be an int >= 0, got {pad!r}")
    n, _, h, w = x.shape
    dev = x.device
    a = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    b = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    flip = torch.randint(0, 2, (n,), generator=generator).bool().to(dev)
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    rows = a[:, None] + torch.arange(h, device=dev)
    j = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], w - 1 - j, j) + b[:, None]
    # One gather for the whole batch: advanced indices around the channel slice put the
    # (N, H, W) index dimensions first, so channels come last and are moved back.
    out = padded[torch.arange(n, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256,
             loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
             device: str | torch.device | None = None, accuracy: bool = True
             ) -> tuple[float, float | None]:
    """``(mean loss, accuracy)`` of ``model`` in eval mode on ``(x, y)``, in batches of
    ``batch_size``; the model's training mode is restored. A sample whose logits are
    not all finite counts as wrong (and makes the loss non-finite). ``accuracy=False``
    (a regression model, whose outputs are no logits) gives ``(mean loss, None)``."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, int(x.shape[0])
    try:
        for i in range(0, n, batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            total_loss += float(loss_fn(out, yb)) * xb.shape[0]
            if accuracy:
                ok = (out.argmax(1) == yb) & torch.isfinite(out).all(1)
                correct += int(ok.sum())
    finally:
        model.train(was_training)
    return total_loss / max(n, 1), (correct / max(n, 1) if accuracy else None)


def _check_arguments(**kw) -> None:
    """The numeric arguments of :func:`train`, before anything runs: a negative clip
    norm would flip the gradient (clip_grad_norm_ scales by max_norm / norm), a NaN
    learning rate would only show as a diverged run."""
    check_int("train", "steps", kw["steps"], low=0)
    check_int("train", "batch_size", kw["batch_size"], low=1)
    check_int("train", "warmup_steps", kw["warmup_steps"], low=0)
    check_int("train", "eval_every", kw["eval_every"], low=1, allow_none=True)
    check_int("train", "log_every", kw["log_every"], low=1)
    check_number("train", "lr", kw["lr"], low=0.0)
    check_number("train", "momentum", kw["momentum"], low=0.0, high=1.0, high_open=True)
    check_number("train", "weight_decay", kw["weight_decay"], low=0.0)
    check_number("train", "clip_grad_norm", kw["clip_grad_norm"], low=0.0, low_open=True,
                 allow_none=True)


def _make_optimizer(optimizer, params, lr, momentum, weight_decay, nesterov):
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer(params)
    name = str(optimizer).lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd', 'adam', 'adamw' or a callable(params), "
                     f"got {optimizer!r}")


class _Progress:
    """A rich progress bar (steps, loss, accuracy, test accuracy, speed, ETA), or
    nothing."""

    def __init__(self, enabled: bool | None, total: int, desc: str, batch: int) -> None:
        self.bar = None
        self.batch = batch
        if enabled is False:
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
        except ImportError:  # rich is an optional (lab) dependency
            return
        console = Console(file=sys.stderr)
        if enabled is None and not console.is_terminal:
            return
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"),
            TextColumn("acc [cyan]{task.fields[acc]}"),
            TextColumn("test [green]{task.fields[test]}"),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            refresh_per_second=8,
        )
        self.task = self.bar.add_task(desc, total=total, loss="-", acc="-", test="-",
                                      speed="")
        self.bar.start()

    def update(self, step: int, loss: float, acc: float | None, speed: float,
               test: float | None = None) -> None:
        if self.bar is None:
            return
        fields = {"loss": f"{loss:.4f}", "acc": "-" if acc is None else f"{acc:.3f}",
                  "speed": f"{speed:.1f} it/s {speed * self.batch:.0f} samples/s"}
        if test is not None:
            fields["test"] = f"{test:.4f}"
        self.bar.update(self.task, completed=step, **fields)

    def close(self, note: str = "") -> None:
        if self.bar is None:
            return
        if note:
            self.bar.update(self.task, description=note)
        self.bar.stop()


def _agree_on_divergence(reason: str | None, device: torch.device) -> str | None:
    """With several ranks, all stop when any sees a bad loss (otherwise the others
    would wait forever in the gradient all-reduce)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return reason
    flag = torch.tensor([0.0 if reason is None else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if reason is None and float(flag) > 0:
        return "non-finite or too large loss on another rank"
    return reason


def _batch_accuracy(out: Tensor, y: Tensor) -> float:
    return float((out.detach().argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- the loop


def _augmenter(augment: str | None, x_train, seed: int) -> torch.Generator | None:
    """The generator of ``train(augment=...)``'s draws, or None without augmentation."""
    if augment is None:
        return None
    if augment not in AUGMENTATIONS:
        raise ValueError(f"train: augment must be None or one of {list(AUGMENTATIONS)}, "
                         f"got {augment!r}")
    if x_train.dim() != 4:
        raise ValueError(f"train: augment={augment!r} needs images (N, C, H, W), got "
                         f"training inputs of shape {tuple(x_train.shape)}")
    # Offset from seed: the batch order's generator is seeded with seed itself.
    return torch.Generator().manual_seed(int(seed) + 1_000_003)


def train(
    model: nn.Module,
    x_train,
    y_train: Tensor | None = None,
    x_test: Tensor | None = None,
    y_test: Tensor | None = None,
    *,
    steps: int = 500,
    batch_size: int = 32,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    optimizer: str | Callable = "sgd",
    schedule: str = "constant",
    warmup_steps: int = 0,
    clip_grad_norm: float | None = None,
    seed: int = 0,
    eval_every: int | None = None,
    log_every: int = 1,
    eval_batch_size: int = 256,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    desc: str = "train",
    divergence_loss: float | None = None,
    rank: int = 0,
    world_size: int = 1,
    callbacks: Sequence[Callable[[int, nn.Module, dict], object]] = (),
    config: dict | None = None,
    scheduler: Callable[[torch.optim.Optimizer], object] | None = None,
    accuracy: bool = True,
    augment: str | None = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps on mini-batches of ``(x_train,
    y_train)`` and evaluate it on ``(x_test, y_test)``.

    Args:
        model: any module mapping a batch of inputs to logits ``(N, num_classes)``
            (moved to ``device``; may be wrapped in DistributedDataParallel).
        x_train, y_train: training tensors (first dimension = samples), or pass a
            :class:`normlab.data.Dataset` as ``x_train`` and nothing else.
        x_test, y_test: optional evaluation tensors.
        steps: optimizer steps. batch_size: samples per step (per rank).
        lr, momentum, weight_decay, nesterov: SGD's (momentum 0.9 by default); weight
            decay applies to every parameter.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``callable(params) ->
            Optimizer``. The schedule multiplies each parameter group's own initial
            learning rate by ``lr_at(step) / lr``, so groups a callable gives different
            rates (Fixup's scalars at lr/10, say) keep their ratios.
        schedule: ``"constant"`` or ``"cosine"``; warmup_steps: linear warm-up.
        clip_grad_norm: clip the global gradient norm to this value (None: no clipping).
        seed: batches and the RNG of stochastic layers (dropout).
        eval_every: evaluate every this many steps (default ``steps // 10``) and after
            the last step.
        log_every: record the training loss/accuracy every this many steps.
        loss_fn: ``loss(logits, y)``; default cross-entropy.
        progress: True / False / None (auto: on when stderr is a terminal; rank 0 only).
        divergence_loss: also stop when the loss exceeds this.
        rank, world_size: see the module docstring.
        callbacks: each called as ``cb(step, model, info)`` after every update, with
            ``info = {"loss": float, "lr": float}`` (``step`` counts from 1); a callback
            returning ``True`` stops the run early (not marked diverged).
        config: extra entries stored in ``result.config`` (e.g. the model's name).
        scheduler: ``scheduler(optimizer)`` returning a torch learning-rate scheduler
            (anything with ``step()``), stepped after every optimizer step; it then owns
            the rates (``schedule`` must stay ``"constant"`` and ``warmup_steps`` 0), and
            the curve's ``lr`` is the first group's rate each step used.
        accuracy: False for a regression model (outputs are no class logits, e.g. with
            ``loss_fn=mse_loss``): no training or test accuracy is computed (None in the
            curve and the result); losses and divergence work as for classification.
        augment: None (default) or ``"crop_flip"``: every training batch goes through
            :func:`crop_flip` (4-pixel padding), drawn from a generator of its own
            seeded by ``seed``, so the batch order and dropout draw what they would
            without it. Needs images ``(N, C, H, W)``.

    Returns:
        A :class:`TrainResult`.
    """
    if y_train is None and hasattr(x_train, "x_train"):
        ds = x_train
        x_train, y_train, x_test, y_test = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if y_train is None:
        raise TypeError("train: pass (x_train, y_train) tensors or a normlab.data.Dataset")
    if len(x_train) != len(y_train):
        raise ValueError(f"train: x_train has {len(x_train)} samples but y_train "
                         f"{len(y_train)}")
    if (x_test is None) != (y_test is None):
        raise ValueError("train: pass both x_test and y_test, or neither")
    _check_arguments(steps=steps, batch_size=batch_size, lr=lr, momentum=momentum,
                     weight_decay=weight_decay, warmup_steps=warmup_steps,
                     clip_grad_norm=clip_grad_norm, eval_every=eval_every, log_every=log_every)
    if scheduler is not None and (schedule != "constant" or warmup_steps):
        raise ValueError(f"train: a scheduler owns the learning rates; schedule must be "
                         f"'constant' and warmup_steps 0 with it, got schedule={schedule!r}, "
                         f"warmup_steps={warmup_steps}")
    loss_fn = loss_fn or nn.functional.cross_entropy
    eval_every = eval_every or max(steps // 10, 1)
    device = torch.device(device)
    lr_at(0, steps, lr, schedule, warmup_steps)  # validates the schedule name
    aug_gen = _augmenter(augment, x_train, seed)

    t_start = time.perf_counter()
    model.to(device)
    x_train, y_train = x_train.to(device), y_train.to(device)
    if x_test is not None:
        x_test, y_test = x_test.to(device), y_test.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, lr, momentum, weight_decay, nesterov)
    # Each group's rate relative to `lr`: the schedule scales them all alike.
    lr_ratios = [group["lr"] / lr if lr else 1.0 for group in opt.param_groups]
    sched = scheduler(opt) if scheduler is not None else None
    result = TrainResult(steps=steps, num_params=sum(p.numel() for p in params))
    result.config = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "momentum": momentum,
        "weight_decay": weight_decay, "nesterov": nesterov,
        "optimizer": optimizer if isinstance(optimizer, str) else repr(optimizer),
        "schedule": schedule if sched is None else type(sched).__name__,
        "warmup_steps": warmup_steps,
        "clip_grad_norm": clip_grad_norm,
        "seed": seed, "eval_every": eval_every, "log_every": log_every,
        "device": str(device), "world_size": world_size, "num_train": int(len(x_train)),
        "num_test": int(len(x_test)) if x_test is not None else 0, "augment": augment,
        **(config or {}),
    }
    batches = batch_indices(len(x_train), batch_size, seed, rank, world_size)
    bar = _Progress(progress if rank == 0 else False, steps, desc, batch_size * world_size)
    ema_loss = ema_acc = None
    train_time = 0.0
    devices = [device.index or 0] if device.type == "cuda" else []  # CPU RNG is always forked

    def run_eval(step: int) -> None:
        loss, acc = evaluate(model, x_test, y_test, eval_batch_size, loss_fn,
                             accuracy=accuracy)
        result.evals["step"].append(step)
        result.evals["test_acc"].append(acc)
        result.evals["test_loss"].append(loss)

    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.train()
            for step in range(steps):
                t0 = time.perf_counter()
                idx = next(batches).to(device)
                xb, yb = x_train[idx], y_train[idx]
                if aug_gen is not None:
                    xb = crop_flip(xb, aug_gen)
                out = model(xb)
                loss = loss_fn(out, yb)
                loss_value = float(loss.detach())
                reason = None
                if not math.isfinite(loss_value):
                    reason = f"non-finite loss ({loss_value})"
                elif divergence_loss is not None and loss_value > divergence_loss:
                    reason = f"loss {loss_value:.4g} > divergence_loss {divergence_loss}"
                if world_size > 1:
                    reason = _agree_on_divergence(reason, device)
                if sched is not None:
                    lr_now = float(opt.param_groups[0]["lr"])
                else:
                    lr_now = lr_at(step, steps, lr, schedule, warmup_steps)
                if reason is None:
                    if sched is None:
                        for group, ratio in zip(opt.param_groups, lr_ratios, strict=True):
                            group["lr"] = lr_now * ratio
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if clip_grad_norm is not None:
                        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
                        if not torch.isfinite(norm):
                            reason = f"non-finite gradient norm ({float(norm)})"
                if reason is None:
                    opt.step()
                    if sched is not None:
                        sched.step()
                train_time += time.perf_counter() - t0
                acc = _batch_accuracy(out, yb) if accuracy else None
                if reason is None:
                    result.steps_done = step + 1
                if (step + 1) % log_every == 0 or reason is not None or step + 1 == steps:
                    result.curve["step"].append(step + 1)
                    result.curve["loss"].append(loss_value)
                    result.curve["acc"].append(acc)
                    result.curve["lr"].append(lr_now)
                if reason is not None:
                    result.diverged, result.diverged_step = True, step
                    result.diverged_reason = reason
                    break
                ema_loss = loss_value if ema_loss is None else 0.9 * ema_loss + 0.1 * loss_value
                if acc is not None:
                    ema_acc = acc if ema_acc is None else 0.9 * ema_acc + 0.1 * acc
                test = None
                if x_test is not None and (step + 1) % eval_every == 0 and step + 1 < steps:
                    run_eval(step + 1)
                    test = result.evals["test_acc"][-1]
                bar.update(step + 1, ema_loss, ema_acc, (step + 1) / max(train_time, 1e-9),
                           test)
                stop = False
                for cb in callbacks:
                    stop = bool(cb(step + 1, model, {"loss": loss_value, "lr": lr_now})) or stop
                if stop:
                    break
            if x_test is not None:
                run_eval(result.steps_done)
                result.final_test_loss = result.evals["test_loss"][-1]
                result.final_test_acc = result.evals["test_acc"][-1]
                result.best_test_acc = max(result.evals["test_acc"]) if accuracy else None
                bar.update(result.steps_done, ema_loss or float("nan"), ema_acc,
                           result.steps_done / max(train_time, 1e-9), result.final_test_acc)
    finally:
        bar.close("diverged" if result.diverged else "")

    losses = [v for s, v in zip(result.curve["step"], result.curve["loss"], strict=True)
              if s <= result.steps_done]
    if losses:
        tail = max(1, math.ceil(0.1 * len(losses)))
        result.final_train_loss = sum(losses[-tail:]) / tail
    result.train_time_s = train_time
    result.wall_time_s = time.perf_counter() - t_start
    taken = result.steps_done
    result.steps_per_s = taken / train_time if train_time > 0 else 0.0
    result.samples_per_s = result.steps_per_s * batch_size * world_size
    return result
