"""How accurate torch's float32 CPU kernels are where they sum in float32: batch norm on
channels_last and (N, C) input, group norm on channels_last input.

For x = R + N(0, 1) (R = |mean| / std of every normalization group) and a range of
shapes, prints the relative L2 error of each kernel's output against float64, and the
error divided by the bound's shape (batch norm: (R + 4) sqrt(n) eps32; group norm:
(R^2 + 1) sqrt(n) eps32, with n the number of elements per group). The largest of
those ratios is the constant that normlab.functional.fastpath's _BN_SHIFT_LIMIT and
_GN_SHIFT_LIMIT rest on (0.16 and 0.2 are used; measured 0.152 and 0.171): the default
paths keep a kernel's result only while the bound times the constant stays below 1e-4.

    .venv/bin/python scripts/native_accuracy.py
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps
SHAPES = [(32, 64, 32, 32), (8, 256, 16, 16), (2, 64, 56, 56), (1, 64, 32, 32),
          (64, 8, 64, 64), (256, 64), (4096, 16)]
OFFSETS = [0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def main() -> None:
    torch.set_num_threads(1)
    worst = {"bn": 0.0, "gn": 0.0}
    print("shape                R      bn err    bn/bound  gn err    gn/bound")
    for shape in SHAPES:
        for offset in OFFSETS:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=gen) + offset
            xd = x.double()
            dims = (0,) + tuple(range(2, x.dim()))
            ref = (xd - xd.mean(dims, keepdim=True)) / torch.sqrt(
                xd.var(dims, unbiased=False, keepdim=True) + 1e-5)
            xc = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
            n = x.numel() // x.shape[1]
            bn = rel_err(torch.batch_norm(xc, None, None, None, None, True, 0.0, 1e-5, False),
                         ref)
            bn_ratio = bn / ((offset + 4) * math.sqrt(n) * EPS32)
            worst["bn"] = max(worst["bn"], bn_ratio)
            line = f"{str(shape):20s} {offset:6g} {bn:9.2e} {bn_ratio:9.3f}"
            if x.dim() == 4:
                groups = min(32, shape[1])
                xg = xd.view(shape[0], groups, -1)
                ref_g = ((xg - xg.mean(2, keepdim=True)) / torch.sqrt(
                    xg.var(2, unbiased=False, keepdim=True) + 1e-5)).view(shape)
                gn = rel_err(torch.group_norm(xc, groups, None, None, 1e-5), ref_g)
                gn_ratio = gn / ((offset**2 + 1) * math.sqrt(xg.shape[2]) * EPS32)
                worst["gn"] = max(worst["gn"], gn_ratio)
                line += f" {gn:9.2e} {gn_ratio:9.3f}"
            print(line)
    print(f"largest error / bound: batch norm {worst['bn']:.3f}, group norm {worst['gn']:.3f}")


if __name__ == "__main__":
    main()
