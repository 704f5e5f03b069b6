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
from typing import Any

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


# --------------------------------------------------------------------------- the loop's parts


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


@dataclass
class _Args:
    """The arguments of one :func:`train` call, as one object the loop's parts share
    (field names are :func:`train`'s parameter names)."""

    model: nn.Module
    x_train: Any
    y_train: Tensor | None
    x_test: Tensor | None
    y_test: Tensor | None
    steps: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool
    optimizer: str | Callable
    schedule: str
    warmup_steps: int
    clip_grad_norm: float | None
    seed: int
    eval_every: int | None
    log_every: int
    eval_batch_size: int
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None
    device: Any
    progress: bool | None
    desc: str
    divergence_loss: float | None
    rank: int
    world_size: int
    callbacks: Sequence[Callable[[int, nn.Module, dict], object]]
    config: dict | None
    scheduler: Callable[[torch.optim.Optimizer], object] | None
    accuracy: bool
    augment: str | None
    aug_gen: torch.Generator | None = None  # set by _check_args, not an argument


def _check_args(a: _Args) -> _Args:
    """``a`` with a Dataset unpacked and the defaults filled in, or a clear error
    before the model or anything else is touched."""
    if a.y_train is None and hasattr(a.x_train, "x_train"):
        ds = a.x_train
        a.x_train, a.y_train, a.x_test, a.y_test = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if a.y_train is None:
        raise TypeError("train: pass (x_train, y_train) tensors or a normlab.data.Dataset")
    if len(a.x_train) != len(a.y_train):
        raise ValueError(f"train: x_train has {len(a.x_train)} samples but y_train "
                         f"{len(a.y_train)}")
    if (a.x_test is None) != (a.y_test is None):
        raise ValueError("train: pass both x_test and y_test, or neither")
    _check_arguments(steps=a.steps, batch_size=a.batch_size, lr=a.lr, momentum=a.momentum,
                     weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
                     clip_grad_norm=a.clip_grad_norm, eval_every=a.eval_every,
                     log_every=a.log_every)
    if a.scheduler is not None and (a.schedule != "constant" or a.warmup_steps):
        raise ValueError(f"train: a scheduler owns the learning rates; schedule must be "
                         f"'constant' and warmup_steps 0 with it, got "
                         f"schedule={a.schedule!r}, warmup_steps={a.warmup_steps}")
    a.loss_fn = a.loss_fn or nn.functional.cross_entropy
    a.eval_every = a.eval_every or max(a.steps // 10, 1)
    a.device = torch.device(a.device)
    lr_at(0, a.steps, a.lr, a.schedule, a.warmup_steps)  # validates the schedule name
    a.aug_gen = _augmenter(a.augment, a.x_train, a.seed)
    return a


def _config(a: _Args, sched, num_train: int) -> dict:
    """The hyper-parameters stored in ``TrainResult.config``."""
    return {
        "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "momentum": a.momentum,
        "weight_decay": a.weight_decay, "nesterov": a.nesterov,
        "optimizer": a.optimizer if isinstance(a.optimizer, str) else repr(a.optimizer),
        "schedule": a.schedule if sched is None else type(sched).__name__,
        "warmup_steps": a.warmup_steps,
        "clip_grad_norm": a.clip_grad_norm,
        "seed": a.seed, "eval_every": a.eval_every, "log_every": a.log_every,
        "device": str(a.device), "world_size": a.world_size, "num_train": num_train,
        "num_test": int(len(a.x_test)) if a.x_test is not None else 0,
        "augment": a.augment, **(a.config or {}),
    }


def _divergence(loss_value: float, divergence_loss: float | None) -> str | None:
    """Why a step's loss stops the run, or None."""
    if not math.isfinite(loss_value):
        return f"non-finite loss ({loss_value})"
    if divergence_loss is not None and loss_value > divergence_loss:
        return f"loss {loss_value:.4g} > divergence_loss {divergence_loss}"
    return None


class _Loop:
    """One run's state from step to step: optimizer, schedule, result, progress bar,
    the running averages the bar shows, and the time spent in steps."""

    def __init__(self, a: _Args) -> None:
        self.a = a
        self.t_start = time.perf_counter()
        a.model.to(a.device)
        a.x_train, a.y_train = a.x_train.to(a.device), a.y_train.to(a.device)
        if a.x_test is not None:
            a.x_test, a.y_test = a.x_test.to(a.device), a.y_test.to(a.device)
        self.params = [p for p in a.model.parameters() if p.requires_grad]
        self.opt = _make_optimizer(a.optimizer, self.params, a.lr, a.momentum,
                                   a.weight_decay, a.nesterov)
        # Each group's rate relative to `lr`: the schedule scales them all alike.
        self.lr_ratios = [group["lr"] / a.lr if a.lr else 1.0
                          for group in self.opt.param_groups]
        self.sched = a.scheduler(self.opt) if a.scheduler is not None else None
        # Optimizer.zero_grad(set_to_none=True) only sets each grad to None, behind a
        # profiler region and a compiler guard that cost more than that per step; an
        # optimizer class with its own zero_grad keeps it.
        self.grads_to_clear = None
        if type(self.opt).zero_grad is torch.optim.Optimizer.zero_grad:
            self.grads_to_clear = [p for group in self.opt.param_groups
                                   for p in group["params"]]
        self.result = TrainResult(steps=a.steps,
                                  num_params=sum(p.numel() for p in self.params))
        self.result.config = _config(a, self.sched, int(len(a.x_train)))
        self.batches = batch_indices(len(a.x_train), a.batch_size, a.seed, a.rank,
                                     a.world_size)
        self.bar = _Progress(a.progress if a.rank == 0 else False, a.steps, a.desc,
                             a.batch_size * a.world_size)
        self.ema_loss = self.ema_acc = None
        self.train_time = 0.0

    def lr(self, step: int) -> float:
        """The rate of ``step`` (0-based): the schedule's, or the scheduler's first
        group's."""
        a = self.a
        if self.sched is not None:
            return float(self.opt.param_groups[0]["lr"])
        return lr_at(step, a.steps, a.lr, a.schedule, a.warmup_steps)

    def step(self, step: int) -> tuple[float, Tensor, Tensor, float, str | None]:
        """One optimizer step: ``(loss, logits, targets, rate, why it diverged or
        None)``; a diverging step updates nothing."""
        a = self.a
        t0 = time.perf_counter()
        idx = next(self.batches).to(a.device)
        xb, yb = a.x_train[idx], a.y_train[idx]
        if a.aug_gen is not None:
            xb = crop_flip(xb, a.aug_gen)
        out = a.model(xb)
        loss = a.loss_fn(out, yb)
        loss_value = float(loss.detach())
        reason = _divergence(loss_value, a.divergence_loss)
        if a.world_size > 1:
            reason = _agree_on_divergence(reason, a.device)
        lr_now = self.lr(step)
        if reason is None:
            reason = self.update(loss, lr_now)
        self.train_time += time.perf_counter() - t0
        return loss_value, out, yb, lr_now, reason

    def update(self, loss: Tensor, lr_now: float) -> str | None:
        """Backward, clip and step; why the gradient stops the run, or None."""
        a = self.a
        if self.sched is None:
            for group, ratio in zip(self.opt.param_groups, self.lr_ratios, strict=True):
                group["lr"] = lr_now * ratio
        if self.grads_to_clear is None:
            self.opt.zero_grad(set_to_none=True)
        else:
            for p in self.grads_to_clear:
                p.grad = None
        loss.backward()
        if a.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, a.clip_grad_norm)
            if not torch.isfinite(norm):
                return f"non-finite gradient norm ({float(norm)})"
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        return None

    def record(self, step: int, loss_value: float, out: Tensor, yb: Tensor, lr_now: float,
               reason: str | None) -> bool:
        """Log step ``step`` (0-based), evaluate when due, show progress and call the
        callbacks; True when the run stops here."""
        a, r = self.a, self.result
        logged = (step + 1) % a.log_every == 0 or reason is not None or step + 1 == a.steps
        acc = _batch_accuracy(out, yb) if a.accuracy else None
        if reason is None:
            r.steps_done = step + 1
        if logged:
            r.curve["step"].append(step + 1)
            r.curve["loss"].append(loss_value)
            r.curve["acc"].append(acc)
            r.curve["lr"].append(lr_now)
        if reason is not None:
            r.diverged, r.diverged_step, r.diverged_reason = True, step, reason
            return True
        self.ema_loss = (loss_value if self.ema_loss is None
                         else 0.9 * self.ema_loss + 0.1 * loss_value)
        if acc is not None:
            self.ema_acc = acc if self.ema_acc is None else 0.9 * self.ema_acc + 0.1 * acc
        test = None
        if a.x_test is not None and (step + 1) % a.eval_every == 0 and step + 1 < a.steps:
            self.evaluate(step + 1)
            test = r.evals["test_acc"][-1]
        self.bar.update(step + 1, self.ema_loss, self.ema_acc,
                        (step + 1) / max(self.train_time, 1e-9), test)
        stop = False
        for cb in a.callbacks:
            stop = bool(cb(step + 1, a.model, {"loss": loss_value, "lr": lr_now})) or stop
        return stop

    def evaluate(self, step: int) -> None:
        a, r = self.a, self.result
        loss, acc = evaluate(a.model, a.x_test, a.y_test, a.eval_batch_size, a.loss_fn,
                             accuracy=a.accuracy)
        r.evals["step"].append(step)
        r.evals["test_acc"].append(acc)
        r.evals["test_loss"].append(loss)

    def final_evaluation(self) -> None:
        r = self.result
        self.evaluate(r.steps_done)
        r.final_test_loss = r.evals["test_loss"][-1]
        r.final_test_acc = r.evals["test_acc"][-1]
        r.best_test_acc = max(r.evals["test_acc"]) if self.a.accuracy else None
        self.bar.update(r.steps_done, self.ema_loss or float("nan"), self.ema_acc,
                        r.steps_done / max(self.train_time, 1e-9), r.final_test_acc)

    def summary(self) -> TrainResult:
        """The result with the final training loss and the timings filled in."""
        a, r = self.a, self.result
        losses = [v for s, v in zip(r.curve["step"], r.curve["loss"], strict=True)
                  if s <= r.steps_done]
        if losses:
            tail = max(1, math.ceil(0.1 * len(losses)))
            r.final_train_loss = sum(losses[-tail:]) / tail
        r.train_time_s = self.train_time
        r.wall_time_s = time.perf_counter() - self.t_start
        r.steps_per_s = r.steps_done / self.train_time if self.train_time > 0 else 0.0
        r.samples_per_s = r.steps_per_s * a.batch_size * a.world_size
        return r


