"""normlab.stats: moments, mean_square, unbiased, stat_dtype.

References are written here in float64 from the definitions
(mean = sum / n, biased var = sum (x - mean)^2 / n), never by calling normlab.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from normlab import stats

# ----------------------------------------------------------------------------- references


def ref_moments(x: torch.Tensor, dims: tuple[int, ...], mask: torch.Tensor | None = None):
    """float64 mean, biased variance and count over ``dims`` (keepdim), from the sums."""
    x = x.double()
    dims = tuple(sorted(d % x.dim() for d in dims))
    keep = [d for d in range(x.dim()) if d not in dims]
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    mask = mask.expand_as(x)
    # Move the kept dims first and flatten the reduced ones: one row per group.
    n_groups = 1
    for d in keep:
        n_groups *= x.shape[d]
    xp = x.permute(keep + list(dims)).reshape(n_groups, -1)
    mp = mask.permute(keep + list(dims)).reshape(xp.shape)
    means, variances, counts = [], [], []
    for row, valid in zip(xp, mp, strict=True):
        vals = row[valid].tolist()
        n = len(vals)
        mu = sum(vals) / n if n else 0.0
        var = sum((v - mu) ** 2 for v in vals) / n if n else 0.0
        means.append(mu)
        variances.append(var)
        counts.append(n)
    out_shape = [1 if d in dims else x.shape[d] for d in range(x.dim())]
    kept_shape = [x.shape[d] for d in keep]

    def back(values, dtype=torch.float64):
        return torch.tensor(values, dtype=dtype).reshape(kept_shape).reshape(out_shape)

    return back(means), back(variances), back(counts, torch.long)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- strategies


@st.composite
def shapes_and_dims(draw, max_rank=4):
    rank = draw(st.integers(1, max_rank))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    dims = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    # Negative dims must work the same way.
    dims = tuple(d - rank if draw(st.booleans()) else d for d in dims)
    return shape, dims


# ----------------------------------------------------------------------------- moments


@given(shapes_and_dims(), st.sampled_from([torch.float32, torch.float64]), st.floats(-50, 50))
def test_moments_match_float64_definition(shape_dims, dtype, offset):
    shape, dims = shape_dims
    x = (torch.randn(shape, dtype=torch.float64) * 3 + offset).to(dtype)
    m = stats.moments(x, dims)
    mean, var, count = ref_moments(x, dims)
    assert m.mean.dtype == dtype and m.var.dtype == dtype
    assert m.mean.shape == mean.shape and m.var.shape == var.shape
    assert m.count == int(count.flatten()[0])
    # float32: the inputs are exact in float64; the statistics are rounded to float32
    # (2**-24 relative) after a float64-accumulated mean and a float32 pairwise sum of
    # squares: 1e-5 relative leaves room for that; atol covers var = 0 (one element).
    tol = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}[dtype]
    torch.testing.assert_close(m.mean.double(), mean, rtol=tol[0], atol=tol[1] * (1 + abs(offset)))
    torch.testing.assert_close(m.var.double(), var, rtol=tol[0], atol=tol[1])


@given(shapes_and_dims(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_moments_of_half_inputs_are_float32(shape_dims, dtype):
    shape, dims = shape_dims
    x = (torch.randn(shape) * 2 + 1).to(dtype)
    m = stats.moments(x, dims)
    assert m.mean.dtype == torch.float32 and m.var.dtype == torch.float32
    mean, var, _ = ref_moments(x, dims)  # reference on the rounded half values, in float64
    # Computed in float32 from exactly representable inputs: float32 accuracy.
    torch.testing.assert_close(m.mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.var.double(), var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keepdim", [True, False])
def test_moments_keepdim_and_count(keepdim):
    x = torch.randn(2, 3, 4, 5)
    m = stats.moments(x, (0, 2), keepdim=keepdim)
    expected = (1, 3, 1, 5) if keepdim else (3, 5)
    assert m.mean.shape == expected and m.var.shape == expected
    assert m.count == 8
    torch.testing.assert_close(
        m.var.reshape(3, 5), x.double().var((0, 2), unbiased=False).float(), rtol=1e-5, atol=1e-6
    )


@given(shapes_and_dims(), st.sampled_from([torch.float32, torch.float64]), st.data())
def test_masked_moments_use_only_valid_elements(shape_dims, dtype, data):
    shape, dims = shape_dims
    x = torch.randn(shape, dtype=dtype) * 2 - 1
    # A mask broadcastable to x: some dims of size 1.
    mshape = tuple(s if data.draw(st.booleans()) else 1 for s in shape)
    flat = data.draw(st.lists(st.booleans(), min_size=len(torch.empty(mshape).flatten()),
                              max_size=len(torch.empty(mshape).flatten())))
    mask = torch.tensor(flat, dtype=torch.bool).reshape(mshape)
    m = stats.moments(x, dims, mask=mask)
    mean, var, count = ref_moments(x, dims, mask)
    assert isinstance(m.count, torch.Tensor)
    assert torch.equal(m.count.long(), count)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(m.mean.double(), mean, rtol=tol, atol=tol)
    torch.testing.assert_close(m.var.double(), var, rtol=tol, atol=tol)
    # Groups without a valid element: mean 0, var 0, count 0, and no NaN anywhere.
    assert torch.isfinite(m.mean).all() and torch.isfinite(m.var).all()


def test_masked_moments_ignore_padding_values():
    """The values under the padding (here huge and NaN) change nothing."""
    x = torch.randn(3, 4, 6)
    mask = torch.ones(3, 1, 6, dtype=torch.bool)
    mask[0, :, 4:] = False
    mask[2, :, 1:] = False
    padded = x.clone()
    padded[~mask.expand_as(x)] = float("nan")
    a = stats.moments(x.masked_fill(~mask, 1e6), (0, 2), mask=mask)
    b = stats.moments(padded, (0, 2), mask=mask)
    valid = x.permute(1, 0, 2)[:, mask[:, 0, :]]  # (C, number of valid positions)
    torch.testing.assert_close(a.mean.flatten(), valid.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.var.flatten(), valid.var(1, unbiased=False), rtol=1e-5, atol=1e-6)
    # NaN padding is excluded, not multiplied by zero (which would give NaN).
    torch.testing.assert_close(b.mean, a.mean)
    torch.testing.assert_close(b.var, a.var)
    assert torch.equal(a.count.flatten(), torch.full((4,), valid.shape[1]))


def test_masked_moments_without_valid_elements_give_zeros():
    x = torch.randn(2, 3)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    m = stats.moments(x, 1, mask=mask)
    assert torch.equal(m.count.flatten(), torch.tensor([2, 0]))
    assert m.mean[1].item() == 0.0 and m.var[1].item() == 0.0
    torch.testing.assert_close(m.mean[0, 0], x[0, :2].mean())


def test_moments_gradients_float64():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 1, 5) > 0.3
    mask[:, :, 0] = True

    def f(t):
        m = stats.moments(t, (0, 2))
        return m.mean, m.var

    def fm(t):
        m = stats.moments(t, (0, 2), mask=mask)
        return m.mean, m.var

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradcheck(fm, (x,))


# ----------------------------------------------------------------------------- numerics


def _normalize_two_pass(x):
    m = stats.moments(x, 0)
    return (x - m.mean) / torch.sqrt(m.var + 1e-5)


def _normalize_shortcut(x):
    """The one-pass E[x^2] - E[x]^2 formula, in x's dtype (what normlab must not do)."""
    mean = x.mean(0, keepdim=True)
    var = ((x * x).mean(0, keepdim=True) - mean * mean).clamp(min=0)
    return (x - mean) / torch.sqrt(var + 1e-5)


