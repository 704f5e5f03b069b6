"""The study's report, built only from the JSON files of a study folder.

:func:`write_report` reads ``out_dir/claims/*.json`` (one result per claim),
``out_dir/grid.json`` (the comparison grid) and ``out_dir/study.json`` (how the study
was run), and writes:

- ``out_dir/claims.json``: one object per claim (id, number, title, source, statement,
  setup, criterion, measured, verdict, reason, budget, data, seconds, plots ...);
- ``out_dir/plots/grid_*.png``: the grid's plots (the claims' own plots are written by
  their ``plot`` functions while the study runs, and redrawn here when missing);
- ``out_dir/README.md`` and ``out_dir/index.html``: the report. It opens with the
  claims table and what a practitioner should take from it, then each claim, the
  grid, how it was run and how to reproduce it. The HTML is one self-contained file
  (inline CSS, no network resources) that shows the PNGs in ``plots/`` by relative
  paths.

So ``normlab report DIR`` rebuilds the same report from the same results.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from normlab.claims.base import atomic_write_json, read_json

__all__ = ["write_report", "load_results", "grid_summary", "plot_grid", "make_claim_plots",
           "practitioner_notes", "compact"]

#: What claims.json keeps of each claim record (the traceback stays in claims/<id>.json).
CLAIM_FIELDS = ("id", "number", "title", "source", "statement", "setup", "criterion",
                "takeaway", "measured", "verdict", "reason", "budget", "data", "seconds",
                "cpu_seconds", "plots", "plot_error", "error", "missing")

_VERDICT_MARK = {"reproduced": "✔", "not reproduced": "✘", "inconclusive": "?",
                 "not available": "–"}


# --------------------------------------------------------------------------- reading


def load_results(out_dir: str | os.PathLike) -> tuple[dict, list[dict], dict | None]:
    """(study.json or {}, the claim records sorted by number, grid.json or None).
    Corrupt files are reported (a warning naming them) and left out."""
    out = Path(out_dir)
    meta = read_json(out / "study.json") or {}
    records = []
    for path in sorted((out / "claims").glob("*.json")):
        rec = read_json(path)
        if isinstance(rec, dict) and {"id", "number", "verdict"} <= set(rec):
            records.append(rec)
    records.sort(key=lambda r: (r["number"], r["id"]))
    grid = read_json(out / "grid.json")
    if not (isinstance(grid, dict) and "config" in grid and "runs" in grid):
        grid = None
    return meta, records, grid


# --------------------------------------------------------------------------- claim plots


def make_claim_plots(claim, measured, plots_dir: str | os.PathLike
                     ) -> tuple[list[str], str | None]:
    """Call ``claim.plot(measured, plots_dir)`` (matplotlib's Agg backend); return the
    file names it wrote that exist (relative to ``plots_dir``) and the error text, or
    None. Never raises: a failing plot is recorded, not fatal."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        names = claim.plot(measured, plots_dir) or []
    except Exception as err:
        return [], f"{type(err).__name__}: {err}"
    finally:
        try:
            import matplotlib.pyplot as plt

            plt.close("all")
        except Exception:
            pass
    files, missing = [], []
    for name in names:
        p = Path(name)
        p = p if p.is_absolute() else plots_dir / p
        if p.is_file():
            try:
                files.append(p.resolve().relative_to(plots_dir.resolve()).as_posix())
            except ValueError:
                files.append(p.name)
        else:
            missing.append(str(name))
    error = f"plot() named files that do not exist: {missing}" if missing else None
    return files, error


def _refresh_claim_plots(out: Path, records: list[dict], claims: dict | None, replot: bool,
                         log) -> None:
    """Redraw a claim's plots when asked to or when one of its files is missing (and the
    claim's code is at hand), writing the new list back into claims/<id>.json."""
    plots_dir = out / "plots"
    need = [r for r in records if r.get("measured") is not None and not r.get("error")
            and (replot or any(not (plots_dir / p).is_file() for p in r.get("plots", [])))]
    if not need:
        return
    if claims is None:
        try:
            from normlab.claims import all_claims

            claims = {c.id: c for c in all_claims()}
        except Exception as err:
            if log:
                log(f"report: cannot load the claims to redraw their plots ({err})")
            claims = {}
    for rec in need:
        claim = claims.get(rec["id"])
        if claim is None or claim.plot is None:
            rec["plots"] = [p for p in rec.get("plots", []) if (plots_dir / p).is_file()]
            continue
        rec["plots"], rec["plot_error"] = make_claim_plots(claim, rec["measured"], plots_dir)
        atomic_write_json(out / "claims" / f"{rec['id']}.json", rec)


# --------------------------------------------------------------------------- the grid


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def grid_summary(grid: dict) -> dict:
    """The grid's numbers per (norm, batch size): the best learning rate's mean test
    accuracy over seeds, and every learning rate's.

    A diverged run counts at chance accuracy (1 / number of classes): it did not
    train. A run that failed with an error is left out.

    Returns ``{"norms", "batch_sizes", "lr_factors", "chance", "by_lr": {(norm, b, f):
    {"acc", "lr", "accs", "diverged"}}, "best": {(norm, b): {"acc", "lr", "lr_factor",
    "accs", "diverged"}}}``.
    """
    cfg = grid["config"]
    chance = 1.0 / cfg.get("num_classes", 10)
    by_lr: dict = {}
    for r in grid["runs"]:
        if not r or r.get("error") or (r.get("final_test_acc") is None and not r.get("diverged")):
            continue
        key = (r["norm"], r["batch_size"], r["lr_factor"])
        entry = by_lr.setdefault(key, {"lr": r["lr"], "accs": [], "diverged": 0})
        acc = chance if r.get("diverged") else float(r["final_test_acc"])
        entry["accs"].append(acc)
        entry["diverged"] += bool(r.get("diverged"))
    for entry in by_lr.values():
        entry["acc"] = _mean(entry["accs"])
    best: dict = {}
    for (norm, b, f), entry in by_lr.items():
        cur = best.get((norm, b))
        if cur is None or entry["acc"] > cur["acc"]:
            best[(norm, b)] = {**entry, "lr_factor": f}
    # The factors as the runs recorded them (the config's may be unrounded).
    factors = sorted({f for (_, _, f) in by_lr})
    return {"norms": list(cfg["norms"]), "batch_sizes": list(cfg["batch_sizes"]),
            "lr_factors": factors, "chance": chance, "by_lr": by_lr, "best": best}


def _norm_colors(norms: Sequence[str]) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(norms)}


