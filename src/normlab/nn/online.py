"""Streaming normalization: Online Normalization."""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional import online as FO
from normlab.nn.base import NormBase
from normlab.nn.checks import check_number

__all__ = ["OnlineNorm"]

_ECMS = ("ls", "ac")


class OnlineNorm(NormBase):
    r"""Online Normalization (Chiley, Sharapov, Kosson, Koster, Reece, Samaniego de la
    Fuente, Subbiah & James, NeurIPS 2019): normalization with streaming estimates,
    no batch needed, and a backward pass with its own error controllers.

    **Forward.** Per channel, the samples t = 1..N of a batch are taken in batch
    order (as a stream), with :math:`m_t, s^2_t` the mean and biased variance of
    sample t over the trailing dimensions (:math:`m_t = x_t, s^2_t = 0` on ``(N, C)``
    input). Each sample is normalized with the statistics from *before* it:

    .. math::
        y_t = \frac{x_t - \mu_{t-1}}{\sqrt{\sigma^2_{t-1} + \epsilon}}

    .. math::
        \sigma^2_t = \alpha_f \sigma^2_{t-1} + (1-\alpha_f)\,s^2_t
            + \alpha_f(1-\alpha_f)(m_t - \mu_{t-1})^2, \qquad
        \mu_t = \alpha_f \mu_{t-1} + (1-\alpha_f)\,m_t

    :math:`\mu, \sigma^2` are the buffers ``running_mean`` (init 0) and ``running_var``
    (init 1), carried from batch to batch; one batch of N gives the same outputs,
    gradients and final state as N batches of 1. The recursions are computed as
    parallel scans over the batch (see :mod:`normlab.functional.online`), not by a
    loop over the samples.

    **Backward** (the paper's; deliberately *not* the gradient of the forward): with
    :math:`g_t = \partial L / \partial y_t`, :math:`k = 1 - \alpha_b` and the
    controllers ``u``, ``v`` (buffers, init 0), for t = 1..N in order

    .. math::
        g'_t = g_t - k\,v_{t-1}\,y_t, \quad v_t = v_{t-1} + \overline{g'_t y_t}, \quad
        \frac{\partial L}{\partial x_t} = \frac{g'_t}{\sqrt{\sigma^2_{t-1} + \epsilon}}
            - k\,u_{t-1}, \quad u_t = u_{t-1} + \overline{\partial L / \partial x_t}

    (bars: means over the trailing dimensions). They keep BN's constraints on the
    input gradient, zero mean and no component along y, in expectation.
    **Backward mutates** ``u`` **and** ``v``: a second backward through the same graph
    (``retain_graph=True``) starts from the updated controllers and is not
    idempotent.

    **After the normalization**: the per-channel affine :math:`\gamma y + \beta`
    (identity at initialisation), then the error-compensation mechanism (ECM):
    ``"ls"`` layer scaling :math:`z_n / \sqrt{\overline{z_n^2} + \epsilon_{ls}}` over
    all of ``C x *`` of each sample, ``"ac"`` activation clamping
    :math:`\mathrm{clamp}(z, -5, 5)`, or None. In training with ``"ls"`` or None the
    whole step (normalization, affine, ECM) is one autograd function with a
    closed-form backward (:func:`normlab.functional.online.online_norm_step`: a few
    full-size passes, the rest on per-(sample, channel) numbers in float64); with
    ``"ac"`` and in eval the affine and the ECM use ordinary autograd.

    **Eval**: the same buffers normalize every sample, and are not updated:
    :math:`y = (x - \mu)/\sqrt{\sigma^2 + \epsilon}` (what training gives a batch of
    one). ``u`` and ``v`` are not touched.

    Non-finite statistics are not written to the buffers (the channel keeps its old
    value, with a RuntimeWarning); within a batch, a NaN sample makes the outputs of
    the later samples of that channel NaN, as in any streaming estimate.

    Args:
        num_channels: C.
        alpha_fwd: :math:`\alpha_f`, decay of the forward statistics. Default: 0.999
            (the paper's ImageNet value; CIFAR-10 used 1023/1024).
        alpha_bkw: :math:`\alpha_b`, decay of the backward controllers. Default: 0.99
            (CIFAR-10: 127/128).
        eps: Default: 1e-5.
        affine: per-channel :math:`\gamma` (1), :math:`\beta` (0). Default: True.
        ecm: ``"ls"`` (layer scaling, the setting of the paper's experiments), ``"ac"``
            (activation clamping, the Cerebras library's default since 2020) or None.
            Default: "ls".
        ls_eps: :math:`\epsilon_{ls}` of layer scaling. Default: 1e-5.
        clamp_value: bound of activation clamping. Default: 5.
        fused: in training, run the whole step (online norm, affine, layer scaling or
            no ECM; forward and the paper's backward) in the fused C++ kernels of
            :mod:`normlab.kernels` (compiled at first use; CPU float32/bfloat16
            contiguous input, float32 parameters). Eval, ``ecm="ac"`` and any other
            input take the default path. Results equal the default path's within
            float32 rounding; no double backward. Default: False.

    Shape:
        - Input: :math:`(N, C, *)` of any rank >= 2; output of the same shape.
          Training works at batch size 1.
    """

    def __init__(
        self,
        num_channels: int,
        alpha_fwd: float = 0.999,
        alpha_bkw: float = 0.99,
        eps: float = 1e-5,
        affine: bool = True,
        ecm: str | None = "ls",
        ls_eps: float = 1e-5,
        clamp_value: float = 5.0,
        device=None,
        dtype=None,
        fused: bool = False,
    ) -> None:
        name = f"OnlineNorm({num_channels})"
        alpha_fwd = check_number(name, "alpha_fwd", alpha_fwd, low=0.0, high=1.0)
        alpha_bkw = check_number(name, "alpha_bkw", alpha_bkw, low=0.0, high=1.0)
        ls_eps = check_number(name, "ls_eps", ls_eps, low=0.0)
        if isinstance(ecm, str) and ecm.lower() == "none":
            ecm = None
        if ecm is not None and (not isinstance(ecm, str) or ecm.lower() not in _ECMS):
            raise ValueError(f"{name}: ecm must be 'ls', 'ac' or None, got {ecm!r}")
        clamp_value = check_number(name, "clamp_value", clamp_value, low=0.0, low_open=True,
                                   allow_inf=True)
        super().__init__(num_channels, eps, None, affine, True, device=device, dtype=dtype)
        self.alpha_fwd = float(alpha_fwd)
        self.alpha_bkw = float(alpha_bkw)
        self.ecm = None if ecm is None else ecm.lower()
        self.ls_eps = float(ls_eps)
        self.clamp_value = float(clamp_value)
        self.fused = bool(fused)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("u", torch.zeros(num_channels, **factory))
        self.register_buffer("v", torch.zeros(num_channels, **factory))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "u"):
            self.u.zero_()
            self.v.zero_()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.numel() == 0:
            return self._empty_batch(x)
        y = self._step(x)
        if self.training:
            # Counted once the step has run, so that a refused call changes nothing.
            self.num_batches_tracked.add_(1)
        return y

    def _step(self, x: Tensor) -> Tensor:
        if self.fused and self.training and self.ecm != "ac":
            from normlab.kernels import online as kernel  # compiled lazily, only when asked

            if kernel.supports(x, self.weight, self.bias):
                return kernel.online_norm(
                    x, self.running_mean, self.running_var, self.u, self.v, self.weight,
                    self.bias, self.alpha_fwd, self.alpha_bkw, self.eps,
                    layer_scaling=self.ecm == "ls", ls_eps=self.ls_eps, name=self.layer_name,
                )
        if self.training and self.ecm != "ac":
            # The whole step (online norm, affine, layer scaling) as one function.
            return FO.online_norm_step(
                x, self.running_mean, self.running_var, self.u, self.v, self.weight,
                self.bias, self.alpha_fwd, self.alpha_bkw, self.eps,
                layer_scaling=self.ecm == "ls", ls_eps=self.ls_eps, name=self.layer_name,
            )
        y = FO.online_norm(
            x, self.running_mean, self.running_var, self.u, self.v,
            self.alpha_fwd, self.alpha_bkw, self.eps, training=self.training,
            name=self.layer_name,
        )
        if self.weight is not None:
            shape = (1, self.num_channels) + (1,) * (x.dim() - 2)
            w = self.weight.view(shape).to(y.dtype)
            y = y * w if self.bias is None else torch.addcmul(
                self.bias.view(shape).to(y.dtype), y, w
            )
        if self.ecm == "ls":
            y = FO.layer_scaling(y, self.ls_eps)
        elif self.ecm == "ac":
            y = FO.activation_clamp(y, self.clamp_value)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
            f"eps={self.eps}, affine={self.affine}, ecm={self.ecm!r}"
            + (", fused=True" if self.fused else "")
        )

