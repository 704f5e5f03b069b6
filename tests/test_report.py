"""The study's report: written once in Markdown from the JSON results alone (run facts, the
verdict rule, the forest plot, the table, then each claim with its raw measurement folded),
rendered to HTML from that Markdown, rebuilt identically by `normlab report DIR`, with
damaged plots redrawn; and the grid's numbers behind it."""

import json
import re
import shutil
import subprocess
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from normlab.claims.protocol import Effect, evaluate
from normlab.cli import main
from normlab.report import (
    compact,
    forest_rows,
    grid_summary,
    png_is_intact,
    practitioner_notes,
    write_report,
)

METHOD = "paired t interval over seeds (scipy.stats.ttest_1samp)"


def _effect(key, name, unit, test, estimate, low, high, verdict, *, role="claim",
            threshold=0.0, margin=None, values=(1.0, 2.0, 3.0, 4.0, 5.0), previous_noise=None):
    half = None if low is None else (high - low) / 2
    return {"key": key, "name": name, "unit": unit, "role": role, "test": test,
            "threshold": threshold, "margin": margin, "values": list(values),
            "n": len(values), "estimate": estimate, "low": low, "high": high,
            "half_width": half, "confidence": 0.95, "method": METHOD, "verdict": verdict,
            "previous_noise": previous_noise}


def _record(number, cid, title, verdict, effects=None, **extra):
    rec = {"id": cid, "number": number, "title": title, "statement": f"statement {number}",
           "source": f"Paper {number}, Table 1", "setup": f"setup {number}",
           "criterion": f"criterion {number}", "requires": [], "budget": "default",
           "budget_detail": {"name": "default", "seeds": 5, "step_scale": 1.0,
                             "decisive": True},
           "data": "mnist5k", "measured": {"curve": [i / 10 for i in range(40)], "n": number},
           "verdict": verdict, "reason": f"reason {number}", "error": None, "traceback": None,
           "plots": [], "plot_error": None, "seconds": 1.5, "cpu_seconds": 1.2,
           "runs_done": 4, "runs_reused": 1, "warnings": [], "takeaway": f"takeaway {number}",
           "decisive": True, "setup_change": "", "criterion_change": None, "scale_note": ""}
    if effects is not None:
        rec["effects"] = effects
    rec.update(extra)
    return rec


# File names sort differently from the numbers, so the report must sort by number.
RECORDS = [
    _record(1, "z_gn_small", "GN beats BN at batch 2", "reproduced", [
        _effect("bn_b32", "BN test accuracy at batch 32", "points", "greater", 91.0, 90.0, 92.0,
                "reproduced", role="premise", threshold=50.0),
        _effect("gap_b2", "GN minus BN test accuracy at batch 2", "points", "greater", 3.1, 1.2,
                5.0, "reproduced", previous_noise=4.0)],
        plots=["z_gn_small_plot.png"],
        setup_change="Five seeds instead of two, and *mnist5k*'s 1,000 test images.",
        criterion_change={"old": "gap > 2.4 points (the noise)", "new": "interval above 0"}),
    _record(2, "a_equiv", "SN matches the better of BN and GN", "not reproduced", [
        _effect("sn_gap", "SN minus the better of BN and GN", "points", "equivalent", -2.5,
                -3.5, -1.5, "not reproduced", threshold=None, margin=1.0)]),
    _record(3, "m_ratio", "BN needs fewer steps", "inconclusive", [
        _effect("speedup", "steps without BN over steps with BN", "x", "greater", 2.7, 1.9, 3.5,
                "inconclusive", threshold=3.0, previous_noise=1.6)],
        scale_note="A 3-layer CNN on small data saves fewer steps than Inception."),
    _record(4, "b_premise", "BN helps deep nets", "not testable at this scale", [
        _effect("bn_gain", "BN minus plain at batch 32", "points", "greater", -0.3, -1.1, 0.5,
                "not reproduced", role="premise"),
        _effect("depth_gain", "BN gain at depth 32 minus at depth 4", "points", "greater", 1.0,
                -0.5, 2.5, "not testable at this scale")],
        reason="the premise failed: BN does not help the shallow net here"),
    # the study marks a claim it could not measure as not decisive too (not a smoke test)
    _record(5, "c_na", "EvoNorm beats BN", "not available", [], measured=None,
            reason="the layer is missing", decisive=False),
    _record(6, "d_old", "Old-format claim", "reproduced", None,
            reason="old rule held (ratio 2.0x)"),
    _record(7, "e_quick", "Nothing grows <here>", "inconclusive", [
        _effect("ln_short", "LN shortfall at batch 1", "points", "less", 0.4, None, None,
                "inconclusive", threshold=2.0, values=(0.4,))],
        budget="quick", decisive=False, reason="the <b>ratio</b> | stayed at 0",
        budget_detail={"name": "quick", "seeds": 2, "step_scale": 0.25, "decisive": False}),
]
# claim 8's effects as the protocol writes them (with its "rule" text and a fail_below)
_VERDICT8, _EFFECTS8 = evaluate(
    [Effect("fixup_gap", "Fixup minus plain test accuracy", "points", "greater", threshold=2.0,
            fail_below=0.5)], {"fixup_gap": [1.0, 2.5, 3.0, 1.5, 2.0]})
