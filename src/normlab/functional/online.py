r"""Online Normalization (Chiley et al., NeurIPS 2019) without a loop over the samples.

The method processes the samples of a batch one after another, but every recursion
it runs is linear in its state, so the whole batch is done with scans along the
batch dimension. :func:`linear_scan` evaluates

.. math::
    z_t = a_t z_{t-1} + b_t, \qquad t = 1, \dots, N

for all t at once as an inclusive scan of the affine maps :math:`z \mapsto a_t z + b_t`
(composition is associative): :math:`\lceil\log_2 N\rceil` vectorised steps, in
float64, with only products and sums of the coefficients, no division and no
negative powers :math:`\alpha^{-t}` (which overflow for long batches; a constant
coefficient takes a chunked cumulative sum instead). The scans run on
per-(sample, channel) statistics of shape (N, C); the full-size work is the per-sample
moments and :math:`\hat x = (x - m)/s` (torch's native group norm with one group per
channel, :func:`normlab.functional.core.instance_normalized`) and one multiply-add
forward, and in backward two reductions (means of g and g * x_hat per sample) and two
fused multiply-adds over x_hat and g.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normlab import stats
from normlab.functional.core import instance_normalized, normalize, update_running_

__all__ = ["linear_scan", "online_norm", "layer_scaling", "activation_clamp"]


def linear_scan(coef: Tensor | float, inp: Tensor, init: Tensor) -> Tensor:
    r"""All states of :math:`z_t = a_t z_{t-1} + b_t` along dimension 0.

    Args:
        coef: :math:`a_t`, a tensor broadcastable to ``inp`` or a number.
        inp: :math:`b_t`, shape ``(N, *)``.
        init: :math:`z_0`, broadcastable to ``inp[0]``.

    Returns:
        ``(N, *)``: :math:`z_1, \dots, z_N` (the state *after* each step).

    Hillis-Steele scan over the affine maps: after the step with offset d, element
    t holds the composition of the maps t-2d+1 .. t. Computes in the dtype of
    ``inp`` (callers pass float64). A constant ``coef`` in (0, 1] (a number) takes a
    cumulative sum instead, :math:`z_t = a^t (z_0 + \sum_{s \le t} a^{-s} b_s)`, in
    chunks short enough that :math:`a^{-s}` stays below :math:`e^{300}` (the same
    conditioning as the recursion, and a few ops instead of four per scan step).
    """
    if isinstance(coef, (int, float)) and 0.0 < coef <= 1.0:
        return _constant_scan(float(coef), inp, init)
    b = inp.clone()
    a = torch.as_tensor(coef, dtype=inp.dtype, device=inp.device).expand_as(inp).clone()
    n = inp.shape[0]
    d = 1
    while d < n:
        # (a2, b2) after (a1, b1): z -> a2 (a1 z + b1) + b2
        b_new = torch.addcmul(b[d:], a[d:], b[:-d])
        a_new = a[d:] * a[:-d]
        b = torch.cat((b[:d], b_new))
        a = torch.cat((a[:d], a_new))
        d *= 2
    return torch.addcmul(b, a, init.expand_as(inp))


def _constant_scan(a: float, inp: Tensor, init: Tensor) -> Tensor:
    """:func:`linear_scan` for a constant coefficient ``a`` in (0, 1]."""
    n = inp.shape[0]
    trailing = (1,) * (inp.dim() - 1)
    if a == 1.0:
        return torch.cumsum(inp, 0) + init
    chunk = max(1, int(300.0 / -math.log(a)))
    out = torch.empty_like(inp)
    prev = init.expand_as(inp[0])
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        j = torch.arange(1, stop - start + 1, dtype=inp.dtype, device=inp.device)
        up = torch.pow(a, j).view(-1, *trailing)  # a^j <= 1
        acc = torch.cumsum(inp[start:stop] / up, 0)  # sum of a^-i b_i, a^-i <= e^300
        out[start:stop] = up * (prev + acc)
        prev = out[stop - 1]
    return out


def _shift(first: Tensor, states: Tensor) -> Tensor:
    """The state *before* each step: ``[first, z_1, ..., z_{N-1}]``."""
    return torch.cat((first.unsqueeze(0), states[:-1]))


class _OnlineNormFunction(torch.autograd.Function):
    """Forward: sample-by-sample normalization with the streaming statistics.
    Backward: the paper's controlled gradient, not the gradient of the forward."""

    @staticmethod
    def forward(ctx, x, state, alpha_fwd, alpha_bkw, eps, name):
        running_mean, running_var, u, v = state
        n, c = x.shape[:2]
        xr = x.reshape(n, c, -1)
        # Per-sample moments (N, C), biased, float64, and x_hat = (x - m) / s: the output
        # is then one multiply-add of x_hat, y = x_hat * (s / sigma) + (m - mu) / sigma.
        x_hat, m, s2 = instance_normalized(xr)
        f64 = torch.float64
        mu0 = running_mean.detach().to(f64)
        var0 = running_var.detach().to(f64)
        a = alpha_fwd
        # mu_t = a mu_{t-1} + (1 - a) m_t
        mu = linear_scan(a, (1.0 - a) * m, mu0)
        mu_prev = _shift(mu0, mu)
        delta = m - mu_prev
        # sigma2_t = a sigma2_{t-1} + (1 - a) s2_t + a (1 - a) (m_t - mu_{t-1})^2
        var = linear_scan(a, (1.0 - a) * s2 + (a * (1.0 - a)) * delta * delta, var0)
        var_prev = _shift(var0, var)
        inv_std = torch.rsqrt(var_prev + eps)  # (N, C)
        compute = x_hat.dtype
        a = torch.sqrt(s2) * inv_std
        b = delta * inv_std
        y = torch.addcmul(b.to(compute).unsqueeze(2), x_hat, a.to(compute).unsqueeze(2))
        update_running_(running_mean, mu[-1], 1.0, name)
        update_running_(running_var, var[-1], 1.0, name)
        # mean_L(y_t) and mean_L(y_t^2), exactly, from the moments.
        y_mean = delta * inv_std
        y_sq = (s2 + delta * delta) * inv_std * inv_std
        # Save x_hat (ours), not y: an in-place op on the output (ReLU(inplace=True))
        # must not corrupt what backward needs; y = x_hat * a + b.
        ctx.save_for_backward(x_hat, a, b, inv_std, y_mean, y_sq)
        ctx.state = (u, v)
        ctx.alpha_bkw = alpha_bkw
        ctx.name = name
        ctx.x_shape = x.shape
        return y.to(x.dtype).reshape(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x_hat, a, b, inv_std, y_mean, y_sq = ctx.saved_tensors
        u, v = ctx.state
        k = 1.0 - ctx.alpha_bkw
        f64 = torch.float64
        n, c = x_hat.shape[:2]
        compute = x_hat.dtype
        g = grad_out.reshape(n, c, -1).to(compute)
        # Per-sample means over the trailing elements, accumulated in the compute dtype
        # (a float64 accumulator would first copy the whole gradient to float64);
        # mean(g * y) = a * mean(g * x_hat) + b * mean(g).
        g_mean = g.mean(2).to(f64)
        gy_mean = a * (g * x_hat).mean(2).to(f64) + b * g_mean
        u0 = u.detach().to(f64)
        v0 = v.detach().to(f64)
        # g'_t = g_t - k v_{t-1} y_t ;  v_t = v_{t-1} + mean(g'_t y_t)
        #      = (1 - k mean(y_t^2)) v_{t-1} + mean(g_t y_t)
        v_all = linear_scan(1.0 - k * y_sq, gy_mean, v0)
        v_prev = _shift(v0, v_all)
        # dx_t = g'_t / sigma_{t-1} - k u_{t-1} ;  u_t = u_{t-1} + mean(dx_t)
        #      = (1 - k) u_{t-1} + (mean(g_t) - k v_{t-1} mean(y_t)) / sigma_{t-1}
        u_all = linear_scan(1.0 - k, (g_mean - k * v_prev * y_mean) * inv_std, u0)
        u_prev = _shift(u0, u_all)
        # dx = g * inv_std - y * (k v_prev inv_std) - k u_prev, in two fused passes
        # over x_hat and g (y = x_hat * a + b).
        scale = inv_std.to(compute).unsqueeze(2)
        y_coef = -k * v_prev * inv_std
        xh_coef = (y_coef * a).to(compute).unsqueeze(2)
        shift = (y_coef * b - k * u_prev).to(compute).unsqueeze(2)
        grad_in = torch.addcmul(torch.addcmul(shift, x_hat, xh_coef), g, scale)
        grad_in = grad_in.to(grad_out.dtype).reshape(ctx.x_shape)
        update_running_(u, u_all[-1], 1.0, ctx.name)
        update_running_(v, v_all[-1], 1.0, ctx.name)
        return grad_in, None, None, None, None, None


def online_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    u: Tensor,
    v: Tensor,
    alpha_fwd: float = 0.999,
    alpha_bkw: float = 0.99,
    eps: float = 1e-5,
    training: bool = True,
    name: str = "online_norm",
) -> Tensor:
    r"""The normalization step of Online Normalization (no affine, no ECM).

    Per channel, the samples t = 1..N of ``x`` (shape ``(N, C, *)``) are taken in batch
    order, with :math:`m_t, s^2_t` the mean and biased variance of sample t over
    ``*`` (:math:`m_t = x_t, s^2_t = 0` on ``(N, C)`` input):

    .. math::
        y_t = \frac{x_t - \mu_{t-1}}{\sqrt{\sigma^2_{t-1} + \epsilon}}, \quad
        \sigma^2_t = \alpha_f \sigma^2_{t-1} + (1-\alpha_f) s^2_t
                     + \alpha_f (1-\alpha_f)(m_t - \mu_{t-1})^2, \quad
        \mu_t = \alpha_f \mu_{t-1} + (1-\alpha_f) m_t

    starting from ``running_mean``, ``running_var`` (:math:`\mu_0, \sigma^2_0`), which
    are overwritten with :math:`\mu_N, \sigma^2_N` (channels whose new value is not
    finite keep the old one, with a RuntimeWarning).

    Backward (the paper's, *not* the gradient of the forward): with :math:`g_t` the
    incoming gradient and :math:`k = 1 - \alpha_b`, for t = 1..N in order

    .. math::
        g'_t = g_t - k\, v_{t-1} y_t, \quad v_t = v_{t-1} + \overline{g'_t y_t}, \quad
        \frac{\partial L}{\partial x_t} = \frac{g'_t}{\sqrt{\sigma^2_{t-1}+\epsilon}}
            - k\, u_{t-1}, \quad u_t = u_{t-1} + \overline{\partial L / \partial x_t}

    (bars: means over ``*``), and ``u``, ``v`` are overwritten with :math:`u_N, v_N`
    **during backward**. A second backward through the same graph therefore starts
    from the updated controllers and gives a different gradient.

    With ``training=False`` the buffers are read, not updated, and every sample is
    normalized by them: :math:`y = (x - \mu)/\sqrt{\sigma^2 + \epsilon}`, with the
    ordinary gradient of that expression.
    """
    if not training:
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        return normalize(x, running_mean.view(shape), running_var.view(shape), eps)
    return _OnlineNormFunction.apply(
        x, (running_mean, running_var, u, v), float(alpha_fwd), float(alpha_bkw), float(eps),
        name,
    )


