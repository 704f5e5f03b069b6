"""Claim 19: MC batch norm gives a better predictive log-likelihood (and calibration)
than deterministic inference with a constant variance."""

from __future__ import annotations

import math
from pathlib import Path

from normlab.claims.base import Claim, RunContext, save_plot

WIDTH, DEPTH = 50, 2  # the paper's regression net: 2 x 50 ReLU units
BATCH = 32
LR = 1e-3  # Adam, the paper's
SAMPLES = 128  # MC samples T (the paper: 500)
FRACTIONS = (0.6, 0.2, 0.2)  # train / validation (tunes tau) / test
#: 1/tau candidates, as multiples of the deterministic net's validation MSE.
TAU_GRID = tuple(10 ** (-3 + 3.5 * i / 35) for i in range(36))
Z95 = 1.959963984540054


def _steps(budget) -> int:
    return budget.steps(1000, minimum=40)


def _splits(budget) -> int:
    return budget.pick(quick=3, default=10, full=20)


def diabetes_split(seed: int):
    """scikit-learn's diabetes data (442 patients, 10 features; shipped with the
    package), split 60/20/20 at random by ``seed``, features and target standardised
    with the training split's statistics. Returns float32 tensors
    ``x_tr, y_tr, x_va, y_va, x_te, y_te`` (targets ``(N, 1)``)."""
    import numpy as np
    import torch
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_tr = int(round(FRACTIONS[0] * len(x)))
    n_va = int(round(FRACTIONS[1] * len(x)))
    parts = perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]
    mx, sx = x[parts[0]].mean(0), x[parts[0]].std(0)
    my, sy = y[parts[0]].mean(), y[parts[0]].std()
    out = []
    for idx in parts:
        out.append(torch.tensor((x[idx] - mx) / sx, dtype=torch.float32))
        out.append(torch.tensor((y[idx] - my) / sy, dtype=torch.float32).unsqueeze(1))
    return tuple(out)


def gaussian_pll(mean, var, y) -> float:
    """Mean log-density of ``y`` under N(mean, var) (var broadcast)."""
    import torch

    var = torch.as_tensor(var, dtype=mean.dtype)
    return float((-0.5 * torch.log(2 * math.pi * var) - 0.5 * (y - mean) ** 2 / var).mean())


def _run_split(ctx: RunContext, split: int, steps: int) -> dict:
    key = (f"diabetes split={split} {FRACTIONS} bn-mlp {DEPTH}x{WIDTH} adam lr={LR} "
           f"batch={BATCH} steps={steps} mc_samples={SAMPLES} tau_grid={len(TAU_GRID)}")

    def work() -> dict:
        import torch

        from normlab import models
        from normlab.claims._custom_loop import fit
        from normlab.uncertainty import mc_batchnorm, predictive_log_likelihood

        x_tr, y_tr, x_va, y_va, x_te, y_te = diabetes_split(split)
        torch.manual_seed(split)
        model = models.mlp((x_tr.shape[1],), 1, norm="bn", width=WIDTH, depth=DEPTH)
        mse = torch.nn.functional.mse_loss
        run = fit(model, x_tr, y_tr, x_va, y_va, steps=steps, batch_size=BATCH, lr=LR,
                  seed=split, optimizer="adam", loss_fn=mse, classification=False,
                  eval_every=steps)
        model.eval()
        with torch.no_grad():
            det_va, det_te = model(x_va), model(x_te)
        # CUBN: the deterministic prediction with the constant variance that maximizes
        # the validation log-likelihood (its maximum-likelihood value, the validation MSE).
        cu_var = float(mse(det_va, y_va))
        x_eval = torch.cat([x_va, x_te])
        pred = mc_batchnorm(model, x_eval, x_tr, samples=SAMPLES, batch_size=BATCH,
                            generator=torch.Generator().manual_seed(1000 + split),
                            return_samples=True)
        n_va = len(x_va)
        s_va, s_te = pred.samples[:, :n_va], pred.samples[:, n_va:]
        m_te, v_te = pred.mean[n_va:], pred.var[n_va:]
        # MCBN: the model precision tau tuned on the validation split (the paper's way).
        val_pll = [float(predictive_log_likelihood(s_va, y_va, 1.0 / (f * cu_var)))
                   for f in TAU_GRID]
        best = max(range(len(TAU_GRID)), key=val_pll.__getitem__)
        inv_tau = TAU_GRID[best] * cu_var
        mc_pll = float(predictive_log_likelihood(s_te, y_te, 1.0 / inv_tau))
        cu_pll = gaussian_pll(det_te, cu_var, y_te)
        mc_sd = (v_te + inv_tau).sqrt()
        return {
            "split": split, "final_train_loss": run["final_train_loss"],
            "diverged": run["diverged"],
            "cubn": {"test_pll": cu_pll, "var": cu_var,
                     "test_rmse": float(mse(det_te, y_te).sqrt()),
                     "coverage95": float(((det_te - y_te).abs() <= Z95 * math.sqrt(cu_var))
                                         .float().mean())},
            "mcbn": {"test_pll": mc_pll, "inv_tau": inv_tau, "tau_grid_index": best,
                     "mean_mc_var": float(v_te.mean()),
                     "test_rmse": float(mse(m_te, y_te).sqrt()),
                     "coverage95": float(((m_te - y_te).abs() <= Z95 * mc_sd).float().mean())},
        }

    return ctx.run(key, work)


