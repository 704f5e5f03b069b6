"""Generated CIFAR-10 files and a tiny budget for the paper-scale tests (tests of
``normlab study --scale paper``): the real dataset cannot be downloaded here."""

import pickle

import numpy as np

from normlab.claims.base import Budget

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
