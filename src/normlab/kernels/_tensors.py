"""What the kernel wrappers (fused.py, group.py, online.py) share about the tensors they
hand to the C++ kernels: the dtype codes, the memory-layout code and raw pointers."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DTYPES", "layout", "ptr"]

#: Input dtypes the kernels take, and their codes (bfloat16 is read into float).
DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def layout(x: Tensor) -> tuple[int, int, int, int] | None:
    """``(layout, N, C, L)`` for the kernels, or None: 0 is (N, C, L) contiguous, 1 is
    rows of C contiguous channels (channels_last, or no trailing elements)."""
    n, c = x.shape[:2]
    length = math.prod(x.shape[2:])
    if length == 1 and x.is_contiguous():
        return 1, n, c, 1
    if x.is_contiguous():
        return 0, n, c, length
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return 1, n, c, length
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return 1, n, c, length
    return None


def ptr(t: Tensor | None) -> int | None:
    """The data pointer of ``t``, or None (a null pointer) for no tensor."""
    return None if t is None else t.data_ptr()