class _LayerScaling(torch.autograd.Function):
    """Layer scaling with its closed-form backward: with s = (mean(x^2) + eps)^(-1/2)
    per sample, d(x s)/dx applied to g is ``s g - (s^3 / n) (g . x) x`` (two passes)."""

    @staticmethod
    def forward(ctx, x, eps):
        n = x.shape[0]
        compute = stats.stat_dtype(x.dtype)
        xf = x.reshape(n, -1).to(compute)
        # mean(x^2) per sample, in one read pass (vector_norm; (x * x).sum() takes two).
        ms = torch.linalg.vector_norm(xf, dim=1, keepdim=True) ** 2 / xf.shape[1]
        scale = torch.rsqrt(ms + eps)
        ctx.save_for_backward(x, scale)
        # Not (xf * scale).reshape(x.shape): a custom Function must not return a view of
        # an intermediate, or an in-place op on the output (ReLU(inplace=True)) raises.
        per_sample = scale.view((n,) + (1,) * (x.dim() - 1))
        return (x.to(compute) * per_sample).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, scale = ctx.saved_tensors
        n = x.shape[0]
        xf = x.reshape(n, -1).to(scale.dtype)
        g = grad_out.reshape(n, -1).to(scale.dtype)
        gx = (g * xf).sum(1, keepdim=True)
        coef = -(scale**3) * gx / xf.shape[1]
        return torch.addcmul(g * scale, xf, coef).to(grad_out.dtype).reshape(x.shape), None


def layer_scaling(x: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Online Norm's layer scaling ECM: :math:`z_n = x_n / \sqrt{\overline{x_n^2} + \epsilon}`,
    with the mean square over every non-batch element of sample n. (A custom autograd
    function with the closed-form backward; first-order gradients only.)"""
    return _LayerScaling.apply(x, float(eps))


def activation_clamp(x: Tensor, clamp_value: float = 5.0) -> Tensor:
    """Online Norm's activation clamping ECM: ``clamp(x, -clamp_value, clamp_value)``."""
    return x.clamp(-clamp_value, clamp_value)