RECORDS.append(_record(8, "f_protocol", "Fixup trains without normalization", _VERDICT8,
                       _EFFECTS8, criterion_change=["old rule", "new rule"]))
for _r in RECORDS:  # the old format had none of the protocol's keys
    if _r["id"] == "d_old":
        for _k in ("decisive", "setup_change", "criterion_change", "scale_note"):
            del _r[_k]
        del _r["budget_detail"]["decisive"]

META = {"budget": "default", "budget_detail": {"name": "default", "seeds": 5, "step_scale": 1.0},
        "data": "mnist5k", "code_hash": "0123456789abcdef" * 4, "normlab_version": "0.2.0",
        "machine": {"cpu_count": 2, "platform": "Linux", "python": "3.11", "torch": "2.13.0"},
        "device": "cpu", "executor": "local", "wall_seconds": 812.5,
        "command": "normlab study --out /tmp/s", "out_dir": "/tmp/s",
        "history": [{"started_at": "t0", "wall_seconds": 812.5, "runs_done": 9,
                     "runs_reused": 0}]}


def _plot_gn(measured, out_dir) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(measured["curve"])
    fig.savefig(Path(out_dir) / "z_gn_small_plot.png", dpi=50)
    plt.close(fig)
    return ["z_gn_small_plot.png"]


CLAIMS = {"z_gn_small": types.SimpleNamespace(id="z_gn_small", plot=_plot_gn)}


def _grid(runs):
    return {"config": {"norms": ["none", "bn", "gn"], "batch_sizes": [2, 128],
                       "lr_factors": [0.5, 1.0], "num_classes": 10, "epochs": 1,
                       "seeds": [0, 1], "ref_batch": 32, "base_lr": 0.05, "model": "cnn",
                       "data": "digits"},
            "runs": runs}


def _run(norm, b, f, seed, acc, diverged=False):
    return {"norm": norm, "batch_size": b, "lr": 0.05 * f * b / 32, "lr_factor": f,
            "seed": seed, "final_test_acc": acc, "diverged": diverged, "steps": 10,
            "epochs": 1, "seconds": 0.1, "evals": {"step": [5, 10], "test_acc": [acc / 2, acc]}}


def _write_study(out: Path, records=RECORDS, grid=True) -> Path:
    (out / "claims").mkdir(parents=True)
    for rec in records:
        (out / "claims" / f"{rec['id']}.json").write_text(json.dumps(rec))
    (out / "study.json").write_text(json.dumps(META))
    if grid:
        runs = [_run(n, b, 1.0, s, 0.5 + 0.1 * s) for n in ("none", "bn") for b in (2, 128)
                for s in (0, 1)]
        (out / "grid.json").write_text(json.dumps(_grid(runs)))
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = _write_study(tmp_path_factory.mktemp("report") / "study")
    write_report(out, claims=CLAIMS)
    return out


# --------------------------------------------------------------------------- structure


def test_claims_json_holds_the_new_records_in_number_order(study):
    claims = json.loads((study / "claims.json").read_text())
    assert [c["number"] for c in claims] == [1, 2, 3, 4, 5, 6, 7, 8]
    first = claims[0]
    assert first["effects"] == RECORDS[0]["effects"]
    assert first["decisive"] is True and first["criterion_change"]["new"] == "interval above 0"
    assert first["plots"] == ["z_gn_small_plot.png"]  # drawn by the claim's code: it was missing
    assert claims[5]["effects"] is None and claims[5]["reason"] == "old rule held (ratio 2.0x)"