def _data_label(cfg: dict) -> str:
    return f"{cfg.get('model', 'cnn').upper()} on {cfg.get('data', '?')}"


def plot_grid(grid: dict, plots_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Write the grid's plots into ``plots_dir``; return (file names, errors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    files, errors = [], []
    for fn in (_plot_acc_vs_batch, _plot_curves, _plot_lr_sensitivity):
        try:
            name = fn(grid, plots_dir, plt)
            if name:
                files.append(name)
        except Exception as err:
            errors.append(f"{fn.__name__}: {type(err).__name__}: {err}")
        finally:
            plt.close("all")
    return files, errors


def _plot_acc_vs_batch(grid, plots_dir, plt) -> str | None:
    s = grid_summary(grid)
    cfg = grid["config"]
    if not s["best"]:
        return None
    colors = _norm_colors(s["norms"])
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    bs = s["batch_sizes"]
    for norm in s["norms"]:
        for f in s["lr_factors"]:
            pts = [(b, s["by_lr"][(norm, b, f)]["acc"]) for b in bs if (norm, b, f) in s["by_lr"]]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=colors[norm], alpha=0.18, lw=1)
        pts = [(b, s["best"][(norm, b)]["acc"]) for b in bs if (norm, b) in s["best"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=colors[norm], lw=2, label=norm)
    ax.axhline(s["chance"], color="grey", ls=":", lw=1, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs)
    ax.set_xticklabels([str(b) for b in bs])
    ax.set_xlabel("batch size (same number of epochs at every size)")
    ax.set_ylabel("final test accuracy (mean over seeds)")
    ax.set_title(f"Test accuracy vs batch size: {_data_label(cfg)}, {cfg['epochs']} epoch(s)\n"
                 "bold: best of the learning rates; faint: each learning rate", fontsize=10)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    fig.tight_layout()
    name = "grid_accuracy_vs_batch.png"
    fig.savefig(plots_dir / name, dpi=100)
    return name


def _plot_curves(grid, plots_dir, plt) -> str | None:
    s = grid_summary(grid)
    cfg = grid["config"]
    if not s["best"]:
        return None
    norms = [n for n in ("none", "bn", "gn", "ln") if n in s["norms"]] or s["norms"][:4]
    bs = sorted({min(s["batch_sizes"]), max(s["batch_sizes"])})
    seed = cfg["seeds"][0] if cfg.get("seeds") else 0
    colors = _norm_colors(s["norms"])
    fig, axes = plt.subplots(2, len(bs), figsize=(5.2 * len(bs), 6.4), squeeze=False)
    for j, b in enumerate(bs):
        for norm in norms:
            best = s["best"].get((norm, b))
            if best is None:
                continue
            run = next((r for r in grid["runs"] if r and r["norm"] == norm
                        and r["batch_size"] == b and r["lr_factor"] == best["lr_factor"]
                        and r["seed"] == seed and not r.get("error")), None)
            if run is None:
                continue
            per_epoch = run["steps"] / run["epochs"] if run.get("epochs") else 1.0
            ev = run.get("evals") or {}
            if ev.get("step"):
                axes[0, j].plot([st / per_epoch for st in ev["step"]], ev["test_acc"], "-",
                                color=colors[norm], label=f"{norm} (lr {run['lr']:.3g})")
            lc = run.get("loss_curve") or {}
            pts = [(st / per_epoch, v) for st, v in zip(lc.get("step", []), lc.get("loss", []),
                                                        strict=False) if v is not None]
            if pts:
                axes[1, j].plot(*zip(*pts, strict=True), color=colors[norm], lw=1, label=norm)
        axes[0, j].set_title(f"batch {b} ({int(cfg['epochs'] * cfg.get('num_train', 0) // b)}"
                             f" steps), best lr per norm, seed {seed}", fontsize=10)
        axes[0, j].set_ylabel("test accuracy")
        axes[0, j].set_ylim(0, 1.02)
        axes[1, j].set_ylabel("training loss (mean over ~2% of the run)")
        axes[1, j].set_xlabel("epoch")
        axes[1, j].set_ylim(bottom=0)
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
        axes[0, j].legend(fontsize=8)
    fig.suptitle(f"Training curves: {_data_label(cfg)}", fontsize=11)
    fig.tight_layout()
    name = "grid_training_curves.png"
    fig.savefig(plots_dir / name, dpi=100)
    return name


def _plot_lr_sensitivity(grid, plots_dir, plt) -> str | None:
    import matplotlib.ticker

    s = grid_summary(grid)
    cfg = grid["config"]
    if not s["by_lr"]:
        return None
    bs = s["batch_sizes"]
    ref = cfg.get("ref_batch", 32)
    panels = sorted({min(bs), min(bs, key=lambda b: abs(math.log2(b) - math.log2(ref))), max(bs)})
    colors = _norm_colors(s["norms"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.2), squeeze=False,
                             sharey=True)
    for j, b in enumerate(panels):
        ax = axes[0, j]
        for norm in s["norms"]:
            pts = sorted((s["by_lr"][(norm, b, f)]["lr"], s["by_lr"][(norm, b, f)]["acc"])
                         for f in s["lr_factors"] if (norm, b, f) in s["by_lr"])
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=colors[norm], label=norm)
        ax.axhline(s["chance"], color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        lrs = sorted({e["lr"] for (n, bb, f), e in s["by_lr"].items() if bb == b})
        ax.set_xticks(lrs)
        ax.set_xticklabels([f"{x:.3g}" for x in lrs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("learning rate (SGD, momentum 0.9)")
        ax.set_title(f"batch {b}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
    axes[0, 0].set_ylabel("final test accuracy (mean over seeds)")
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    fig.suptitle(f"Learning-rate sensitivity: {_data_label(cfg)}, {cfg['epochs']} epoch(s)",
                 fontsize=11)
    fig.tight_layout()
    name = "grid_lr_sensitivity.png"
    fig.savefig(plots_dir / name, dpi=100)
    return name


# --------------------------------------------------------------------------- text


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def practitioner_notes(records: Sequence[dict], grid: dict | None) -> list[str]:
    """Markdown bullet texts (without the bullet) drawn from the verdicts and the grid."""
    notes = []
    counts = {v: sum(r["verdict"] == v for r in records) for v in _VERDICT_MARK}
    if records:
        notes.append(f"Of {len(records)} claims, **{counts['reproduced']} reproduced**, "
                     f"**{counts['not reproduced']} not reproduced**, "
                     f"{counts['inconclusive']} inconclusive and {counts['not available']} "
                     "not available at this scale and budget.")
    if grid is not None:
        notes += _grid_notes(grid)
    for verdict in ("reproduced", "not reproduced"):
        for r in records:
            if r["verdict"] != verdict:
                continue
            title = f"claim {r['number']} ({_one_line(r['title'])})"
            if verdict == "reproduced":
                lesson = _one_line(r.get("takeaway") or r.get("reason", ""))
                notes.append(f"Reproduced, {title}: {lesson}")
            else:
                notes.append(f"Not reproduced here, {title}: {_one_line(r.get('reason', ''))}")
    for verdict, words in (("inconclusive", "Inconclusive here (the measurement could not "
                                            "decide, see each claim)"),
                           ("not available", "Not available yet (layers missing)")):
        these = [str(r["number"]) for r in records if r["verdict"] == verdict]
        if these:
            notes.append(f"{words}: claim{'s' if len(these) > 1 else ''} {', '.join(these)}.")
    return notes


def _grid_notes(grid: dict) -> list[str]:
    s = grid_summary(grid)
    cfg = grid["config"]
    if not s["best"]:
        return []
    notes = []
    bs = s["batch_sizes"]
    for b in sorted({min(bs), max(bs)}):
        ranked = sorted(((s["best"][(n, b)]["acc"], n) for n in s["norms"]
                         if (n, b) in s["best"]), reverse=True)
        if not ranked:
            continue
        top = ", ".join(f"{n} {_pct(a)}" for a, n in ranked[:3])
        worst_acc, worst = ranked[-1]
        notes.append(f"Grid, batch {b}: the best normalizers were {top} (best learning rate "
                     f"of {len(s['lr_factors'])}); the worst was {worst} {_pct(worst_acc)}.")
    if "bn" in s["norms"] and "none" in s["norms"]:
        diffs = [f"{100 * (s['best'][('bn', b)]['acc'] - s['best'][('none', b)]['acc']):+.1f} "
                 f"points at batch {b}" for b in bs
                 if ("bn", b) in s["best"] and ("none", b) in s["best"]]
        if diffs:
            notes.append("Grid, BN minus no normalization: " + ", ".join(diffs) + ".")
    ref = min(bs, key=lambda b: abs(math.log2(b) - math.log2(cfg.get("ref_batch", 32))))
    # Sensitivity among the norms that trained well here (one stuck near chance at every
    # rate would otherwise look "insensitive").
    top = max((s["best"][(n, ref)]["acc"] for n in s["norms"] if (n, ref) in s["best"]),
              default=0.0)
    spans = []
    for n in s["norms"]:
        accs = [s["by_lr"][(n, ref, f)]["acc"] for f in s["lr_factors"]
                if (n, ref, f) in s["by_lr"]]
        if len(accs) > 1 and max(accs) >= top - 0.10:
            spans.append((max(accs) - min(accs), n))
    if len(spans) > 1:
        spans.sort()
        notes.append(f"Grid, learning-rate sensitivity at batch {ref} (accuracy range over "
                     f"the {len(s['lr_factors'])} rates, among the normalizers within 10 points "
                     f"of the best): least sensitive {spans[0][1]} "
                     f"({100 * spans[0][0]:.1f} points), most sensitive {spans[-1][1]} "
                     f"({100 * spans[-1][0]:.1f} points).")
    seeds = len(cfg.get("seeds", []))
    ranges = [max(e["accs"]) - min(e["accs"]) for e in s["by_lr"].values() if len(e["accs"]) > 1]
    noise = (f"the median seed-to-seed range was {100 * sorted(ranges)[len(ranges) // 2]:.1f} "
             "points, so smaller differences are noise" if ranges
             else "one seed per configuration, so differences of a few points may be noise")
    notes.append(f"Scale: a {cfg.get('model', 'cnn')} on {cfg.get('data', '?')} for "
                 f"{cfg['epochs']} epoch(s), {seeds} seed(s); {noise}.")
    return notes


def _one_line(text) -> str:
    return " ".join(str(text or "").split())


def _fmt_number(x) -> str:
    if isinstance(x, bool) or x is None:
        return json.dumps(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}"
    return json.dumps(x, ensure_ascii=False)


def compact(obj, max_items: int = 8, max_chars: int = 4000, width: int = 96,
            _indent: int = 0) -> str:
    """``obj`` as short, readable JSON-like text: floats to 4 significant digits, long
    lists cut to their first and last items, anything that fits in ``width`` columns on
    one line, the whole cut to ``max_chars``."""
    text = _compact(obj, max_items, width, _indent)
    if len(text) > max_chars:
        text = text[:max_chars] + "\n… (cut; the full values are in claims.json)"
    return text


def _compact(obj, max_items: int, width: int, indent: int) -> str:
    flat = _flat(obj, max_items)
    if len(flat) + 2 * indent <= width or not isinstance(obj, (dict, list)) or not obj:
        return flat
    pad = "  " * indent
    if isinstance(obj, dict):
        items = [f"{pad}  {json.dumps(str(k))}: {_compact(v, max_items, width, indent + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    parts = [_compact(v, max_items, width, indent + 1) for v in _cut(obj, max_items)]
    return "[\n" + ",\n".join(f"{pad}  {p}" for p in parts) + f"\n{pad}]"


def _cut(items: list, max_items: int) -> list:
    if len(items) <= max_items:
        return list(items)
    return list(items[:max_items - 2]) + [_More(len(items) - max_items)] + list(items[-2:])


class _More:
    def __init__(self, n: int) -> None:
        self.n = n


def _flat(obj, max_items: int) -> str:
    if isinstance(obj, _More):
        return f"… {obj.n} more …"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_flat(v, max_items)}"
                               for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ", ".join(_flat(v, max_items) for v in _cut(obj, max_items)) + "]"
    return _fmt_number(obj)


def _md_cell(text) -> str:
    return _one_line(text).replace("|", "\\|")


def _grid_table_rows(grid: dict) -> tuple[list[str], list[list[str]]]:
    s = grid_summary(grid)
    header = ["norm"] + [f"batch {b}" for b in s["batch_sizes"]]
    rows = []
    for n in s["norms"]:
        cells = [n]
        for b in s["batch_sizes"]:
            best = s["best"].get((n, b))
            if best is None:
                cells.append("n/a")
                continue
            edge = ""
            if len(s["lr_factors"]) > 1 and best["lr_factor"] in (s["lr_factors"][0],
                                                                  s["lr_factors"][-1]):
                edge = ", lowest lr" if best["lr_factor"] == s["lr_factors"][0] else \
                    ", highest lr"
            cell = f"{_pct(best['acc'])} (lr {best['lr']:.3g}{edge})"
            div = sum(s["by_lr"][(n, b, f)]["diverged"] for f in s["lr_factors"]
                      if (n, b, f) in s["by_lr"])
            if div:
                cell += f", {div} diverged"
            cells.append(cell)
        rows.append(cells)
    return header, rows


def _grid_description(grid: dict) -> str:
    cfg = grid["config"]
    lrs = ", ".join(f"{cfg['base_lr'] * f:.3g}" for f in cfg["lr_factors"])
    scaling = (f"scaled linearly with the batch size (lr x batch / {cfg['ref_batch']}, the "
               "linear scaling rule)" if cfg.get("lr_scaling", "linear") == "linear"
               else "the same at every batch size")
    n_runs = sum(1 for r in grid["runs"] if r)
    kw = ", ".join(f"{k} {v}" for k, v in (cfg.get("model_kwargs") or {}).items())
    return (f"A {cfg.get('model', 'cnn')} ({kw}) "
            f"on {cfg.get('data', '?')} ({cfg.get('num_train', '?')} training images), trained "
            f"with each normalizer ({', '.join(cfg['norms'])}) at batch sizes "
            f"{', '.join(str(b) for b in cfg['batch_sizes'])} for the **same number of epochs "
            f"({cfg['epochs']}) at every batch size, not the same number of steps** (batch 2 "
            "takes many more, smaller steps than batch 128). SGD with momentum "
            f"{cfg.get('momentum', 0.9)} at a constant learning rate: {lrs} at batch "
            f"{cfg['ref_batch']}, {scaling}. Seeds: {', '.join(str(x) for x in cfg['seeds'])}. "
            f"{n_runs} runs. Each cell of the table is the best learning rate's mean final test "
            "accuracy over the seeds (a diverged run counts at chance accuracy); \"lowest lr\" "
            "or \"highest lr\" marks a best rate at the edge of the sweep, where a rate outside "
            "it might have done better.")


# --------------------------------------------------------------------------- writing


def _claims_json(records: Sequence[dict]) -> list[dict]:
    return [{k: r.get(k) for k in CLAIM_FIELDS} for r in records]


def write_report(out_dir: str | os.PathLike, claims: dict | None = None, replot: bool = False,
                 log: Callable[[str], None] | None = None) -> Path:
    """Build claims.json, the grid plots, README.md and index.html of the study in
    ``out_dir`` from its JSON files alone; return the path of index.html.

    ``claims`` ({id: Claim}) gives the code to redraw a claim's plots when one is missing
    (or every one, with ``replot``); without it the discovered claims are used.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"normlab report: no study folder at {out}")
    meta, records, grid = load_results(out)
    if not records and grid is None:
        raise FileNotFoundError(f"normlab report: {out} holds no results (no claims/*.json "
                                "and no grid.json); run `normlab study` first")
    _refresh_claim_plots(out, records, claims, replot, log)
    grid_plots, grid_errors = plot_grid(grid, out / "plots") if grid else ([], [])
    atomic_write_json(out / "claims.json", _claims_json(records))
    notes = practitioner_notes(records, grid)
    (out / "README.md").write_text(_markdown(meta, records, grid, grid_plots, grid_errors, notes))
    index = out / "index.html"
    index.write_text(_html(meta, records, grid, grid_plots, grid_errors, notes))
    if log:
        log(f"report: {index} and {out / 'README.md'}")
    return index


def _run_facts(meta: dict, records: Sequence[dict], grid: dict | None) -> list[tuple[str, str]]:
    m = meta.get("machine", {})
    claim_s = sum(r.get("seconds") or 0 for r in records)
    claim_cpu = sum(r.get("cpu_seconds") or 0 for r in records)
    grid_s = sum((r or {}).get("seconds") or 0 for r in (grid or {}).get("runs", []))
    budgets = sorted({r.get("budget") for r in records if r.get("budget")})
    bd = meta.get("budget_detail") or {}
    history = meta.get("history") or []
    runs = "; ".join(f"{h.get('started_at')}: {h.get('wall_seconds')} s, {h.get('runs_done')} "
                     f"runs computed, {h.get('runs_reused')} reused" for h in history)
    facts = [
        ("budget", f"{meta.get('budget', '?')} (step scale {bd.get('step_scale', '?')}, "
         f"{bd.get('seeds', '?')} seed(s))"
         + (f"; claims measured at: {', '.join(budgets)}" if budgets != [meta.get('budget')]
            and budgets else "")),
        ("data", str(meta.get("data", "?"))),
        ("date", f"{meta.get('started_at', '?')} to {meta.get('finished_at', '?')}"),
        ("wall time", f"{meta.get('wall_seconds', '?')} s for the last invocation"
         + (f" (every invocation: {runs})" if len(history) > 1 else
            f" ({meta.get('runs_done', '?')} runs computed, {meta.get('runs_reused', '?')} "
            "reused)")),
        ("compute in the stored results", f"claims {claim_s:.0f} s wall / {claim_cpu:.0f} s "
         f"CPU in their workers, grid runs {grid_s:.0f} s wall (timings on a shared machine "
         "are noisy)"),
        ("workers", f"{meta.get('workers', '?')} ({meta.get('start_method', '?')}), one torch "
         "thread each"),
        ("machine", f"{m.get('cpu_count', '?')} CPUs, {m.get('platform', '?')}, Python "
         f"{m.get('python', '?')}, torch {m.get('torch', '?')}, numpy {m.get('numpy', '?')}, "
         f"normlab {m.get('normlab', '?')}"),
    ]
    return facts


def _markdown(meta, records, grid, grid_plots, grid_errors, notes) -> str:
    L = ["# normlab study: the papers' claims about normalization, re-run at small scale", ""]
    L.append(f"Budget **{meta.get('budget', '?')}**, data **{meta.get('data', '?')}**, "
             f"{meta.get('finished_at', '')}. Every number below was measured by this run; "
             "each criterion was written before it ran. How it was run and how to reproduce it "
             "are at the end.")
    L += ["", "## Claims", "", "| # | claim | verdict | why |", "|---|---|---|---|"]
    for r in records:
        L.append(f"| {r['number']} | [{_md_cell(r['title'])}](#claim-{r['number']}) | "
                 f"{_VERDICT_MARK.get(r['verdict'], '')} {r['verdict']} | "
                 f"{_md_cell(r.get('reason', ''))} |")
    L += ["", "## What a practitioner should take from it", ""]
    L += [f"- {n}" for n in notes]
    L += ["", "## The claims", ""]
    for r in records:
        L += [f"<a id=\"claim-{r['number']}\"></a>",
              f"### {r['number']}. {_one_line(r['title'])}: {r['verdict']}", "",
              f"**Statement.** {_one_line(r.get('statement'))}", "",
              f"**Source.** {_one_line(r.get('source'))}", "",
              f"**Setup.** {_one_line(r.get('setup'))}", "",
              f"**Criterion** (written before the run). {_one_line(r.get('criterion'))}", ""]
        if r.get("measured") is not None:
            L += [f"**Measured** (budget {r.get('budget')}, data {r.get('data')}, "
                  f"{r.get('seconds') or 0:.0f} s):", "", "```", compact(r["measured"]), "```",
                  ""]
        L += [f"**Verdict: {r['verdict']}.** {_one_line(r.get('reason'))}", ""]
        if r.get("takeaway"):
            L += [f"*Takeaway:* {_one_line(r['takeaway'])}", ""]
        if r.get("error"):
            L += [f"Error: `{_one_line(r['error'])}` (traceback in `claims/{r['id']}.json`)", ""]
        for p in r.get("plots", []):
            L += [f"![{r['id']}: {p}](plots/{p})", ""]
        if r.get("plot_error"):
            L += [f"Plot error: `{_one_line(r['plot_error'])}`", ""]
    if grid is not None:
        L += ["## Comparison grid: normalizer x batch size x learning rate", "",
              _grid_description(grid), ""]
        header, rows = _grid_table_rows(grid)
        L += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        L += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        L.append("")
        for p in grid_plots:
            L += [f"![{p}](plots/{p})", ""]
        for e in grid_errors:
            L += [f"Plot error: `{e}`", ""]
    L += ["## How it was run", ""]
    L += [f"- {k}: {v}" for k, v in _run_facts(meta, records, grid)]
    L += ["", "## How to reproduce", "", "```", meta.get("command", "normlab study"), "```", "",
          "Every run is stored under `runs/` and every claim's result under `claims/`: the "
          "same command again reuses them and only rewrites this report; "
          f"`normlab report {meta.get('out_dir', 'DIR')}` rebuilds the report from them.", ""]
    return "\n".join(L)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;text-align:left}
th{background:#f3f3f3}
.v{font-weight:600;white-space:nowrap;padding:.1em .45em;border-radius:4px}
.reproduced{background:#d7f5d7;color:#135d13}.not-reproduced{background:#fbd9d9;color:#8a1212}
.inconclusive{background:#fdf0c8;color:#6b5200}.not-available{background:#e8e8e8;color:#555}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:.6em;overflow-x:auto;font-size:.82em}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
section.claim{border-left:4px solid #ddd;padding-left:1em;margin:1.5em 0}
.muted{color:#666;font-size:.9em}
"""


def _badge(verdict: str) -> str:
    cls = verdict.replace(" ", "-")
    return f'<span class="v {cls}">{_VERDICT_MARK.get(verdict, "")} {html.escape(verdict)}</span>'


def _inline_md(text: str) -> str:
    """Escape ``text`` for HTML and turn its **bold** spans into <b>."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _html(meta, records, grid, grid_plots, grid_errors, notes) -> str:
    e = html.escape
    H = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
         "<title>normlab study</title>", f"<style>{_CSS}</style></head><body>",
         "<h1>normlab study: the papers' claims about normalization, re-run at small "
         "scale</h1>",
         f"<p>Budget <b>{e(str(meta.get('budget', '?')))}</b>, data "
         f"<b>{e(str(meta.get('data', '?')))}</b>, {e(str(meta.get('finished_at', '')))}. "
         "Every number below was measured by this run; each criterion was written before it "
         "ran. How it was run and how to reproduce it are at the end.</p>",
         "<h2 id=\"claims\">Claims</h2>", "<table><tr><th>#</th><th>claim</th><th>verdict</th>"
         "<th>why</th></tr>"]
    for r in records:
        H.append(f"<tr><td>{r['number']}</td><td><a href=\"#claim-{r['number']}\">"
                 f"{e(_one_line(r['title']))}</a></td><td>{_badge(r['verdict'])}</td>"
                 f"<td>{e(_one_line(r.get('reason', '')))}</td></tr>")
    H += ["</table>", "<h2>What a practitioner should take from it</h2>", "<ul>"]
    H += [f"<li>{_inline_md(n)}</li>" for n in notes]
    H += ["</ul>", "<h2>The claims</h2>"]
    for r in records:
        H += [f"<section class=\"claim\" id=\"claim-{r['number']}\">",
              f"<h3>{r['number']}. {e(_one_line(r['title']))} {_badge(r['verdict'])}</h3>",
              f"<p><b>Statement.</b> {e(_one_line(r.get('statement')))}</p>",
              f"<p><b>Source.</b> {e(_one_line(r.get('source')))}</p>",
              f"<p><b>Setup.</b> {e(_one_line(r.get('setup')))}</p>",
              f"<p><b>Criterion</b> (written before the run). "
              f"{e(_one_line(r.get('criterion')))}</p>"]
        if r.get("measured") is not None:
            H += [f"<p><b>Measured</b> <span class=\"muted\">(budget {e(str(r.get('budget')))}, "
                  f"data {e(str(r.get('data')))}, {r.get('seconds') or 0:.0f} s)</span></p>",
                  f"<pre>{e(compact(r['measured']))}</pre>"]
        H.append(f"<p><b>Verdict: {e(r['verdict'])}.</b> {e(_one_line(r.get('reason')))}</p>")
        if r.get("takeaway"):
            H.append(f"<p><i>Takeaway:</i> {e(_one_line(r['takeaway']))}</p>")
        if r.get("error"):
            H.append(f"<p>Error: <code>{e(_one_line(r['error']))}</code> (traceback in "
                     f"<code>claims/{e(r['id'])}.json</code>)</p>")
        for p in r.get("plots", []):
            H.append(f"<img src=\"plots/{e(p)}\" alt=\"{e(r['id'])}: {e(p)}\">")
        if r.get("plot_error"):
            H.append(f"<p>Plot error: <code>{e(_one_line(r['plot_error']))}</code></p>")
        H.append("</section>")
    if grid is not None:
        H += ["<h2 id=\"grid\">Comparison grid: normalizer &times; batch size &times; learning "
              "rate</h2>", f"<p>{_inline_md(_grid_description(grid))}</p>"]
        header, rows = _grid_table_rows(grid)
        H.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        H += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        H.append("</table>")
        H += [f"<img src=\"plots/{e(p)}\" alt=\"{e(p)}\">" for p in grid_plots]
        H += [f"<p>Plot error: <code>{e(x)}</code></p>" for x in grid_errors]
    H += ["<h2>How it was run</h2>", "<ul>"]
    H += [f"<li>{e(k)}: {e(v)}</li>" for k, v in _run_facts(meta, records, grid)]
    H += ["</ul>", "<h2>How to reproduce</h2>",
          f"<pre>{e(meta.get('command', 'normlab study'))}</pre>",
          "<p>Every run is stored under <code>runs/</code> and every claim's result under "
          "<code>claims/</code>: the same command again reuses them and only rewrites this "
          "report; <code>normlab report DIR</code> rebuilds the report from them.</p>",
          "</body></html>", ""]
    return "\n".join(H)