def measure(ctx: RunContext) -> dict:
    steps = _steps(ctx.budget)
    rows = [_run_split(ctx, split, steps) for split in range(_splits(ctx.budget))]
    diffs = [r["mcbn"]["test_pll"] - r["cubn"]["test_pll"] for r in rows]
    n = len(diffs)
    mean_diff = sum(diffs) / n
    se = (math.sqrt(sum((d - mean_diff) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None)
    return {"data": "sklearn diabetes (442 x 10, regression)", "steps": steps,
            "mc_samples": SAMPLES, "splits": rows, "pll_diff": diffs,
            "mean_pll_diff": mean_diff, "se_pll_diff": se,
            "mean_pll": {k: sum(r[k]["test_pll"] for r in rows) / n for k in ("mcbn", "cubn")},
            "mean_coverage95": {k: sum(r[k]["coverage95"] for r in rows) / n
                                for k in ("mcbn", "cubn")},
            "mean_rmse": {k: sum(r[k]["test_rmse"] for r in rows) / n for k in ("mcbn", "cubn")}}


def judge(m: dict) -> tuple[str, str]:
    d, se = m["mean_pll_diff"], m["se_pll_diff"]
    wins = sum(x > 0 for x in m["pll_diff"])
    desc = (f"test PLL MCBN {m['mean_pll']['mcbn']:.3f} vs CUBN {m['mean_pll']['cubn']:.3f} "
            f"(difference {d:+.3f}, standard error {'n/a' if se is None else f'{se:.3f}'}, "
            f"MCBN better in {wins}/{len(m['pll_diff'])} splits); 95% interval coverage MCBN "
            f"{m['mean_coverage95']['mcbn']:.2f}, CUBN {m['mean_coverage95']['cubn']:.2f}")
    if se is None:
        return "inconclusive", f"one split gives no spread to judge against; {desc}."
    if d > 2 * se:
        return "reproduced", f"MCBN's PLL is higher by more than 2 standard errors; {desc}."
    if d < -2 * se:
        return "not reproduced", f"MCBN's PLL is lower by more than 2 standard errors; {desc}."
    return "inconclusive", f"the PLL difference is within 2 standard errors; {desc}."


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    splits = [r["split"] for r in m["splits"]]
    cu = [r["cubn"]["test_pll"] for r in m["splits"]]
    mc = [r["mcbn"]["test_pll"] for r in m["splits"]]
    ax1.scatter(cu, mc, color="tab:blue")
    for s, x, y in zip(splits, cu, mc, strict=True):
        ax1.annotate(str(s), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lo, hi = min(cu + mc), max(cu + mc)
    pad = 0.05 * (hi - lo + 1e-9)
    ax1.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", ls=":", lw=0.8)
    ax1.set_xlabel("test PLL, deterministic BN + constant variance (CUBN)")
    ax1.set_ylabel("test PLL, MC batch norm (MCBN)")
    ax1.set_title("Per split (above the diagonal: MCBN better)", fontsize=9)
    ax1.grid(alpha=0.3)
    names = ("cubn", "mcbn")
    cov = [m["mean_coverage95"][k] for k in names]
    ax2.bar(["CUBN", "MCBN"], cov, color=["tab:gray", "tab:blue"])
    ax2.axhline(0.95, color="black", ls=":", lw=0.8)
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("fraction of test targets inside the 95% interval")
    ax2.set_title("Calibration: 95% predictive-interval coverage (ideal: 0.95)", fontsize=9)
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle(f"MC batch norm vs deterministic inference, {m['data']}, "
                 f"{len(splits)} random splits, T = {m['mc_samples']}", fontsize=9)
    return save_plot(fig, out_dir, "mcbn_uncertainty_pll.png")


CLAIM = Claim(
    number=19,
    id="mcbn_uncertainty",
    title="MC batch norm gives better predictive log-likelihood than deterministic inference",
    statement="A network trained with batch normalization, run at test time with the "
              "statistics of random training mini-batches (Monte Carlo Batch Normalization), "
              "gives meaningful uncertainty: a better predictive log-likelihood than the same "
              "network with a constant, tuned predictive variance (CUBN), comparable to MC "
              "dropout.",
    source="Teye, Azizpour & Smith, 'Bayesian Uncertainty Estimation for Batch Normalized "
           "Deep Networks', ICML 2018, section 5 and Table 2 (UCI regression, PLL and CRPS vs "
           "the constant-uncertainty baseline CUBN)",
    setup=f"scikit-learn's diabetes regression data (442 x 10, shipped with the package), "
          "random 60/20/20 train/validation/test splits (3 at the quick budget, 10 at the "
          f"default), standardised; a {DEPTH} x {WIDTH} ReLU MLP with normlab BatchNorm "
          f"(normlab.models.mlp), Adam lr {LR:g}, batch {BATCH}, MSE, 1000 steps at the "
          "default budget (x0.25 quick). CUBN: eval-mode prediction with a constant variance "
          "equal to the validation MSE (its maximum-likelihood value). MCBN: "
          f"normlab.uncertainty.mc_batchnorm with T = {SAMPLES} training batches of {BATCH}, "
          "PLL of the mixture of the T predictions with precision tau, tau chosen on the "
          "validation split from a log grid.",
    criterion="Per split, diff = test PLL(MCBN) - test PLL(CUBN). Reproduced if the mean diff "
              "over splits exceeds 2 standard errors (SE = sample std / sqrt(number of "
              "splits)); not reproduced if it is below -2 SE; inconclusive otherwise (or with "
              "a single split). Calibration (95% interval coverage) and RMSE are reported, "
              "not part of the verdict.",
    measure=measure,
    judge=judge,
    requires=("normlab.uncertainty.mc_batchnorm",
              "normlab.uncertainty.predictive_log_likelihood"),
    plot=plot,
    takeaway="MC batch norm's uncertainty can be small next to the data's noise: check it "
             "against a tuned constant variance before relying on it.",
)