def test_run_facts_and_verdict_rule_come_before_the_figure(study):
    md = (study / "README.md").read_text()
    top = md[:md.index("![")]
    for fact in ("**budget:** default", "**seeds:** 5", META["code_hash"],
                 "**normlab version:** 0.2.0", "2 CPUs", "runs on cpu", "812.5 s",
                 "`normlab study --out /tmp/s`", "How verdicts are decided",
                 "inside the equivalence margin", "not testable at this scale"):
        assert fact in top, fact
    # claim 7 ran at the quick budget, which decides nothing: the report says so
    assert "**Not decisive.** Claim 7 ran at the quick budget, a smoke test" in top
    assert "1 claims here predate" not in top and "1 claim here predates" in top  # claim 6


def test_markdown_opens_with_the_forest_plot_then_the_table_then_claims_in_order(study):
    md = (study / "README.md").read_text()
    first_image = re.search(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert first_image.group(1) == "plots/overview_forest.png"
    table = md.index("| # | claim | verdict | effect | estimate |")
    assert first_image.start() < table
    claims = [md.index(f'### <a id="claim-{n}"></a>{n}. ') for n in range(1, 9)]
    assert table < claims[0] and claims == sorted(claims)
    assert md.index("## Comparison grid") > claims[-1]


def _table(md: str, heading_start: int) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after ``heading_start``."""
    lines = md[heading_start:].split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_table_shows_every_effect_and_lists_untestable_claims_apart(study):
    md = (study / "README.md").read_text()
    main_rows = _table(md, md.index("## Claims"))
    # one row per effect of the measured claims with effects: 1 (2 effects), 2, 3, 7, 8
    assert [r[0] for r in main_rows] == ["1", "", "2", "3", "7", "8"]
    premise, gap = main_rows[0], main_rows[1]
    assert premise[3] == "BN test accuracy at batch 32 (premise)"
    assert gap[3:8] == ["GN minus BN test accuracy at batch 2", "+3.1 points", "[+1.2, +5]",
                        "> 0 points", '<span class="v reproduced">✔ reproduced</span>']
    assert gap[8] == "1.9" and gap[9] == "4 → 1.9 (0.47x)"   # (5.0 - 1.2) / 2, over 4.0
    equiv = main_rows[2]
    assert equiv[6] == "within ±1 points" and equiv[9] == ""  # no previous noise: left empty
    assert main_rows[3][6] == "> 3 x" and main_rows[3][9] == "1.6 → 0.8 (0.50x)"
    assert main_rows[4][5] == "n/a" and main_rows[4][8] == "n/a"  # one seed: no interval
    # a record from the protocol: its own rule text, and its interval as it computed it
    e8 = _EFFECTS8[0]
    assert main_rows[5][6] == "> 2 points (absent if < 0.5)" == e8["rule"]
    assert main_rows[5][5] == f"[{e8['low']:+.3g}, {e8['high']:+.3g}]"
    assert main_rows[5][4] == "+2 points" and e8["verdict"] == _VERDICT8 == "inconclusive"
    old = _table(md, md.index("### Claims without effect estimates"))
    assert [r[0] for r in old] == ["6"] and old[0][3] == "old rule held (ratio 2.0x)"
    apart = _table(md, md.index("### Not testable at this scale, or not available"))
    assert [r[0] for r in apart] == ["4", "5"]
    assert apart[0][3] == "the premise failed: BN does not help the shallow net here"
    assert "not-available" in apart[1][2]


def test_each_claim_shows_verdict_intervals_plot_text_then_raw_measurement(study):
    md = (study / "README.md").read_text()
    one = md[md.index('<a id="claim-1">'):md.index('<a id="claim-2">')]
    order = [one.index(s) for s in (
        '<span class="v reproduced">', "**GN minus BN test accuracy at batch 2** (claim effect",
        "![1: z_gn_small_plot.png](plots/z_gn_small_plot.png)", "**Takeaway.** takeaway 1",
        "**Why reproduced.** reason 1", "**Statement.** statement 1", "**Source.** Paper 1",
        "**Setup.** setup 1", "**What changed in the setup, and why.** Five seeds",
        "Old: gap > 2.4 points (the noise) New: interval above 0",
        "<details><summary>raw measurement</summary>")]
    assert order == sorted(order)
    assert "half-width 1.9 (previous noise 4 → 1.9 (0.47x)); n = 5, " + METHOD in one
    three = md[md.index('<a id="claim-3">'):md.index('<a id="claim-4">')]
    assert "**Scale.** A 3-layer CNN" in three
    seven = md[md.index('<a id="claim-7">'):md.index('<a id="claim-8">')]
    assert "*Not decisive:* the quick budget is a smoke test" in seven
    five = md[md.index('<a id="claim-5">'):md.index('<a id="claim-6">')]
    assert "Not decisive" not in five  # not measured, at a budget that does decide
    assert "Old: old rule New: new rule" in md  # a criterion change given as (old, new)
    # the raw measurement: folded, compact (40 values cut), with blank lines around the fence
    with_raw = [r for r in RECORDS if r["measured"] is not None]
    assert md.count("<details><summary>raw measurement</summary>\n\n") == len(with_raw)
    assert md.count("\n\n</details>") == len(with_raw)
    assert "… 32 more …" in one


# --------------------------------------------------------------------------- HTML


class _Page(HTMLParser):
    """Headings and table rows of a page, as plain text."""

    def __init__(self):
        super().__init__()
        self.headings, self.rows, self._text, self._cells, self._in = [], [], None, None, None

    def handle_starttag(self, tag, attrs):
        if re.fullmatch(r"h[1-6]|td|th", tag):
            self._in, self._text = tag, []
        elif tag == "tr":
            self._cells = []

    def handle_endtag(self, tag):
        if tag == self._in:
            text = " ".join("".join(self._text).split())
            (self.headings if tag.startswith("h") else self._cells).append(text)
            self._in = None
        elif tag == "tr":
            self.rows.append(self._cells)

    def handle_data(self, data):
        if self._in:
            self._text.append(data)


def _plain(markdown_inline: str) -> str:
    """What a Markdown cell or heading reads as: links, tags, emphasis and escapes removed."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", markdown_inline)
    text = re.sub(r"(?<!\\)<[^>]+>", "", text).replace("**", "")
    text = re.sub(r"\\(.)", r"\1", text)
    return " ".join(text.split())