def test_large_mean_criterion_passes_and_the_shortcut_fails_it():
    """x = 1e4 + N(0, 1) in float32: normalized output within 1e-3 relative L2 of float64.

    The one-pass shortcut, run on the same float32 data, must miss the criterion, so
    the criterion can tell a robust variance from a cancelling one.
    """
    x = 1e4 + torch.randn(4096, 8)
    exact = _normalize_two_pass(x.double())  # float64, same (float32-rounded) input
    assert rel_l2(_normalize_two_pass(x), exact) < 1e-3
    assert rel_l2(_normalize_shortcut(x), exact) > 1e-3
    # And the float64 reference itself agrees with the textbook formula.
    x64 = x.double()
    textbook = (x64 - x64.mean(0)) / torch.sqrt(x64.var(0, unbiased=False) + 1e-5)
    assert rel_l2(exact, textbook) < 1e-12


def test_large_mean_masked_criterion():
    x = 1e4 + torch.randn(512, 8)
    mask = torch.rand(512, 8) > 0.25
    m = stats.moments(x, 0, mask=mask)
    m64 = stats.moments(x.double(), 0, mask=mask)
    y = ((x - m.mean) / torch.sqrt(m.var + 1e-5))[mask]
    y64 = ((x.double() - m64.mean) / torch.sqrt(m64.var + 1e-5))[mask]
    assert rel_l2(y, y64) < 1e-3
    mean, var, _ = ref_moments(x, (0,), mask)
    torch.testing.assert_close(m64.var, var, rtol=1e-10, atol=0)


