"""The study's report, built only from the JSON files of a study folder.

:func:`write_report` reads ``out_dir/claims/*.json`` (one result per claim),
``out_dir/grid.json`` (the comparison grid) and ``out_dir/study.json`` (how the study
was run), and writes:

- ``out_dir/claims.json``: one object per claim (id, number, title, statement, effects,
  verdict, reason, takeaway, measured, plots ...);
- ``out_dir/plots/overview_forest.png``: every claim's effects with their 95% intervals
  against their thresholds (a forest plot), and ``out_dir/plots/grid_*.png``: the grid's
  plots. The claims' own plots are written by their ``plot`` functions while the study
  runs, and redrawn here when missing or damaged (not a complete PNG);
- ``out_dir/README.md``: the report, written once, in Markdown. It opens with the run
  facts, the verdict rule, the forest plot and the claims table, then each claim (verdict,
  intervals, plots, takeaway, reason, statement, setup, the raw measurement folded in
  ``<details>``), the grid, and how to reproduce it;
- ``out_dir/index.html``: the same report rendered from README.md by markdown-it-py into
  one self-contained page (inline CSS, no network resources, PNGs by relative path).

Records written before the statistical protocol (no ``effects``) are shown with their
verdict and reason. So ``normlab report DIR`` rebuilds the same report from the same
results.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import textwrap
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from normlab.claims.base import atomic_write_json, read_json

__all__ = ["write_report", "load_results", "grid_summary", "plot_grid", "make_claim_plots",
           "plot_forest", "forest_rows", "png_is_intact", "render_html", "practitioner_notes",
           "compact"]

#: What claims.json keeps of each claim record.
CLAIM_FIELDS = ("id", "number", "title", "statement", "source", "setup", "criterion",
                "requires", "budget", "budget_detail", "data", "decisive", "effects",
                "setup_change", "criterion_change", "scale_note", "width_note", "measured",
                "verdict",
                "reason", "takeaway", "error", "traceback", "plots", "plot_error", "seconds",
                "cpu_seconds", "runs_done", "runs_reused", "warnings", "missing", "scale")

#: Verdicts decided by a measurement, then those that say why there is none.
MEASURED_VERDICTS = ("reproduced", "not reproduced", "inconclusive")
UNMEASURED_VERDICTS = ("not testable at this scale", "not available", "not run at this scale")

_VERDICT_MARK = {"reproduced": "✔", "not reproduced": "✘", "inconclusive": "?",
                 "not testable at this scale": "◌", "not available": "–",
                 "not run at this scale": "·"}
# Colour-blind-safe enough (green/red also differ in lightness), matched by the CSS badges.
_VERDICT_COLOR = {"reproduced": "#2e7d32", "not reproduced": "#c62828",
                  "inconclusive": "#e08a00", "not testable at this scale": "#5c6f9c",
                  "not available": "#9e9e9e", "not run at this scale": "#bdbdbd"}

VERDICT_RULE = ("**How verdicts are decided.** Each effect is estimated over the seeds with a "
                "95% confidence interval. *Reproduced* only if the interval lies entirely on "
                "the claim's side of its threshold; *not reproduced* only if it lies entirely "
                "on the other side, or inside the equivalence margin; *inconclusive* "
                "otherwise; *not testable at this scale* where a premise of the claim (an "
                "effect marked premise) fails here. Thresholds and margins were declared "
                "before the runs.")

FOREST_PLOT = "overview_forest.png"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- reading


def load_results(out_dir: str | os.PathLike) -> tuple[dict, list[dict], dict | None]:
    """(study.json or {}, the claim records sorted by number, grid.json or None).
    Corrupt files are reported (a warning naming them) and left out. A folder without
    ``claims/`` (a published snapshot such as docs/study keeps only claims.json) is read
    from its claims.json."""
    out = Path(out_dir)
    meta = read_json(out / "study.json") or {}
    if (out / "claims").is_dir():
        found = [read_json(path) for path in sorted((out / "claims").glob("*.json"))]
    else:
        found = read_json(out / "claims.json")
        found = found if isinstance(found, list) else []
    records = [rec for rec in found
               if isinstance(rec, dict) and {"id", "number", "verdict"} <= set(rec)]
    records.sort(key=lambda r: (r["number"], r["id"]))
    grid = read_json(out / "grid.json")
    if not (isinstance(grid, dict) and "config" in grid and "runs" in grid):
        grid = None
    return meta, records, grid


# --------------------------------------------------------------------------- claim plots


def png_is_intact(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete PNG: the signature, then chunks whose lengths fit
    the file and whose CRCs match, ending with IEND. A file cut short by an interrupted
    write, or overwritten with something else, fails; a missing file fails."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    if not data.startswith(_PNG_SIGNATURE):
        return False
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        end = pos + 12 + length
        if end > len(data):
            return False
        kind, body = data[pos + 4:pos + 8], data[pos + 8:end - 4]
        if zlib.crc32(kind + body) != struct.unpack(">I", data[end - 4:end])[0]:
            return False
        if kind == b"IEND":
            return True
        pos = end
    return False


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
    """Redraw a claim's plots when asked to or when one of its files is missing or not a
    complete PNG (and the claim's code is at hand), writing the new list back into
    claims/<id>.json. Without the code a damaged file is dropped from the report's list."""
    plots_dir = out / "plots"
    need = [r for r in records if r.get("measured") is not None and not r.get("error")
            and (replot or any(not png_is_intact(plots_dir / p) for p in r.get("plots", [])))]
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
        if claim is None or getattr(claim, "plot", None) is None:
            bad = [p for p in rec.get("plots", []) if not png_is_intact(plots_dir / p)]
            if bad and log:
                log(f"report: {rec['id']}: plot(s) {bad} missing or damaged and the claim's "
                    "code is not at hand to redraw them; left out")
            rec["plots"] = [p for p in rec.get("plots", []) if p not in bad]
            continue
        rec["plots"], rec["plot_error"] = make_claim_plots(claim, rec["measured"], plots_dir)
        if (out / "claims").is_dir():  # else the records came from claims.json, rewritten later
            atomic_write_json(out / "claims" / f"{rec['id']}.json", rec)


# --------------------------------------------------------------------------- overview figure


def _title(record: dict) -> str:
    return str(record.get("title") or record.get("id", "?"))


def _short(text, width: int) -> str:
    text = _one_line(text)
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def _effects(record: dict) -> list[dict]:
    effects = record.get("effects")
    return [e for e in effects if isinstance(e, dict)] if isinstance(effects, list) else []


def forest_rows(records: Sequence[dict]) -> list[dict]:
    """One row per effect of role "claim" that has an estimate, claims in number order and
    effects in declaration order: ``{"label": "N. short title: effect name", "unit",
    "estimate", "low", "high", "test", "threshold", "margin", "fail_below", "fail_above",
    "verdict"}``."""
    rows = []
    for rec in sorted(records, key=lambda r: (r["number"], r["id"])):
        for e in _effects(rec):
            if e.get("role", "claim") != "claim" or e.get("estimate") is None:
                continue
            rows.append({"label": f"{rec['number']}. {_short(_title(rec), 34)}: "
                                  f"{_one_line(e.get('name') or e.get('key'))}",
                         "unit": _one_line(e.get("unit")) or "(no unit)",
                         **{k: e.get(k) for k in ("estimate", "low", "high", "test",
                                                  "threshold", "margin", "fail_below",
                                                  "fail_above", "verdict")}})
    return rows


def _fail_bound(e: dict) -> float | None:
    """Where a greater/less claim would call the effect absent, when that differs from
    its threshold (between the two the verdict can only be inconclusive)."""
    fail = e.get("fail_below") if e.get("test") == "greater" else (
        e.get("fail_above") if e.get("test") == "less" else None)
    return None if fail is None or fail == e.get("threshold") else fail


def _test_text(e: dict) -> str:
    """What the claim needs of the effect, e.g. "> 0", "< -1 (absent if > 0)", "within ±2"."""
    test = e.get("test")
    if test == "equivalent":
        return f"within ±{_num(e.get('margin'))}"
    sign = {"greater": ">", "less": "<"}.get(test)
    if not sign:
        return str(test or "?")
    fail = _fail_bound(e)
    absent = f" (absent if {'<' if sign == '>' else '>'} {_num(fail)})" if fail is not None else ""
    return f"{sign} {_num(e.get('threshold'))}{absent}"


def _rule(e: dict) -> str:
    """The effect's rule with its unit: the record's own words where it has them."""
    return _one_line(e.get("rule")) or f"{_test_text(e)} {_one_line(e.get('unit'))}".strip()


def plot_forest(records: Sequence[dict], plots_dir: str | os.PathLike) -> str | None:
    """Draw the overview forest plot into ``plots_dir`` (one panel per unit, one row per
    effect of :func:`forest_rows`: the estimate as a dot, the 95% interval as a line, the
    threshold as a black tick or the equivalence margin as a band, coloured by the effect's
    verdict); return its file name, or None when no effect has an estimate."""
    rows = forest_rows(records)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units: dict[str, list[dict]] = {}
    for row in rows:
        units.setdefault(row["unit"], []).append(row)
    heights = [len(u) + 1.6 for u in units.values()]
    fig_h = 0.42 * sum(heights) + 1.1
    fig, axes = plt.subplots(len(units), 1, squeeze=False, figsize=(11, fig_h),
                             gridspec_kw={"height_ratios": heights})
    try:
        for ax, (unit, unit_rows) in zip(axes[:, 0], units.items(), strict=True):
            _forest_panel(ax, unit, unit_rows)
        _forest_legend(fig, {r["verdict"] for r in rows},
                         any(r["test"] == "equivalent" for r in rows),
                         any(_fail_bound(r) is not None for r in rows))
        fig.suptitle("Every claim's effect: estimate and 95% interval against its threshold",
                     fontsize=11)
        fig.tight_layout(rect=(0, 0.45 / fig_h, 1, 1 - 0.1 / fig_h))  # legend below
        Path(plots_dir).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(plots_dir) / FOREST_PLOT, dpi=100)
    finally:
        plt.close(fig)
    return FOREST_PLOT


