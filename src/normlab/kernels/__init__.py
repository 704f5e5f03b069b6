"""Fast paths for normlab's normalization layers.

:func:`batch_norm` is batch normalization (+ an optional activation) with a fused
C++ kernel for the CPU, forward and backward, reachable from the layers as
``normlab.nn.BatchNorm(C, fused=True)`` (and ``save_memory=True`` for the mode that
keeps only the output for backward). :mod:`normlab.kernels.group` does the same for group
norm and layer norm (``normlab.nn.GroupNorm(C, G, fused=True)``,
``normlab.nn.LayerNorm(C, fused=True)``). The kernels are plain C++ compiled at first use
with the system's C++ compiler (a few seconds) and cached; :func:`available` says
whether that works here. Without a compiler everything still runs, on the default
paths.

Measured speed: see docs/benchmarks.md (``normlab bench``).
"""

from normlab.kernels._build import KernelBuildError, available, cache_dir, load_library
from normlab.kernels.fused import ACTIVATIONS, batch_norm, supports

__all__ = [
    "batch_norm",
    "supports",
    "available",
    "load_library",
    "cache_dir",
    "KernelBuildError",
    "ACTIVATIONS",
]