def test_float16_large_mean_does_not_overflow():
    """x = 300 + N(0, 1) in float16: x**2 = 9e4 overflows float16 (max 65504)."""
    x = (300 + torch.randn(2048)).half()
    assert torch.isinf(x * x).any()  # the naive route really overflows
    m = stats.moments(x, 0)
    ms = stats.mean_square(x, 0)
    mean, var, _ = ref_moments(x, (0,))
    assert m.var.dtype == torch.float32 and torch.isfinite(m.var).all()
    torch.testing.assert_close(m.mean.double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(m.var.double(), var, rtol=1e-4, atol=0)
    torch.testing.assert_close(ms.double(), (x.double() ** 2).mean(0, keepdim=True), rtol=1e-5,
                               atol=0)


# ----------------------------------------------------------------------------- mean_square


@given(shapes_and_dims(), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       st.booleans(), st.booleans())
def test_mean_square_matches_definition(shape_dims, dtype, use_mask, keepdim):
    shape, dims = shape_dims
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    mask = (torch.rand(shape) > 0.3) if use_mask else None
    out = stats.mean_square(x, dims, mask=mask, keepdim=keepdim)
    assert out.dtype == stats.stat_dtype(dtype)
    # mean of x^2 over the valid elements = biased var + mean^2 of the same elements
    # (in float64 from the reference, so no cancellation concern here).
    mean, var, count = ref_moments(x, dims, mask)
    expected = torch.where(count > 0, var + mean**2, torch.zeros_like(var))
    if not keepdim:
        expected = expected.squeeze(tuple(d % len(shape) for d in dims))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- helpers


def test_unbiased_int_and_tensor_counts():
    var = torch.tensor([2.0, 3.0, 4.0])
    torch.testing.assert_close(stats.unbiased(var, 5), var * 5 / 4)
    assert torch.equal(stats.unbiased(var, 1), var)  # n = 1: no correction, no inf
    count = torch.tensor([0, 1, 4])
    out = stats.unbiased(var, count)
    torch.testing.assert_close(out, torch.tensor([2.0, 3.0, 4.0 * 4 / 3]))
    # Agrees with torch's unbiased variance.
    x = torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close(stats.unbiased(x.var(0, unbiased=False), 7), x.var(0))


def test_stat_dtype():
    assert stats.stat_dtype(torch.float64) == torch.float64
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert stats.stat_dtype(dt) == torch.float32


def test_bad_arguments():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="floating"):
        stats.moments(torch.ones(2, 3, dtype=torch.long), 0)
    with pytest.raises(TypeError, match="bool"):
        stats.moments(x, 0, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3\)"):
        stats.moments(x, 0, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="broadcast"):
        stats.mean_square(x, 0, mask=torch.ones(3, 3, dtype=torch.bool))


def test_every_dim_subset_of_a_4d_tensor():
    """Exhaustive over the 15 non-empty subsets of 4 dims (cheap, catches axis slips)."""
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    for r in range(1, 5):
        for dims in itertools.combinations(range(4), r):
            m = stats.moments(x, dims)
            torch.testing.assert_close(m.mean, x.mean(dims, keepdim=True))
            torch.testing.assert_close(m.var, x.var(dims, keepdim=True, unbiased=False))
