"""The lab's measurement probes: the loss Hessian's spectrum (claim 5) and the drift of a
layer's input distribution during training (claim 6).

Not a claim module (the leading underscore keeps :func:`normlab.claims.all_claims`
from loading it as one). Each probe works on a copy of the model, so probing never
changes a model's parameters, buffers (BatchNorm's running statistics) or mode.

**Hessian.** For the mean cross-entropy :math:`L(\\theta)` of a model on a fixed batch,
the Hessian-vector product :math:`Hv = \\nabla_\\theta (\\nabla_\\theta L \\cdot v)` comes from
double backward, without forming :math:`H`. Power iteration on :math:`H` finds the
eigenvalue of largest magnitude; a second run on :math:`H - \\mu I` (:math:`\\mu` the
first) finds the other end of the spectrum. Hutchinson's estimator gives the trace,
:math:`\\operatorname{tr} H = \\mathbb{E}_z[z^\\top H z]` with Rademacher :math:`z`. The
dimensionless ratio :math:`\\kappa = \\lambda_{max} / (\\operatorname{tr} H / P)` (``P``
parameters) compares the steepest curvature with the average one.

**Drift.** For an ``(N, units)`` activation the per-unit mean :math:`\\mu_j` and standard
deviation :math:`\\sigma_j` over the batch; between two checkpoints ``a`` and ``b`` the
drift is :math:`\\frac{1}{U}\\sum_j (|\\mu^b_j - \\mu^a_j| + |\\sigma^b_j - \\sigma^a_j|)`
divided by the mean of the two checkpoints' RMS activations
:math:`\\sqrt{\\frac{1}{U}\\sum_j (\\mu_j^2 + \\sigma_j^2)}` (Ioffe & Szegedy's "change in
the distribution of a layer's inputs", made scale-free). Santurkar et al.'s (2018)
gradient-based shift is :func:`gradient_shift`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

__all__ = ["hvp_operator", "hessian_spectrum", "hidden_linears", "layer_inputs",
           "unit_stats", "interval_drift", "gradient_shift"]


def hvp_operator(model: nn.Module, x: Tensor, y: Tensor):
    """``(params, hvp)`` for the mean cross-entropy of ``model`` on ``(x, y)`` in the
    model's current mode: ``hvp(vs)`` is the Hessian (with respect to ``params``, the
    parameters that require grad) times the list of tensors ``vs``.

    Shape:
        - x: ``(N, *)`` inputs; y: ``(N,)`` class indices.
        - vs and the result: one tensor per parameter, each of that parameter's shape.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp(vs):
        return torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)

    return params, hvp


def _dot(a, b) -> float:
    return float(sum((u * v).sum() for u, v in zip(a, b, strict=True)))


def _normalize(vs):
    norm = math.sqrt(_dot(vs, vs))
    return [v / norm for v in vs]


def _power(params, hvp, gen, iters: int, shift: float) -> tuple[float, float]:
    """An eigenvalue of ``H`` by power iteration on ``H - shift I``, and the relative
    change of its estimate over the last iteration (how far from converged)."""
    # drawn on the CPU generator, then moved: the same vectors on every device
    v = _normalize([torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
                    for p in params])
    lam = prev = 0.0
    for _ in range(iters):
        hv = [h - shift * u for h, u in zip(hvp(v), v, strict=True)]
        lam, prev = _dot(v, hv), lam
        if not math.isfinite(lam) or _dot(hv, hv) == 0.0:
            break
        v = _normalize(hv)
    return lam + shift, abs(lam - prev) / max(abs(lam), 1e-30)


def hessian_spectrum(model: nn.Module, x: Tensor, y: Tensor, power_iters: int = 40,
                     probes: int = 30, seed: int = 0) -> dict:
    """Top and bottom eigenvalues and the trace of the loss Hessian of ``model`` on the
    batch ``(x, y)``, computed in float64 on a copy in train mode (a BN layer normalizes
    with the batch's own statistics, the function the optimizer sees).

    Args:
        power_iters: power iterations for each end of the spectrum.
        probes: Rademacher probes of Hutchinson's trace estimator (at least 2).
        seed: the probes' and start vectors' generator seed.

    Returns:
        ``{"lambda_max", "lambda_max_rel_change", "lambda_min", "trace", "trace_se",
        "num_params", "mean_eig", "condition"}``; ``condition`` is
        :math:`\\lambda_{max} / (\\operatorname{tr} H / P)`, None unless the trace is above
        two standard errors and :math:`\\lambda_{max} > 0`.
    """
    if probes < 2 or power_iters < 1:
        raise ValueError(f"hessian_spectrum: need probes >= 2 and power_iters >= 1, got "
                         f"probes={probes}, power_iters={power_iters}")
    net = copy.deepcopy(model).double().train()
    params, hvp = hvp_operator(net, x.double(), y)
    gen = torch.Generator().manual_seed(seed)
    # Power iteration finds the eigenvalue of largest magnitude, which can be the bottom
    # one of an indefinite Hessian; the shifted run then finds the other end.
    first, first_change = _power(params, hvp, gen, power_iters, 0.0)
    other, other_change = _power(params, hvp, gen, power_iters, first)
    (lam_max, change), lam_min = (((first, first_change), other) if first >= other
                                  else ((other, other_change), first))
    samples = []
    for _ in range(probes):
        z = [(torch.randint(0, 2, p.shape, generator=gen).double() * 2 - 1).to(p.device)
             for p in params]
        samples.append(_dot(z, hvp(z)))
    n = sum(p.numel() for p in params)
    trace = sum(samples) / len(samples)
    var = sum((s - trace) ** 2 for s in samples) / (len(samples) - 1)
    trace_se = math.sqrt(var / len(samples))
    defined = trace > 2 * trace_se and lam_max > 0
    return {"lambda_max": lam_max, "lambda_max_rel_change": change, "lambda_min": lam_min,
            "trace": trace, "trace_se": trace_se, "num_params": n, "mean_eig": trace / n,
            "condition": lam_max / (trace / n) if defined else None}