def _forest_panel(ax, unit: str, rows: list[dict]) -> None:
    import matplotlib.transforms as mtransforms

    right = mtransforms.blended_transform_factory(ax.transAxes, ax.transData)
    for y, row in enumerate(rows):
        color = _VERDICT_COLOR.get(row["verdict"], "#444444")
        if row["test"] == "equivalent" and row["margin"] is not None:
            ax.fill_betweenx([y - 0.38, y + 0.38], -row["margin"], row["margin"],
                             color="#5c6f9c", alpha=0.16, lw=0)
        elif row["threshold"] is not None:
            ax.plot(row["threshold"], y, "|", color="black", ms=17, mew=2, zorder=4)
            if _fail_bound(row) is not None:  # where the claim would call the effect absent
                ax.plot(_fail_bound(row), y, "|", color="#888888", ms=12, mew=2, zorder=4)
        if row["low"] is not None and row["high"] is not None:
            ax.hlines(y, row["low"], row["high"], color=color, lw=2.6, zorder=3)
            ax.plot(row["estimate"], y, "o", color=color, ms=7, zorder=5)
        else:  # no interval (e.g. one seed): the estimate alone, hollow
            ax.plot(row["estimate"], y, "o", mfc="white", mec=color, mew=1.5, ms=7, zorder=5)
        ax.text(1.01, y, f"needs {_test_text(row)}", transform=right, va="center",
                fontsize=8, color="#444444")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(["\n".join(textwrap.wrap(r["label"], 58, max_lines=2, placeholder=" …"))
                        for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.axvline(0, color="#999999", lw=0.8, ls=":", zorder=1)
    ax.set_xlabel(unit, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.08)


def _forest_legend(fig, verdicts: set, has_margin: bool, has_fail: bool) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], marker="o", color=_VERDICT_COLOR[v], lw=2.6, label=v)
               for v in _VERDICT_MARK if v in verdicts]
    handles.append(Line2D([], [], marker="|", color="black", ls="", ms=12, mew=2,
                          label="threshold"))
    if has_fail:
        handles.append(Line2D([], [], marker="|", color="#888888", ls="", ms=9, mew=2,
                              label="absent beyond"))
    if has_margin:
        handles.append(Patch(color="#5c6f9c", alpha=0.16, label="equivalence margin"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)


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
        notes.append(f"Of {len(records)} claim{'s' if len(records) > 1 else ''}, "
                     f"**{counts['reproduced']} reproduced**, "
                     f"**{counts['not reproduced']} not reproduced**, "
                     f"{counts['inconclusive']} inconclusive, "
                     f"{counts['not testable at this scale']} not testable at this scale and "
                     f"{counts['not available']} not available"
                     + (f"; {counts['not run at this scale']} not run at this scale."
                        if counts["not run at this scale"] else "."))
    if grid is not None:
        notes += _grid_notes(grid)
    for verdict in ("reproduced", "not reproduced"):
        for r in records:
            if r["verdict"] != verdict:
                continue
            title = f"claim {r['number']} ({_md_inline(_title(r))})"
            if verdict == "reproduced":
                lesson = _md_inline(r.get("takeaway") or r.get("reason", ""))
                notes.append(f"Reproduced, {title}: {lesson}")
            else:
                notes.append(f"Not reproduced here, {title}: {_md_inline(r.get('reason', ''))}")
    for verdict, words in (("inconclusive", "Inconclusive here (the interval straddles the "
                                            "threshold, see each claim)"),
                           ("not testable at this scale", "Not testable at this scale (a "
                                                          "premise failed here)"),
                           ("not available", "Not available (layers or data missing)"),
                           ("not run at this scale", "Not run at this scale (no setup at "
                                                     "the study's scale)")):
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


# --------------------------------------------------------------------------- Markdown


# "<" that could open raw HTML (a tag, a comment, a declaration): escaped, so that text from
# the records shows as written and never as markup in the rendered page.
_HTML_START = re.compile(r"<(?=[A-Za-z/!?])")


def _md_text(text) -> str:
    """Markdown text from a record (a takeaway, a setup change): kept as Markdown, with
    raw HTML escaped."""
    return _HTML_START.sub(r"\\<", str(text or "").strip())


def _md_inline(text) -> str:
    return _md_text(_one_line(text))


def _md_cell(text) -> str:
    return _md_inline(text).replace("|", "\\|")


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _signed(x) -> str:
    return "n/a" if x is None else f"{x:+.3g}"


def _badge(verdict: str) -> str:
    """The verdict as an inline HTML span (styled in the HTML page; plain text elsewhere)."""
    cls = re.sub(r"[^a-z]+", "-", verdict.lower()).strip("-")
    return f'<span class="v {cls}">{_VERDICT_MARK.get(verdict, "")} {verdict}</span>'


def _interval(e: dict) -> str:
    if e.get("low") is None or e.get("high") is None:
        return "n/a"
    return f"[{_signed(e['low'])}, {_signed(e['high'])}]"


def _noise_change(e: dict) -> str:
    """previous noise -> half-width (and their ratio), where the old figure is known."""
    prev, hw = e.get("previous_noise"), e.get("half_width")
    if prev is None:
        return ""
    ratio = f" ({hw / prev:.2f}x)" if hw is not None and prev > 0 else ""
    return f"{_num(prev)} → {_num(hw)}{ratio}"


def _not_halved(e: dict) -> bool:
    """Whether an effect's half-width exceeds half of its previous noise figure."""
    prev, hw = e.get("previous_noise"), e.get("half_width")
    return prev is not None and prev > 0 and (hw is None or hw > prev / 2)


def _effect_line(e: dict) -> str:
    """One effect's interval as a Markdown sentence."""
    unit = _md_inline(e.get("unit"))
    role = "premise" if e.get("role") == "premise" else "claim"
    conf = e.get("confidence") or 0.95
    text = (f"**{_md_inline(e.get('name') or e.get('key'))}** ({role} effect, {unit}): "
            f"estimate **{_signed(e.get('estimate'))}**, {100 * conf:.0f}% interval "
            f"{_interval(e)}, half-width {_num(e.get('half_width'))}")
    if e.get("previous_noise") is not None:
        text += f" (previous noise {_noise_change(e)})"
    text += f"; n = {e.get('n', '?')}"
    if e.get("method"):
        text += f", {_md_inline(e['method'])}"
    return text + f". Needs {_md_inline(_rule(e))}: {_badge(e.get('verdict', '?'))}"


def _run_top(meta: dict, records: Sequence[dict]) -> list[tuple[str, str]]:
    """The run facts shown first: budget, seeds, code hash, version, machine, time, command."""
    m = meta.get("machine") or {}
    bd = meta.get("budget_detail") or {}
    budgets = sorted({r.get("budget") for r in records if r.get("budget")})
    history = meta.get("history") or []
    wall = f"{meta.get('wall_seconds', '?')} s (the last invocation)"
    if len(history) > 1:
        total = sum(h.get("wall_seconds") or 0 for h in history)
        wall += f"; {total:.0f} s over {len(history)} invocations"
    return [
        ("scale", _scale_text(meta, records)),
        ("budget", f"{meta.get('budget', '?')} (step scale {bd.get('step_scale', '?')})"
         + (f"; claims measured at: {', '.join(budgets)}"
            if budgets and budgets != [meta.get("budget")] else "")),
        ("seeds", str(bd.get("seeds", meta.get("seeds", "?")))),
        ("code hash", f"`{meta['code_hash']}`" if meta.get("code_hash") else
         "not recorded (a study from before content-keyed runs)"),
        ("normlab version", str(meta.get("normlab_version") or m.get("normlab", "?"))),
        ("machine", f"{m.get('cpu_count', '?')} CPUs, {m.get('platform', '?')}, "
         + ", ".join(f"{name} {m[key]}" for name, key in (
             ("Python", "python"), ("torch", "torch"), ("numpy", "numpy")) if m.get(key))
         + (f"; runs on {meta['device']}" if meta.get("device") else "")),
        ("wall time", wall),
        ("command", f"`{_one_line(meta.get('command', 'normlab study'))}`"),
    ]


def _scale_text(meta: dict, records: Sequence[dict]) -> str:
    """The study's scale, what it ran at it, and any claim recorded at another scale."""
    scale = meta.get("scale", "small")
    if scale == "small":
        text = "small (every claim's setup, on the embedded datasets)"
    else:
        text = (f"{scale} (the papers' setups, on the data in `{meta.get('data_dir')}`, for "
                "the claims that have one")
        not_run = meta.get("not_run_at_scale") or []
        text += f"; {len(not_run)} claim(s) not run at this scale)" if not_run else ")"
    other = sorted({str(r.get("scale", "small")) for r in records
                    if r.get("scale", "small") != scale})
    if other:
        text += f"; claims recorded at another scale here: {', '.join(other)}"
    return text


def _smoke(r: dict) -> bool:
    """Whether the claim ran at a budget that decides nothing (the quick smoke test). A
    failed or unavailable measurement is not decisive either, but not for that reason."""
    detail = r.get("budget_detail") or {}
    if "decisive" in detail:
        return detail["decisive"] is False
    return r.get("decisive") is False and bool(_effects(r)) and not r.get("error")


def _md_top(meta: dict, records: Sequence[dict]) -> str:
    at = "at the papers' scale" if meta.get("scale") == "paper" else "at small scale"
    L = [f"# normlab study: the papers' claims about normalization, re-run {at}", ""]
    L += [f"- **{k}:** {v}" for k, v in _run_top(meta, records)]
    old = [r for r in records if "effects" not in r]
    if len(old) < len(records):
        L += ["", VERDICT_RULE]
    if old:  # the rule above would be untrue of them
        who = ("Every claim here predates" if len(old) == len(records) else
               "1 claim here predates" if len(old) == 1 else f"{len(old)} claims here predate")
        L += ["", f"{who} the statistical protocol (no effects recorded): each verdict "
              "followed its claim's own criterion, shown with the claim."]
    smoke = [r for r in records if _smoke(r)]
    if smoke:
        which = ("Every claim" if len(smoke) == len(records) else
                 ("Claims " if len(smoke) > 1 else "Claim ")
                 + ", ".join(str(r["number"]) for r in smoke))
        budgets = ", ".join(sorted({str(r.get("budget")) for r in smoke}))
        L += ["", f"> **Not decisive.** {which} ran at the {budgets} budget, a smoke test: "
              "its verdicts are capped at *inconclusive*, whatever the intervals say. Run the "
              "default budget (`normlab study`) for verdicts."]
    return "\n".join(L)


def _md_overview(forest: str | None, forest_error: str | None) -> str:
    L = ["## Overview: every effect against its threshold", ""]
    if forest:
        L += [f"![forest plot: each claim's effect, its 95% interval and its threshold]"
              f"(plots/{forest})", "",
              "Dot: the estimate; line: its 95% interval; black tick: the threshold (the "
              "claim needs the whole line on its side, shown at the right); shaded band: an "
              "equivalence margin. Colour: the effect's verdict. One panel per unit."]
    else:
        L.append("No claim here recorded an effect with an estimate (results from before "
                 "the statistical protocol, or none measured): see the table.")
    if forest_error:
        L += ["", f"Plot error: `{_one_line(forest_error)}`"]
    return "\n".join(L)


_TABLE_HEAD = ("| # | claim | verdict | effect | estimate | 95% interval | claim needs | "
               "effect verdict | half-width |")
#: The last column, where some effect has the old protocol's noise figure (the small
#: scale's claims; a study at another scale has none).
_NOISE_HEAD = " previous noise → half-width |"


def _claim_link(r: dict) -> str:
    return f"[{_md_cell(_title(r))}](#claim-{r['number']})"


def _md_table(records: Sequence[dict]) -> str:
    """The claims table: one row per effect of the measured claims; then the claims without
    effects (verdict and reason, as recorded), then those not testable or not available."""
    L = ["## Claims"]
    noise = any(e.get("previous_noise") is not None for r in records for e in _effects(r))
    head = _TABLE_HEAD + (_NOISE_HEAD if noise else "")
    head += "\n" + "|---" * head.count(" |") + "|"
    for r in records:
        if r["verdict"] in UNMEASURED_VERDICTS or not _effects(r):
            continue
        for i, e in enumerate(_effects(r)):
            unit = _md_cell(e.get("unit"))
            lead = [str(r["number"]), _claim_link(r), _badge(r["verdict"])] if i == 0 \
                else ["", "", ""]
            name = _md_cell(e.get("name") or e.get("key"))
            cells = lead + [name + (" (premise)" if e.get("role") == "premise" else ""),
                            f"{_signed(e.get('estimate'))} {unit}", _interval(e),
                            _md_cell(_rule(e)), _badge(e.get("verdict", "?")),
                            _num(e.get("half_width"))] + ([_noise_change(e)] if noise else [])
            L += ["", head] if len(L) == 1 else []
            L.append("| " + " | ".join(cells) + " |")
    for title, keep in (
            ("Claims without effect estimates (recorded before the statistical protocol, or "
             "the measurement failed): verdict and reason as recorded",
             lambda r: r["verdict"] not in UNMEASURED_VERDICTS and not _effects(r)),
            ("Not testable at this scale, or not available",
             lambda r: r["verdict"] in UNMEASURED_VERDICTS[:2]),
            ("Not run at this scale", lambda r: r["verdict"] == "not run at this scale")):
        these = [r for r in records if keep(r)]
        if these:
            L += ["", f"### {title}", "", "| # | claim | verdict | why |", "|---|---|---|---|"]
            L += [f"| {r['number']} | {_claim_link(r)} | {_badge(r['verdict'])} | "
                  f"{_md_cell(r.get('reason', ''))} |" for r in these]
    return "\n".join(L)


def _md_claim(r: dict) -> str:
    """One claim: title and verdict, intervals, plots, takeaway and reason, the claim's
    text and changes, then the raw measurement folded."""
    B = [f"### <a id=\"claim-{r['number']}\"></a>{r['number']}. "
         f"{_md_inline(_title(r))} {_badge(r['verdict'])}"]
    if _effects(r):
        B.append("\n".join(f"- {_effect_line(e)}" for e in _effects(r)))
    if _smoke(r):
        B.append(f"*Not decisive:* the {r.get('budget')} budget is a smoke test; its verdict "
                 "is capped at inconclusive.")
    B += [f"![{r['number']}: {p}](plots/{p})" for p in r.get("plots") or []]
    if r.get("plot_error"):
        B.append(f"Plot error: `{_one_line(r['plot_error'])}`")
    if r.get("takeaway"):
        B.append(f"**Takeaway.** {_md_text(r['takeaway'])}")
    B.append(f"**Why {r['verdict']}.** {_md_text(r.get('reason')) or '(no reason recorded)'}")
    if r.get("error"):
        B.append(f"Error: `{_one_line(r['error'])}` (traceback in `claims/{r['id']}.json`)")
    B += [f"**{label}.** {_md_inline(r.get(key))}" for label, key in (
        ("Statement", "statement"), ("Source", "source"), ("Setup", "setup"),
        ("Criterion", "criterion"))]
    if r.get("setup_change"):
        B.append(f"**What changed in the setup, and why.** {_md_text(r['setup_change'])}")
    change = r.get("criterion_change")
    if isinstance(change, (list, tuple)) and len(change) == 2:  # (old, new) as JSON
        change = {"old": change[0], "new": change[1]}
    if isinstance(change, dict):
        B.append("**Criterion restated under the statistical protocol.** "
                 f"Old: {_md_inline(change.get('old'))} New: {_md_inline(change.get('new'))}")
    if r.get("scale_note"):
        B.append(f"**Scale.** {_md_text(r['scale_note'])}")
    wide = [e for e in r.get("effects") or [] if _not_halved(e)]
    if wide:
        names = ", ".join(_md_inline(e.get("name") or e.get("key")) for e in wide)
        why = _md_text(r.get("width_note")) or "(the claim gives no reason)"
        B.append(f"**Interval not halved.** The interval of {names} is wider than half the "
                 f"noise figure the old protocol used. Why: {why}")
    if r.get("measured") is not None:
        B.append(_md_raw(r))
    return "\n\n".join(B)


def _md_raw(r: dict) -> str:
    """The raw measurement, compact, folded in <details> (blank lines around the Markdown
    inside, so that both CommonMark and GitHub render it)."""
    runs = (f", {r['runs_done']} runs computed, {r.get('runs_reused', 0)} reused"
            if r.get("runs_done") is not None else "")
    return "\n".join([
        "<details><summary>raw measurement</summary>", "",
        f"Budget {r.get('budget')}, data {r.get('data')}, {r.get('seconds') or 0:.0f} s wall / "
        f"{r.get('cpu_seconds') or 0:.0f} s CPU{runs}.", "",
        "```json", compact(r["measured"]).replace("```", "` ` `"), "```", "", "</details>"])


def _md_grid(grid: dict, grid_plots: Sequence[str], grid_errors: Sequence[str]) -> str:
    L = ["## Comparison grid: normalizer x batch size x learning rate", "",
         _grid_description(grid), ""]
    header, rows = _grid_table_rows(grid)
    L += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    L += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    L += [f"\n![{p}](plots/{p})" for p in grid_plots]
    L += [f"\nPlot error: `{e}`" for e in grid_errors]
    return "\n".join(L)


def _md_end(meta: dict, records: Sequence[dict], grid: dict | None) -> str:
    L = ["## How it was run", ""]
    L += [f"- {k}: {v}" for k, v in _run_facts(meta, records, grid)]
    L += ["", "## How to reproduce", "", "```", meta.get("command", "normlab study"), "```", "",
          "Every run is stored under `runs/` and every claim's result under `claims/`: the "
          "same command again reuses them and only rewrites this report; "
          f"`normlab report {meta.get('out_dir', 'DIR')}` rebuilds the report from them."]
    return "\n".join(L)


def _run_facts(meta: dict, records: Sequence[dict], grid: dict | None) -> list[tuple[str, str]]:
    """The details of the run kept for the end (the main facts are at the top)."""
    claim_s = sum(r.get("seconds") or 0 for r in records)
    claim_cpu = sum(r.get("cpu_seconds") or 0 for r in records)
    grid_s = sum((r or {}).get("seconds") or 0 for r in (grid or {}).get("runs", []))
    runs = "; ".join(f"{h.get('started_at')}: {h.get('wall_seconds')} s, {h.get('runs_done')} "
                     f"runs computed, {h.get('runs_reused')} reused"
                     for h in meta.get("history") or [])
    return [
        ("data", str(meta.get("data", "?"))),
        ("date", f"{meta.get('started_at', '?')} to {meta.get('finished_at', '?')}"),
        ("invocations", runs or f"{meta.get('runs_done', '?')} runs computed, "
                                f"{meta.get('runs_reused', '?')} reused"),
        ("compute in the stored results", f"claims {claim_s:.0f} s wall / {claim_cpu:.0f} s "
         f"CPU in their workers, grid runs {grid_s:.0f} s wall (timings on a shared machine "
         "are noisy)"),
        ("workers", f"{meta.get('workers', '?')} ({meta.get('start_method', '?')}"
         + (f", executor {meta['executor']}" if meta.get("executor") else "")
         + "), one torch thread each"),
    ]


def _markdown(meta, records, grid, grid_plots, grid_errors, forest, forest_error) -> str:
    """The whole report in Markdown: the one copy of its content (the HTML is rendered from
    it)."""
    notes = practitioner_notes(records, grid)
    parts = [_md_top(meta, records), _md_overview(forest, forest_error), _md_table(records),
             "## What a practitioner should take from it\n\n"
             + "\n".join(f"- {n}" for n in notes) if notes else "",
             "## The claims", *(_md_claim(r) for r in records),
             _md_grid(grid, grid_plots, grid_errors) if grid is not None else "",
             _md_end(meta, records, grid)]
    return "\n\n".join(p for p in parts if p) + "\n"


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{border-left:4px solid #ccc;padding-left:.5em;margin-top:2.2em}
table{border-collapse:collapse;margin:1em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.3em .55em;vertical-align:top;text-align:left}
th{background:#f3f3f3}
.v{font-weight:600;white-space:nowrap;padding:.1em .45em;border-radius:4px;font-size:.9em}
.reproduced{background:#d7f5d7;color:#135d13}.not-reproduced{background:#fbd9d9;color:#8a1212}
.inconclusive{background:#fdf0c8;color:#6b5200}
.not-testable-at-this-scale{background:#dfe5f3;color:#2f3f66}
.not-available{background:#e8e8e8;color:#555}
.not-run-at-this-scale{background:#f0f0f0;color:#666}
blockquote{border-left:4px solid #e0a000;background:#fff8e1;margin:1em 0;padding:.3em 1em}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:.6em;overflow-x:auto;font-size:.82em}
details{margin:1em 0}summary{cursor:pointer;color:#444}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
"""

# The page around the rendered Markdown; it holds no content of its own.
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>{{ css | safe }}</style></head>
<body>
{{ body | safe }}
</body></html>
"""


def render_html(markdown_text: str) -> str:
    """``markdown_text`` rendered by markdown-it-py (CommonMark with tables; raw HTML such as
    ``<details>`` and the verdict badges kept) into one self-contained page, titled by its
    first heading."""
    from jinja2 import Environment
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown_text)
    title = re.search(r"^# (.+)$", markdown_text, re.M)
    page = Environment(autoescape=True).from_string(_PAGE)
    # The title is escaped; the CSS and the rendered body are the page's own HTML.
    return page.render(title=title.group(1) if title else "normlab study", css=_CSS, body=body)


# --------------------------------------------------------------------------- writing


def _claims_json(records: Sequence[dict]) -> list[dict]:
    return [{k: r.get(k) for k in CLAIM_FIELDS} for r in records]


def write_report(out_dir: str | os.PathLike, claims: dict | None = None, replot: bool = False,
                 log: Callable[[str], None] | None = None) -> Path:
    """Build claims.json, the overview and grid plots, README.md and index.html (rendered
    from README.md) of the study in ``out_dir`` from its JSON files alone; return the path
    of index.html.

    ``claims`` ({id: Claim}) gives the code to redraw a claim's plots when one is missing
    or damaged (or every one, with ``replot``); without it the discovered claims are used.
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
    forest, forest_error = None, None
    try:
        forest = plot_forest(records, out / "plots")
    except Exception as err:  # a failed figure is shown in the report, not fatal
        forest_error = f"plot_forest: {type(err).__name__}: {err}"
    atomic_write_json(out / "claims.json", _claims_json(records))
    text = _markdown(meta, records, grid, grid_plots, grid_errors, forest, forest_error)
    (out / "README.md").write_text(text, encoding="utf-8")
    index = out / "index.html"
    index.write_text(render_html(text), encoding="utf-8")
    if log:
        log(f"report: {index} and {out / 'README.md'}")
    return index
