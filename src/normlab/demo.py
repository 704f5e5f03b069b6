"""A short, real comparison of normalization layers (``normlab demo``).

A small CNN is trained on scikit-learn's 8x8 handwritten digits (real data shipped
with scikit-learn: 1,438 training and 359 test images) with each normalization at a
tiny and a normal batch size, from the same seed, for the same number of epochs, with
the learning rate scaled linearly with the batch size, and the test accuracies are
printed side by side. It runs in well under a minute on two CPU cores. The lab's
claims are the place for evidence; this is the quick look.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from normlab import data, models
from normlab.registry import get_norm_spec
from normlab.train import train


def run_demo(
    norms: Sequence[str] = ("none", "bn", "gn", "ln"),
    batch_sizes: Sequence[int] = (2, 32),
    epochs: int = 4,
    lr: float = 0.05,
    seed: int = 0,
    dataset: str = "digits",
    json_path: str | None = None,
    threads: int = 1,
    print_fn=print,
) -> list[dict]:
    """Train ``models.cnn`` on ``dataset`` for every norm and batch size; print a table.

    Each run takes ``epochs * num_train // batch_size`` SGD steps (momentum 0.9) at
    learning rate ``lr * batch_size / 32``.

    Returns one dict per run: norm, batch_size, test_acc, diverged, seconds.
    """
    for name in norms:
        get_norm_spec(name)  # unknown names fail before any training
    torch.set_num_threads(threads)
    ds = data.load(dataset, seed=seed)
    print_fn(f"normlab demo: CNN on {dataset} ({ds.num_train} train / {ds.num_test} test "
             f"images), {epochs} epochs of SGD at lr {lr} x batch/32, seed {seed}")
    rows = []
    for name in norms:
        for batch_size in batch_sizes:
            torch.manual_seed(seed)
            model = models.cnn(ds.in_shape, ds.num_classes, norm=name)
            start = time.perf_counter()
            steps = max(1, epochs * ds.num_train // batch_size)
            result = train(model, ds, steps=steps, batch_size=batch_size,
                           lr=lr * batch_size / 32, seed=seed, progress=False)
            rows.append({
                "norm": get_norm_spec(name).name,
                "batch_size": batch_size,
                "test_acc": result.final_test_acc,
                "diverged": result.diverged,
                "seconds": round(time.perf_counter() - start, 2),
            })
            acc = "diverged" if result.diverged else f"{result.final_test_acc:.3f}"
            print_fn(f"  {name:>6s}  batch {batch_size:>3d}: test accuracy {acc}")
    print_fn("")
    print_fn(format_table(rows, batch_sizes))
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2))
        print_fn(f"\nwrote {json_path}")
    return rows


def format_table(rows: list[dict], batch_sizes: Sequence[int]) -> str:
    """Markdown table: one row per norm, one column of test accuracy per batch size."""
    header = "| norm | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |"
    lines = [header, "|---" * (len(batch_sizes) + 1) + "|"]
    for norm in dict.fromkeys(r["norm"] for r in rows):
        cells = []
        for b in batch_sizes:
            r = next(r for r in rows if r["norm"] == norm and r["batch_size"] == b)
            cells.append("diverged" if r["diverged"] else f"{r['test_acc']:.3f}")
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