def test_html_is_rendered_from_the_markdown(study):
    md = (study / "README.md").read_text()
    page = (study / "index.html").read_text()
    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
    assert body in page
    # no second copy of the content: around the rendered Markdown there is only the shell
    shell = page.replace(body, "")
    assert len(shell) < 2500 and "GN beats BN" not in shell
    assert not re.search(r"<(h[1-6]|table|p|img)\b", shell)
    parsed = _Page()
    parsed.feed(page)
    headings = [_plain(h) for h in re.findall(r"^#{1,6} (.+)$", md, re.M)]
    assert headings == parsed.headings
    md_rows = [[_plain(c) for c in re.split(r"(?<!\\)\|", line)[1:-1]]
               for line in md.split("\n") if line.startswith("| ")]
    # 4 tables (claims, without effects, not testable, grid): headers + 6 + 1 + 2 + 3 rows
    assert md_rows == parsed.rows and len(md_rows) == 4 + 6 + 1 + 2 + 3
    # raw HTML inside the Markdown survives: the badges and the folded measurements
    assert page.count("<details><summary>raw measurement</summary>") == 7
    assert page.count('<span class="v reproduced">') == md.count('<span class="v reproduced">')
    assert '<code class="language-json">' in page


def test_html_escapes_record_text_and_loads_nothing_from_the_network(study):
    page = (study / "index.html").read_text()
    assert "Nothing grows &lt;here&gt;" in page and "the &lt;b&gt;ratio&lt;/b&gt; | stayed" in page
    assert "<here>" not in page and "<b>ratio" not in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs[0] == "plots/overview_forest.png"
    assert all(s.startswith("plots/") and (study / s).is_file() for s in srcs)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "<style>" in page and "<link" not in page and "<script" not in page


# --------------------------------------------------------------------------- plots


def test_forest_plot_rows_and_file(study):
    rows = forest_rows(json.loads((study / "claims.json").read_text()))
    # role "claim" only (the premises are out), claims in number order, and an effect
    # without an estimate (none here) or a claim without effects (5, 6) has no row
    assert [r["label"] for r in rows] == [
        "1. GN beats BN at batch 2: GN minus BN test accuracy at batch 2",
        "2. SN matches the better of BN and GN: SN minus the better of BN and GN",
        "3. BN needs fewer steps: steps without BN over steps with BN",
        "4. BN helps deep nets: BN gain at depth 32 minus at depth 4",
        "7. Nothing grows <here>: LN shortfall at batch 1",
        "8. Fixup trains without normalization: Fixup minus plain test accuracy"]
    assert [r["unit"] for r in rows] == ["points", "points", "x", "points", "points", "points"]
    assert rows[-1]["fail_below"] == 0.5
    png = study / "plots" / "overview_forest.png"
    assert png_is_intact(png)
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[1] == 1100 and pixels.shape[0] > 400  # 11 in wide at 100 dpi
    assert pixels[..., :3].std() > 0.05  # something is drawn


