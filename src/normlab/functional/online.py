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
coefficient takes a chunked cumulative sum instead, and so do coefficients all in
(0, 1] with a cumulative product). The scans run on per-(sample, channel) statistics.
In :func:`online_norm` the full-size work is the per-sample moments and
:math:`\hat x = (x - m)/s` (torch's native group norm with one group per channel,
:func:`normlab.functional.fastpath.instance_normalized`) and one multiply-add forward, and
in backward two reductions (means of g and g * x_hat per sample) and two fused
multiply-adds over x_hat and g. :func:`online_norm_step` (what ``OnlineNorm`` trains
with, ECM "ls" or None) takes the affine and layer scaling into the same function and
works from :math:`x - \bar x` (row mean), so that no intermediate is saved.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normlab import stats
from normlab.functional.common import channel_shape, normalize, update_running_
from normlab.functional.fastpath import instance_normalized

__all__ = ["linear_scan", "online_norm", "online_norm_step", "layer_scaling",
           "activation_clamp"]


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
    Coefficients all in (0, 1] (a tensor) do the same with
    :math:`P_t = \prod_{s \le t} a_s` in place of :math:`a^t` (chunks from the smallest
    coefficient), when that takes no more than :math:`\lceil\log_2 N\rceil` chunks;
    otherwise the Hillis-Steele scan. (The scans run with time as the last, contiguous
    dimension, where torch's cumulative sums and products are fastest.)
    """
    if isinstance(coef, Tensor):
        coef = coef.expand_as(inp).movedim(0, -1)
    states = _states(coef, inp.movedim(0, -1).contiguous(), torch.as_tensor(init))
    return states[..., 1:].movedim(-1, 0)


def _states(coef: Tensor | float, inp: Tensor, init: Tensor) -> Tensor:
    """The scan of :func:`linear_scan` with time as the *last* dimension: ``inp``
    ``(*, N)``, ``init`` broadcastable to ``(*)``; returns ``(*, N + 1)``, :math:`z_0`
    (``init``) then :math:`z_1, \\dots, z_N`, so that ``[..., :-1]`` is the state
    *before* each step, without a copy."""
    n = inp.shape[-1]
    out = inp.new_empty(inp.shape[:-1] + (n + 1,))
    out.select(-1, 0).copy_(init)
    if n == 0:
        return out
    init = init.unsqueeze(-1) if init.dim() else init
    states = out.narrow(-1, 1, n)
    if isinstance(coef, (int, float)) and 0.0 < coef <= 1.0:
        _constant_scan(float(coef), inp, init, states)
    elif not (isinstance(coef, Tensor) and n > 1
              and _product_scan(coef, inp, init, states)):
        states.copy_(_hillis_steele_scan(coef, inp, init))
    return out


def _hillis_steele_scan(coef: Tensor | float, inp: Tensor, init: Tensor) -> Tensor:
    """:func:`_states` (without z_0) for any coefficients, in ceil(log2 N) vectorised
    steps; time is the last dimension, ``init`` broadcasts to ``inp``."""
    b = inp.clone()
    a = torch.as_tensor(coef, dtype=inp.dtype, device=inp.device).expand_as(inp).clone()
    n = inp.shape[-1]
    d = 1
    while d < n:
        # (a2, b2) after (a1, b1): z -> a2 (a1 z + b1) + b2
        b_new = torch.addcmul(b[..., d:], a[..., d:], b[..., :-d])
        a_new = a[..., d:] * a[..., :-d]
        b = torch.cat((b[..., :d], b_new), -1)
        a = torch.cat((a[..., :d], a_new), -1)
        d *= 2
    return torch.addcmul(b, a, init.expand_as(inp))


def _constant_scan(a: float, inp: Tensor, init: Tensor, out: Tensor) -> None:
    """:func:`_states` for a constant coefficient ``a`` in (0, 1], into ``out``."""
    n = inp.shape[-1]
    chunk = n if a == 1.0 else max(1, int(300.0 / -math.log(a)))
    prev = init
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        if a == 1.0:
            out.copy_(torch.cumsum(inp, -1).add_(prev))
        else:
            j = torch.arange(1, stop - start + 1, dtype=inp.dtype, device=inp.device)
            up = torch.pow(a, j)  # a^j <= 1
            # a^j (z_start + sum of a^-i b_i), a^-i <= e^300
            acc = torch.cumsum(inp.narrow(-1, start, stop - start) / up, -1).add_(prev)
            out.narrow(-1, start, stop - start).copy_(acc.mul_(up))
        prev = out.narrow(-1, stop - 1, 1)


def _product_scan(coef: Tensor, inp: Tensor, init: Tensor, out: Tensor) -> bool:
    r""":func:`_states` for coefficients all in (0, 1], into ``out``, as
    :math:`z_t = P_t (z_0 + \sum_{s \le t} b_s / P_s)` per chunk, with chunks short
    enough that :math:`1/P_s \le e^{300}`. False (``out`` untouched) where the
    coefficients are not all in (0, 1] or that would take more than ceil(log2 N)
    chunks, and under torch.compile: the caller then scans with Hillis-Steele."""
    if torch.compiler.is_compiling():  # no data-dependent branch in a compiled graph
        return False
    n = inp.shape[-1]
    lo, hi = torch.aminmax(coef)
    lo, hi = float(lo), float(hi)
    if not (lo > 0.0 and hi <= 1.0):  # also catches NaN
        return False
    chunk = n if lo == 1.0 else max(1, int(300.0 / -math.log(lo)))
    if -(-n // chunk) > math.ceil(math.log2(n)):
        return False
    prev = init
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        size = stop - start
        p = torch.cumprod(coef.narrow(-1, start, size), -1)  # >= lo^chunk >= e^-300
        acc = torch.cumsum(inp.narrow(-1, start, size) / p, -1).add_(prev)
        out.narrow(-1, start, size).copy_(acc.mul_(p))
        prev = out.narrow(-1, stop - 1, 1)
    return True


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
        shape = channel_shape(x)
        return normalize(x, running_mean.view(shape), running_var.view(shape), eps)
    return _OnlineNormFunction.apply(
        x, (running_mean, running_var, u, v), float(alpha_fwd), float(alpha_bkw), float(eps),
        name,
    )


def _centred(x: Tensor, compute: torch.dtype, s: Tensor | None = None
             ) -> tuple[Tensor, Tensor]:
    """``(s, x - s)`` for ``x`` ``(N, C, *)``: ``s`` ``(N, C, 1, ...)`` the row means in
    ``compute`` (where not given), ``x - s`` a new contiguous tensor of ``x``'s shape in
    ``compute``, exact to its own rounding whatever the mean (one pass, any layout)."""
    if s is None:
        n, c = x.shape[:2]
        trailing = (1,) * (x.dim() - 2)
        if x.is_contiguous():  # one reduction over the rows (faster than over dims 2..)
            s = x.view(n, c, -1).mean(2, dtype=compute).view(n, c, *trailing)
        else:
            s = x.mean(tuple(range(2, x.dim())), keepdim=True, dtype=compute)
        # Any finite shift is exact; a non-finite row mean (a NaN or inf in the row)
        # must not spread to the row's other outputs.
        s = torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    xc = torch.empty(x.shape, dtype=compute, device=x.device)
    return s, torch.sub(x, s, out=xc)


def _channels_by_time(t: Tensor) -> Tensor:
    """A float64 ``(C, N)`` contiguous copy of ``(N, C)`` ``t``: the step's algebra runs
    with time last, where the scans' cumulative sums are fastest."""
    return t.t().to(torch.float64, memory_format=torch.contiguous_format, copy=True)


class _OnlineNormStep(torch.autograd.Function):
    r"""One training step of Online Norm followed by the per-channel affine and layer
    scaling (or no ECM), forward and the paper's backward, with all the work between
    the full-size passes done on per-(n, c) numbers in float64 (held as (C, N)).

    Forward: s = the float row mean of each (n, c) and x_c = x - s (exact to the
    rounding of x_c itself, whatever the mean), the moments from x_c (m = s + mean(x_c),
    s^2 = mean(x_c^2) - mean(x_c)^2), the scans, and ``out = x_c A + B`` in x_c's
    buffer: with y = (x_c - D) / sigma_{t-1}, D = mu_{t-1} - s, the affine z = w y + b
    and layer scaling's per-sample factor r = (mean over C of E[z^2] + eps_ls)^(-1/2),
    E[z^2] = w^2 E[y^2] + 2 w b E[y] + b^2 from the moments, A = w r / sigma and
    B = (b - w D / sigma) r. Saves x and s (not x_c or the output: an in-place op on the
    output must not corrupt backward).

    Backward: x_c = x - s again (in the buffer that becomes the input gradient), per
    (n, c) the sums of g and g x_c, everything else in per-(n, c) algebra, and
    ``dx = x_c Q + R + g P``. With h = r^3 (sum of g z over C x L) / (C L) per sample,
    the gradient reaching y is g_y = w r g - w h z, whose per-(n, c) means (of g_y and
    g_y y) feed the controller scans of :func:`online_norm`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, state, alpha_fwd, alpha_bkw, eps, ls, ls_eps, name):
        running_mean, running_var, u, v = state
        n, c = x.shape[:2]
        length = math.prod(x.shape[2:])
        f64 = torch.float64
        compute = stats.stat_dtype(x.dtype)
        # Per-(n, c) values are (C, N) float64 below.
        if length == 1:
            s = s2 = xc = None  # x - s = 0 with s = x: everything is (C, N) algebra
            m = _channels_by_time(x.reshape(n, c))
        else:
            s, xc = _centred(x, compute)  # xc: the buffer that becomes the output
            rows = xc.view(n, c, length)
            d = _channels_by_time(rows.mean(2))
            s2 = _channels_by_time(torch.linalg.vector_norm(rows, dim=2))
            s2 = s2.square_().div_(length).addcmul_(d, d, value=-1.0).clamp_min_(0.0)
            m = d.add_(s.view(n, c).t())
        a = alpha_fwd
        # mu_t = a mu_{t-1} + (1 - a) m_t ; columns [:-1] are mu_{t-1}
        mus = _states(a, m * (1.0 - a), running_mean.detach().to(f64))
        mu_prev = mus[:, :-1]
        delta = m - mu_prev
        # sigma2_t = a sigma2_{t-1} + (1 - a) s2_t + a (1 - a) (m_t - mu_{t-1})^2
        var_in = (delta * delta).mul_(a * (1.0 - a))
        if s2 is not None:
            var_in.add_(s2, alpha=1.0 - a)
        variances = _states(a, var_in, running_var.detach().to(f64))
        update_running_(running_mean, mus[:, -1], 1.0, name)
        update_running_(running_var, variances[:, -1], 1.0, name)
        inv_std = variances[:, :-1].add(eps).rsqrt_()
        # D = mu_{t-1} - s (for (N, C) input s = m: D = -delta)
        dshift = delta.neg() if s is None else mu_prev - s.view(n, c).t()
        # Per-(n, c) means of y and y^2, exactly, from the moments.
        y_mean = delta.mul_(inv_std)
        y_sq = y_mean * y_mean
        if s2 is not None:
            y_sq.add_(s2.mul_(inv_std).mul_(inv_std))
        w = None if weight is None else weight.detach().to(f64).unsqueeze(1)  # (C, 1)
        b = None if bias is None else bias.detach().to(f64).unsqueeze(1)
        r = None
        if ls:
            # per sample, the mean over C of E[z^2] = w^2 E[y^2] + 2 w b E[y] + b^2
            total = y_sq.sum(0) if w is None else torch.mv(y_sq.t(), (w * w).flatten())
            if b is not None:
                wb = 2.0 * b if w is None else 2.0 * w * b
                total = torch.addmv(total, y_mean.t(), wb.flatten()).add_((b * b).sum())
            r = total.div_(c).add_(ls_eps).rsqrt_()  # (N,)
        # out = r (w (x_c - D) inv_std + b) = x_c A + B
        scale = inv_std if w is None else inv_std * w
        if r is not None:
            scale = scale * r
        offset = (dshift * scale).neg_()
        if b is not None and r is None:
            offset.add_(b)
        elif b is not None:
            offset.addr_(b.flatten(), r)
        if xc is None:
            out = x.new_empty(x.shape)
            out.view(n, c).copy_(offset.t())
        else:  # in x_c's buffer (returned itself, not a view: in-place ops on it are fine)
            rows.mul_(scale.t().to(compute).unsqueeze(2))
            rows.add_(offset.t().to(compute).unsqueeze(2))
            out = xc.to(x.dtype)
        # x and the shift s, not x_c or the output: backward recomputes x_c = x - s
        # exactly, in the buffer that becomes the input gradient.
        ctx.save_for_backward(x, s, dshift, inv_std, y_mean, y_sq, w, b, r)
        ctx.state = (u, v)
        ctx.meta = (n, c, length, 1.0 - alpha_bkw, name, compute)
        ctx.param_dtypes = (None if weight is None else weight.dtype,
                            None if bias is None else bias.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, s, dshift, inv_std, y_mean, y_sq, w, b, r = ctx.saved_tensors
        u, v = ctx.state
        n, c, length, k, name, compute = ctx.meta
        g = grad_out.reshape(n, c, -1).to(compute)
        if s is None:
            xc = None
            g_sum = _channels_by_time(g.view(n, c))
            gy_sum = g_sum * y_mean  # y = y_mean when L = 1
        else:
            # sum(g (x - s)) in the buffer that becomes the input gradient, then x - s
            # again (a temporary g * (x - s) would cost a fresh full-size allocation).
            xc = _centred(x, compute, s)[1]
            rows = xc.view(n, c, length)
            g_sum = _channels_by_time(g.sum(2))
            gy_sum = _channels_by_time(rows.mul_(g).sum(2))
            torch.sub(x, s, out=xc)
            gy_sum.addcmul_(dshift, g_sum, value=-1.0).mul_(inv_std)  # sum of g y
        # The gradient reaching y: g_y = w r g - w h z, z = w y + b (no affine: w = 1,
        # b = 0; no layer scaling: r = 1, h = 0).
        h = None
        if r is not None:
            gz = gy_sum.sum(0) if w is None else torch.mv(gy_sum.t(), w.flatten())
            if b is not None:
                gz = torch.addmv(gz, g_sum.t(), b.flatten())
            h = gz.mul_(r * r * r / (c * length))  # (N,)
        w_dtype, b_dtype = ctx.param_dtypes
        grad_w, grad_b = _online_param_grads(
            w_dtype if ctx.needs_input_grad[1] else None,
            b_dtype if ctx.needs_input_grad[2] else None,
            gy_sum, g_sum, y_mean, y_sq, w, b, r, h, length)
        if not ctx.needs_input_grad[0]:
            return None, grad_w, grad_b, None, None, None, None, None, None, None
        gy_g, gy_y = _grad_y_means(gy_sum, g_sum, y_mean, y_sq, w, b, r, h, length)
        f64 = torch.float64
        # g'_t = g_y,t - k v_{t-1} y_t ;  v_t = v_{t-1} + mean(g'_t y_t)
        vs = _states((y_sq * -k).add_(1.0), gy_y, v.detach().to(f64))
        v_prev = vs[:, :-1]
        # dx_t = g'_t / sigma_{t-1} - k u_{t-1} ;  u_t = u_{t-1} + mean(dx_t)
        us = _states(1.0 - k, gy_g.addcmul_(v_prev, y_mean, value=-k).mul_(inv_std),
                     u.detach().to(f64))
        u_prev = us[:, :-1]
        # dx = inv_std g_y - k v_prev inv_std y - k u_prev, y = (x_c - D) inv_std:
        # g coefficient inv_std w r; x_c coefficient -inv_std^2 (k v_prev + w^2 h);
        # constant -k u_prev - inv_std w b h - (x_c coefficient) D.
        g_coef = inv_std if w is None else inv_std * w
        if r is not None:
            g_coef = g_coef * r
        xc_coef = v_prev * k
        if h is not None:
            if w is None:
                xc_coef.add_(h)
            else:
                xc_coef.addr_((w * w).flatten(), h)
        xc_coef.mul_(inv_std).mul_(inv_std).neg_()
        const = u_prev * -k
        if h is not None and b is not None:
            const.addcmul_(inv_std, torch.outer((b if w is None else w * b).flatten(), h),
                           value=-1.0)
        const.addcmul_(xc_coef, dshift, value=-1.0)
        if xc is None:
            grad_in = grad_out.new_empty(x.shape)
            grad_in.view(n, c).copy_(torch.addcmul(const, g_coef, g_sum).t())
        else:  # in x_c's buffer
            rows.mul_(xc_coef.t().to(compute).unsqueeze(2))
            rows.add_(const.t().to(compute).unsqueeze(2))
            rows.addcmul_(g, g_coef.t().to(compute).unsqueeze(2))
            grad_in = xc.to(grad_out.dtype)
        update_running_(u, us[:, -1], 1.0, name)
        update_running_(v, vs[:, -1], 1.0, name)
        return grad_in, grad_w, grad_b, None, None, None, None, None, None, None


def _online_param_grads(w_dtype, b_dtype, gy_sum, g_sum, y_mean, y_sq, w, b, r, h,
                        length):
    """The gradients of the affine ``weight`` and ``bias`` (None where ``w_dtype`` /
    ``b_dtype`` is None: not wanted) from the per-(n, c) sums of g and g y: the sums
    over (n, L) of g_z y and g_z, with g_z = r g - h z."""
    grad_w = grad_b = None
    if w_dtype is not None:
        dw = gy_sum.sum(1) if r is None else torch.mv(gy_sum, r)
        if h is not None:
            hl = h * length
            dw.sub_(torch.mv(y_sq, hl) * (1.0 if w is None else w.flatten()))
            if b is not None:
                dw.sub_(torch.mv(y_mean, hl) * b.flatten())
        grad_w = dw.to(w_dtype)
    if b_dtype is not None:
        db = g_sum.sum(1) if r is None else torch.mv(g_sum, r)
        if h is not None:
            hl = h * length
            db.sub_(torch.mv(y_mean, hl) * (1.0 if w is None else w.flatten()))
            db.sub_(hl.sum() * b.flatten())
        grad_b = db.to(b_dtype)
    return grad_w, grad_b


def _grad_y_means(gy_sum, g_sum, y_mean, y_sq, w, b, r, h, length):
    """Per-(n, c) means of g_y and of g_y y, with g_y = w r g - w h z the gradient
    reaching y (``gy_sum`` is overwritten)."""
    rl = (1.0 / length) if r is None else r / length
    gy_g = g_sum * rl
    gy_y = gy_sum.mul_(rl)
    if h is not None:
        z_mean = y_mean if w is None else y_mean * w
        zy_mean = y_sq if w is None else y_sq * w
        if b is not None:
            z_mean = z_mean + b
            zy_mean = zy_mean + y_mean * b
        gy_g.addcmul_(z_mean, h, value=-1.0)
        gy_y.addcmul_(zy_mean, h, value=-1.0)
    if w is not None:
        gy_g.mul_(w)
        gy_y.mul_(w)
    return gy_g, gy_y


def online_norm_step(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    u: Tensor,
    v: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    alpha_fwd: float = 0.999,
    alpha_bkw: float = 0.99,
    eps: float = 1e-5,
    layer_scaling: bool = True,
    ls_eps: float = 1e-5,
    name: str = "online_norm_step",
) -> Tensor:
    r"""One training step of Online Norm, then ``weight * y + bias`` (per channel, if
    given), then layer scaling (if ``layer_scaling``), as one autograd function.

    The math (outputs, the paper's backward, the buffer updates) is that of
    :func:`online_norm` (``training=True``) followed by the affine and
    :func:`layer_scaling`. Full-size work: forward, the row means s, x - s (exact
    whatever the mean), its mean and norm per row, and the output written over x - s in
    place (one new full-size tensor); backward, x - s again, the row sums of g and
    g (x - s), and the input gradient written over it in place (one new full-size
    tensor). Saved for backward: x and the per-(n, c) numbers. The rest is float64
    algebra and scans on per-(n, c) values. ``running_mean``, ``running_var`` are
    updated in forward, ``u``, ``v`` in backward (only when the input gradient is
    computed), through the NaN guard. A non-finite input entry makes its own output and
    the later samples of its channel non-finite (and, with layer scaling, its whole
    sample), as in the per-sample loop. First-order gradients only.
    """
    return _OnlineNormStep.apply(
        x, weight, bias, (running_mean, running_var, u, v), float(alpha_fwd),
        float(alpha_bkw), float(eps), bool(layer_scaling), float(ls_eps), name,
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