def _run(a: _Args) -> TrainResult:
    loop = _Loop(a)
    devices = [a.device.index or 0] if a.device.type == "cuda" else []  # CPU RNG is always forked
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(a.seed)
            a.model.train()
            for step in range(a.steps):
                if loop.record(step, *loop.step(step)):
                    break
            if a.x_test is not None:
                loop.final_evaluation()
    finally:
        loop.bar.close("diverged" if loop.result.diverged else "")
    return loop.summary()


# --------------------------------------------------------------------------- the loop


def train(
    model: nn.Module, x_train, y_train: Tensor | None = None, x_test: Tensor | None = None,
    y_test: Tensor | None = None, *, steps: int = 500, batch_size: int = 32, lr: float = 0.1,
    momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False,
    optimizer: str | Callable = "sgd", schedule: str = "constant", warmup_steps: int = 0,
    clip_grad_norm: float | None = None, seed: int = 0, eval_every: int | None = None,
    log_every: int = 1, eval_batch_size: int = 256,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    device: str | torch.device = "cpu", progress: bool | None = None, desc: str = "train",
    divergence_loss: float | None = None, rank: int = 0, world_size: int = 1,
    callbacks: Sequence[Callable[[int, nn.Module, dict], object]] = (),
    config: dict | None = None, scheduler: Callable[[torch.optim.Optimizer], object] | None = None,
    accuracy: bool = True, augment: str | None = None,
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
    # Every name above is an _Args field: the parts share them as one object.
    return _run(_check_args(_Args(**locals())))