def test_png_is_intact_finds_damaged_files(study, tmp_path):
    good = (study / "plots" / "overview_forest.png").read_bytes()
    cases = {"good.png": good, "short.png": good[:len(good) // 2], "noend.png": good[:-12],
             "flip.png": good[:200] + bytes([good[200] ^ 0xFF]) + good[201:],
             "text.png": b"not a png at all", "empty.png": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    assert [png_is_intact(tmp_path / n) for n in cases] == [True] + [False] * 5
    assert not png_is_intact(tmp_path / "missing.png")


def test_truncated_or_missing_plot_is_redrawn(tmp_path):
    out = _write_study(tmp_path / "s", grid=False)
    write_report(out, claims=CLAIMS)
    png = out / "plots" / "z_gn_small_plot.png"
    good = png.read_bytes()
    png.write_bytes(good[:len(good) // 3])  # as an interrupted write leaves it
    write_report(out, claims=CLAIMS)
    assert png_is_intact(png)
    png.unlink()
    forest = out / "plots" / "overview_forest.png"
    forest.write_bytes(b"\x89PNG\r\n\x1a\n")  # the overview figure is redrawn on every report
    write_report(out, claims=CLAIMS)
    assert png_is_intact(png) and png_is_intact(forest)


def test_damaged_plot_without_the_claims_code_is_left_out(tmp_path):
    out = _write_study(tmp_path / "s", grid=False)
    write_report(out, claims=CLAIMS)
    (out / "plots" / "z_gn_small_plot.png").write_bytes(b"\x89PNG\r\n")
    lines = []
    write_report(out, claims={}, log=lines.append)
    assert "z_gn_small_plot.png" not in (out / "README.md").read_text()
    assert any("missing or damaged" in line and "z_gn_small" in line for line in lines)
    write_report(out, claims=CLAIMS)  # the record still names it: redrawn once code is given
    assert png_is_intact(out / "plots" / "z_gn_small_plot.png")
    assert "z_gn_small_plot.png" in (out / "README.md").read_text()


# --------------------------------------------------------------------------- rebuilding


def test_cli_report_rebuilds_the_same_report(study, capsys):
    before = (study / "claims.json").read_bytes()
    readme = (study / "README.md").read_text()
    page = (study / "index.html").read_text()
    for name in ("claims.json", "README.md", "index.html"):
        (study / name).unlink()
    (study / "plots" / "grid_lr_sensitivity.png").unlink()
    assert main(["report", str(study)]) == 0
    assert "index.html" in capsys.readouterr().out
    assert (study / "claims.json").read_bytes() == before
    assert (study / "README.md").read_text() == readme
    assert (study / "index.html").read_text() == page
    assert png_is_intact(study / "plots" / "grid_lr_sensitivity.png")


def test_old_snapshot_with_only_claims_json_shows_verdict_and_reason(tmp_path):
    # a published snapshot (docs/study) keeps claims.json and no claims/ folder
    old = [{k: v for k, v in _record(n, f"old{n}", f"Old claim {n}", v).items()
            if k not in ("decisive", "setup_change", "criterion_change", "scale_note")}
           for n, v in ((2, "inconclusive"), (1, "reproduced"))]
    (tmp_path / "claims.json").write_text(json.dumps(old))
    write_report(tmp_path, claims={})
    md = (tmp_path / "README.md").read_text()
    assert "No claim here recorded an effect with an estimate" in md
    # the protocol's rule is not claimed for verdicts it did not decide
    assert "How verdicts are decided" not in md
    assert "Every claim here predates the statistical protocol" in md
    assert "| # | claim | verdict | effect |" not in md  # no empty effects table
    assert [r[0] for r in _table(md, md.index("### Claims without effect"))] == ["1", "2"]
    assert md.index("**Why reproduced.** reason 1") < md.index("**Why inconclusive.** reason 2")
    assert not (tmp_path / "claims").exists()
    assert not (tmp_path / "plots" / "overview_forest.png").exists()


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no results" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no study folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- numbers


def test_grid_summary_best_lr_and_diverged_at_chance():
    runs = [_run("bn", 2, 0.5, 0, 0.6), _run("bn", 2, 0.5, 1, 0.8),      # mean 0.70
            _run("bn", 2, 1.0, 0, 0.9), _run("bn", 2, 1.0, 1, 0.95, diverged=True),  # 0.50
            _run("gn", 2, 0.5, 0, 0.85), _run("gn", 2, 0.5, 1, 0.87),    # 0.86
            _run("none", 128, 1.0, 0, 0.4), _run("gn", 128, 1.0, 0, 0.3)]
    s = grid_summary(_grid(runs))
    assert s["by_lr"][("bn", 2, 1.0)]["acc"] == pytest.approx((0.9 + 0.1) / 2)
    assert s["by_lr"][("bn", 2, 1.0)]["diverged"] == 1
    assert s["best"][("bn", 2)]["lr_factor"] == 0.5
    assert s["best"][("bn", 2)]["acc"] == pytest.approx(0.7)
    notes = " ".join(practitioner_notes([], _grid(runs)))
    assert "batch 2: the best normalizers were gn 86.0%, bn 70.0%" in notes
    assert "batch 128: the best normalizers were none 40.0%, gn 30.0%" in notes


def test_practitioner_notes_from_verdicts():
    recs = [{"number": 1, "title": "A", "verdict": "reproduced", "takeaway": "use A",
             "reason": "r1"},
            {"number": 2, "title": "B", "verdict": "not reproduced", "reason": "B was 3 pts"},
            {"number": 3, "title": "C", "verdict": "inconclusive", "reason": "noise"},
            {"number": 4, "title": "D", "verdict": "not available", "reason": "missing"},
            {"number": 5, "title": "E", "verdict": "not testable at this scale",
             "reason": "premise"}]
    notes = practitioner_notes(recs, None)
    assert notes[0] == ("Of 5 claims, **1 reproduced**, **1 not reproduced**, 1 inconclusive, "
                        "1 not testable at this scale and 1 not available.")
    assert "Reproduced, claim 1 (A): use A" in notes
    assert "Not reproduced here, claim 2 (B): B was 3 pts" in notes
    assert any("Inconclusive" in n and "claim 3" in n for n in notes)
    assert any("Not testable at this scale" in n and "claim 5" in n for n in notes)


def test_compact_cuts_long_lists_and_rounds():
    text = compact({"xs": list(range(100)), "pi": 3.14159265, "ok": True, "none": None})
    assert "… 92 more …" in text and "98, 99" in text
    assert "3.142" in text and "3.1415" not in text
    assert '"ok": true' in text and '"none": null' in text


# --------------------------------------------------------------------------- browser


@pytest.mark.slow
def test_index_html_renders_in_headless_chromium(study, tmp_path):
    """The page as a browser draws it: not blank, with the verdict colours of the badges and
    the forest plot (Debian's `chromium`; `apt-get install -y chromium`)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (apt-get install -y chromium)")
    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,2000",
                    (study / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert png_is_intact(shot)
    import matplotlib.image
    import numpy as np

    rgb = matplotlib.image.imread(shot)[..., :3]
    assert rgb.shape[:2] == (2000, 1200)
    assert (rgb.min(axis=-1) < 0.9).mean() > 0.02  # far from blank
    # the green of a "reproduced" badge or forest row: the CSS and the image were drawn
    greenish = (rgb[..., 1] > rgb[..., 0] + 0.15) & (rgb[..., 1] > rgb[..., 2] + 0.15)
    redish = (rgb[..., 0] > rgb[..., 1] + 0.2) & (rgb[..., 0] > rgb[..., 2] + 0.2)
    assert np.count_nonzero(greenish) > 100 and np.count_nonzero(redish) > 100


def test_an_interval_not_halved_is_explained():
    from normlab.report import _md_claim as _claim_section

    row = {"key": "d", "name": "GN minus BN", "unit": "points", "role": "claim",
           "test": "greater", "threshold": 0.0, "estimate": 1.0, "low": -0.5, "high": 2.5,
           "half_width": 1.5, "previous_noise": 2.0, "n": 5, "verdict": "inconclusive"}
    rec = {"id": "c", "number": 1, "title": "t", "verdict": "inconclusive", "effects": [row],
           "width_note": "the seed spread needs 15 seeds", "statement": "s", "source": "s",
           "setup": "s", "criterion": "c", "reason": "r"}
    text = _claim_section(rec)
    assert "Interval not halved" in text and "15 seeds" in text
    rec["effects"] = [{**row, "half_width": 0.9}]
    assert "Interval not halved" not in _claim_section(rec)
