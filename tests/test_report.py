"""The study's report: built from the JSON results alone, opens with the claims table,
rebuilt identically by `normlab report DIR`, and the grid's numbers behind it."""

import json
import re
from pathlib import Path

import pytest

from normlab.claims.base import Budget, Claim
from normlab.cli import main
from normlab.report import compact, grid_summary, practitioner_notes, write_report
from normlab.study import run_study


def measure_ratio(ctx) -> dict:
    runs = [ctx.run(f"r{i}", lambda i=i: {"x": i / 4}) for i in range(3)]
    return {"ratios": [r["x"] for r in runs], "curve": [i * 0.1 for i in range(40)]}


def judge_ratio(m) -> tuple[str, str]:
    return ("reproduced", f"largest ratio {max(m['ratios'])} >= 0.5") if max(m["ratios"]) >= 0.5 \
        else ("not reproduced", "ratios below 0.5")


def plot_ratio(m, out_dir) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot(m["ratios"])
    fig.savefig(Path(out_dir) / "rep_ratio_plot.png")
    plt.close(fig)
    return ["rep_ratio_plot.png"]


def plot_broken(m, out_dir) -> list[str]:
    raise RuntimeError("no axes today")


def judge_no(m) -> tuple[str, str]:
    return "not reproduced", "the <b>ratio</b> | stayed at 0"


RATIO = Claim(number=7, id="rep_ratio", title="Ratios grow", statement="ratios grow to 1/2",
              source="Paper A, Table 1", setup="three runs", criterion="max ratio >= 0.5",
              measure=measure_ratio, judge=judge_ratio, plot=plot_ratio,
              takeaway="ratios do grow")
BROKEN_PLOT = Claim(number=9, id="rep_no", title="Nothing grows <here>",
                    statement="nothing", source="Paper B", setup="one run",
                    criterion="never", measure=measure_ratio, judge=judge_no, plot=plot_broken)
GRID = {"norms": ["none", "bn"], "batch_sizes": [8, 32], "lr_factors": [1.0], "epochs": 0.1,
        "seeds": [0]}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    run_study(out, budget=Budget("test", 0.02, 1), claims=[RATIO, BROKEN_PLOT], workers=0,
              grid=GRID, log=lambda s: None)
    return out


def test_claims_json(study):
    claims = json.loads((study / "claims.json").read_text())
    assert [c["id"] for c in claims] == ["rep_ratio", "rep_no"]
    ratio, no = claims
    for key in ("id", "number", "title", "source", "statement", "criterion", "measured",
                "verdict", "reason", "budget", "seconds", "plots"):
        assert key in ratio
    assert ratio["measured"]["ratios"] == [0.0, 0.25, 0.5]
    assert ratio["verdict"] == "reproduced" and ratio["source"] == "Paper A, Table 1"
    assert ratio["plots"] == ["rep_ratio_plot.png"]
    assert no["verdict"] == "not reproduced"
    assert no["plots"] == [] and "no axes today" in no["plot_error"]


def test_report_opens_with_the_table_and_holds_every_section(study):
    md = (study / "README.md").read_text()
    page = (study / "index.html").read_text()
    headings = ("Claims", "What a practitioner should take from it", "The claims",
                "Comparison grid", "How it was run", "How to reproduce")
    for text, pattern in ((md, "\n## {}"), (page, ">{}")):
        order = [text.index(pattern.format(h)) for h in headings]
        assert order == sorted(order)
        assert "Ratios grow" in text and "reproduced" in text and "not reproduced" in text
        assert "grid_accuracy_vs_batch.png" in text and "rep_ratio_plot.png" in text
        assert "same number of epochs" in text
        assert "no axes today" in text  # a failed plot is shown, not hidden
    # The table comes before the first claim's details.
    assert md.index("| 7 | [Ratios grow]") < md.index("**Statement.**")
    assert "| 9 | [Nothing grows <here>](#claim-9) | ✘ not reproduced | the <b>ratio</b> \\| " \
           "stayed at 0 |" in md
    # HTML: escaped text, images by relative path that exist, nothing from the network.
    assert "Nothing grows &lt;here&gt;" in page and "the &lt;b&gt;ratio&lt;/b&gt;" in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 4 and all((study / s).is_file() for s in srcs)
    assert all(s.startswith("plots/") for s in srcs)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "<style>" in page and "<link" not in page and "<script" not in page


def test_cli_report_rebuilds_identical_claims_json(study, capsys):
    before = (study / "claims.json").read_bytes()
    readme = (study / "README.md").read_text()
    for name in ("claims.json", "README.md", "index.html"):
        (study / name).unlink()
    (study / "plots" / "grid_lr_sensitivity.png").unlink()
    assert main(["report", str(study)]) == 0
    assert "index.html" in capsys.readouterr().out
    assert (study / "claims.json").read_bytes() == before
    assert (study / "README.md").read_text() == readme
    assert (study / "plots" / "grid_lr_sensitivity.png").is_file()


def test_missing_claim_plot_is_redrawn(study):
    png = study / "plots" / "rep_ratio_plot.png"
    png.unlink()
    write_report(study, claims={"rep_ratio": RATIO})
    assert png.is_file()


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no results" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no study folder" in capsys.readouterr().err


def _grid(runs):
    return {"config": {"norms": ["none", "bn", "gn"], "batch_sizes": [2, 128],
                       "lr_factors": [0.5, 1.0], "num_classes": 10, "epochs": 1,
                       "seeds": [0, 1], "ref_batch": 32, "base_lr": 0.05, "model": "cnn",
                       "data": "digits"},
            "runs": runs}


def _run(norm, b, f, seed, acc, diverged=False):
    return {"norm": norm, "batch_size": b, "lr": 0.05 * f * b / 32, "lr_factor": f,
            "seed": seed, "final_test_acc": acc, "diverged": diverged, "steps": 10,
            "epochs": 1, "seconds": 0.1}


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
            {"number": 4, "title": "D", "verdict": "not available", "reason": "missing"}]
    notes = practitioner_notes(recs, None)
    assert notes[0].startswith("Of 4 claims, **1 reproduced**, **1 not reproduced**, 1 "
                               "inconclusive and 1 not available")
    assert "Reproduced, claim 1 (A): use A" in notes
    assert "Not reproduced here, claim 2 (B): B was 3 pts" in notes
    assert any("Inconclusive" in n and "claim 3" in n for n in notes)


def test_compact_cuts_long_lists_and_rounds():
    text = compact({"xs": list(range(100)), "pi": 3.14159265, "ok": True, "none": None})
    assert "… 92 more …" in text and "98, 99" in text
    assert "3.142" in text and "3.1415" not in text
    assert '"ok": true' in text and '"none": null' in text
