"""Claim 21: batch normalization of the input-to-hidden term alone trains faster but
generalises no better (Laurent et al. 2016)."""

from __future__ import annotations

from pathlib import Path

from normlab.claims._custom_loop import acc_or_chance, mean, noise_floor, pct
from normlab.claims.base import Claim, RunContext, save_plot

HIDDEN = 64
BATCH = 32
LR = 2e-3  # Adam
CLIP = 1.0
FASTER = 0.85  # "faster": mean training loss at most 85% of the LSTM's
VARIANTS = ("input_bn", "lstm")
LABELS = {"input_bn": "LSTM + BN of the input term (sequence-wise)",
          "lstm": "LSTM (torch.nn.LSTM)"}


def _steps(budget) -> int:
    return budget.steps(1200, minimum=40)


def _run(ctx: RunContext, variant: str, seed: int, steps: int) -> dict:
    eval_every = max(1, steps // 20)
    norm = "input_bn" if variant == "input_bn" else "none"
    key = (f"{variant} lstm h{HIDDEN} rows data={ctx.data} batch={BATCH} adam lr={LR} "
           f"clip={CLIP} steps={steps} eval_every={eval_every} seed={seed}")

    def work() -> dict:
        import torch

        from normlab import models
        from normlab.train import evaluate, train

        ds = ctx.dataset()
        torch.manual_seed(seed)
        model = models.lstm_classifier(ds.in_shape, ds.num_classes, norm=norm, width=HIDDEN)
        result = train(model, ds, steps=steps, batch_size=BATCH, lr=LR, optimizer="adam",
                       clip_grad_norm=CLIP, seed=seed, progress=False, eval_every=eval_every)
        out = result.to_dict()
        train_loss, train_acc = evaluate(model, ds.x_train, ds.y_train)
        out["train_set_loss"], out["train_set_acc"] = train_loss, train_acc
        return out

    return ctx.run(key, work)


def measure(ctx: RunContext) -> dict:
    steps = _steps(ctx.budget)
    seeds = list(range(ctx.budget.seeds))
    num_classes = ctx.dataset().num_classes
    out = {"data": ctx.data, "hidden": HIDDEN, "batch": BATCH, "lr": LR, "steps": steps,
           "seeds": seeds, "variants": {}}
    for v in VARIANTS:
        runs = [_run(ctx, v, seed, steps) for seed in seeds]
        # Area under the training-loss curve: the mean of every logged batch loss (a
        # diverged run's missing losses make it count as not faster: infinite).
        auc = []
        for r in runs:
            losses = r["curve"]["loss"]
            ok = not r["diverged"] and losses and all(x is not None for x in losses)
            auc.append(mean(losses) if ok else None)
        accs = [acc_or_chance(r, num_classes) for r in runs]
        out["variants"][v] = {
            "final_test_acc": accs, "mean_acc": mean(accs),
            "train_loss_auc": auc,
            "mean_train_loss_auc": mean(auc) if all(a is not None for a in auc) else None,
            "train_set_acc": [r["train_set_acc"] for r in runs],
            "train_set_loss": [r["train_set_loss"] for r in runs],
            "test_loss": [r["final_test_loss"] for r in runs],
            "diverged": [bool(r["diverged"]) for r in runs],
            "curves": [{"step": r["curve"]["step"], "loss": r["curve"]["loss"]} for r in runs],
            "evals": [{"step": r["evals"]["step"], "test_acc": r["evals"]["test_acc"]}
                      for r in runs],
        }
    return out


def judge(m: dict) -> tuple[str, str]:
    bn, lstm = m["variants"]["input_bn"], m["variants"]["lstm"]
    a_bn, a_lstm = bn["mean_train_loss_auc"], lstm["mean_train_loss_auc"]
    if a_bn is None:
        faster = "fails"
    elif a_lstm is None or a_bn <= FASTER * a_lstm:
        faster = "holds"
    elif a_bn >= a_lstm:
        faster = "fails"
    else:
        faster = "undecided"
    tau = noise_floor(bn["final_test_acc"], lstm["final_test_acc"])
    diff = bn["mean_acc"] - lstm["mean_acc"]
    no_better = "holds" if diff <= tau else "fails"

    def fmt(x):
        return "n/a (diverged)" if x is None else f"{x:.3f}"

    desc = (f"mean training loss over the run: input-BN {fmt(a_bn)} vs LSTM {fmt(a_lstm)} "
            f"(faster needs <= {FASTER:g}x): {faster}; final test accuracy input-BN "
            f"{pct(bn['mean_acc'])} vs LSTM {pct(lstm['mean_acc'])} ({100 * diff:+.1f} points, "
            f"noise {100 * tau:.1f}): no better {no_better}; train-set accuracy input-BN "
            f"{pct(mean(bn['train_set_acc']))}, LSTM {pct(mean(lstm['train_set_acc']))}")
    if faster == "holds" and no_better == "holds":
        return "reproduced", f"trains faster and generalises no better; {desc}."
    if "fails" in (faster, no_better):
        return "not reproduced", f"{desc}."
    return "inconclusive", f"the training speed-up is below the bar but positive; {desc}."


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from normlab.claims._custom_loop import smooth

    colors = {"input_bn": "tab:green", "lstm": "tab:gray"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v in VARIANTS:
        for i, c in enumerate(m["variants"][v]["curves"]):
            ax1.plot(c["step"], smooth(c["loss"], 25), color=colors[v], lw=1.2,
                     label=LABELS[v] if i == 0 else None)
        for i, e in enumerate(m["variants"][v]["evals"]):
            ax2.plot(e["step"], e["test_acc"], color=colors[v], lw=1.2, marker=".",
                     label=LABELS[v] if i == 0 else None)
    ax1.set_yscale("log")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("training loss (moving average of 25 steps, log)")
    ax1.set_title("Training criterion (faster?)", fontsize=10)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("test accuracy")
    ax2.set_ylim(0, 1.01)
    ax2.set_title("Generalisation (better?)", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Row-by-row {m['data']}, {m['hidden']} hidden units, Adam {m['lr']:g}, batch "
                 f"{m['batch']}", fontsize=9)
    return save_plot(fig, out_dir, "input_bn_lstm_curves.png")


CLAIM = Claim(
    number=21,
    id="input_bn_lstm",
    title="BN of the input-to-hidden term alone trains faster but generalises no better",
    statement="Applying batch normalization to the input-to-hidden transitions of recurrent "
              "networks (not the hidden-to-hidden ones, where it 'doesn't help') leads to "
              "faster convergence of the training criterion but does not improve "
              "generalisation (more overfitting) on speech (WSJ) and language modelling "
              "(Penn Treebank).",
    source="Laurent, Pereyra, Brakel, Zhang & Bengio, 'Batch Normalized Recurrent Neural "
           "Networks', ICASSP 2016 (abstract, sections 4-5)",
    setup=f"The study's dataset (digits 8x8 by default) read row by row (8 steps of 8 pixels); "
          f"normlab.models.lstm_classifier with {HIDDEN} hidden units: norm='input_bn' "
          "(normlab.nn.InputBNLSTM, sequence-wise statistics, gamma 1) vs norm='none' "
          "(torch.nn.LSTM; both with torch's LSTM init). Adam lr "
          f"{LR:g}, gradient clipping {CLIP:g}, batch {BATCH}, 1200 steps at the default "
          "budget (x0.25 quick, long enough to fit the training set); seeds: the budget's.",
    criterion="Speed: AUC = mean of the logged training-batch losses over the whole run, "
              "mean over seeds; 'faster' holds if AUC(input-BN) <= 0.85 x AUC(LSTM), fails if "
              "AUC(input-BN) >= AUC(LSTM), undecided in between. Generalisation: diff = final "
              "test accuracy (mean over seeds) input-BN - LSTM, noise = max(1 point, seed "
              "ranges); 'no better' holds if diff <= noise, fails otherwise. Reproduced if "
              "both hold; not reproduced if either fails; inconclusive otherwise.",
    measure=measure,
    judge=judge,
    requires=("normlab.nn.InputBNLSTM",),
    plot=plot,
    takeaway="BN on an RNN's input term speeds up fitting; do not expect it to improve "
             "test accuracy.",
)