def hidden_linears(model: nn.Module) -> list[nn.Linear]:
    """The hidden ``Linear`` layers of a :class:`normlab.models.basic.MLP` (in
    ``model.features``), first to last."""
    return [m for m in model.features if isinstance(m, nn.Linear)]


def layer_inputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The input of every hidden ``Linear`` of an MLP on the batch ``x`` (for layer
    ``k > 0`` the previous block's output after its norm and ReLU), computed in train
    mode on a copy: BN uses the batch's statistics and the model's running statistics
    are left alone.

    Shape:
        - x: ``(N, *)``; each returned tensor ``(N, fan_in)``.
    """
    net = copy.deepcopy(model).train()
    inputs: list[Tensor] = []
    handles = [m.register_forward_hook(lambda _m, inp, _out: inputs.append(inp[0].detach()))
               for m in hidden_linears(net)]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return inputs


def unit_stats(a: Tensor) -> tuple[list[float], list[float]]:
    """Per-unit mean and (biased) standard deviation over the batch of ``a``.

    Shape:
        - a: ``(N, units)``; each list has ``units`` entries.
    """
    return a.mean(0).tolist(), a.std(0, unbiased=False).tolist()


def interval_drift(mu_a, sd_a, mu_b, sd_b) -> float:
    """The drift between two checkpoints' per-unit statistics (module docstring): mean
    over units of ``|d mean| + |d std|`` over the mean of the two RMS activations (0 if
    both are 0)."""
    if not (len(mu_a) == len(sd_a) == len(mu_b) == len(sd_b) > 0):
        raise ValueError("interval_drift: the four statistics must be non-empty lists of "
                         f"one length, got {len(mu_a)}, {len(sd_a)}, {len(mu_b)}, {len(sd_b)}")

    def rms(mu, sd):
        return math.sqrt(sum(m * m + s * s for m, s in zip(mu, sd, strict=True)) / len(mu))

    moved = sum(abs(b - a) for a, b in zip(mu_a, mu_b, strict=True))
    moved += sum(abs(b - a) for a, b in zip(sd_a, sd_b, strict=True))
    scale = 0.5 * (rms(mu_a, sd_a) + rms(mu_b, sd_b))
    return (moved / len(mu_a)) / scale if scale > 0 else 0.0


def gradient_shift(model: nn.Module, x: Tensor, y: Tensor, layer: int, lr: float) -> dict:
    """Santurkar et al.'s (2018, section 2) internal covariate shift of hidden Linear
    ``layer`` of an MLP: its weight's loss gradient :math:`G` on ``(x, y)``, and
    :math:`G'` after a plain gradient step of size ``lr`` on every parameter of the
    layers before it (on a copy, in train mode). Returns ``{"rel_l2": ||G - G'|| /
    ||G||, "cos": cos(G, G')}`` (0 where a norm is 0)."""
    net = copy.deepcopy(model).train()
    target = hidden_linears(net)[layer]
    earlier = []
    for m in net.features:
        if m is target:
            break
        earlier += list(m.parameters())

    def grad_of_target():
        net.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        return target.weight.grad.detach().clone()

    g = grad_of_target()
    with torch.no_grad():
        for p in earlier:
            if p.grad is not None:
                p -= lr * p.grad
    g2 = grad_of_target()
    gn, g2n = float(g.norm()), float(g2.norm())
    rel = float((g - g2).norm()) / gn if gn > 0 else 0.0
    cos = float((g * g2).sum()) / (gn * g2n) if gn > 0 and g2n > 0 else 0.0
    return {"rel_l2": rel, "cos": cos}
