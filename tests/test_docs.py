"""docs/choosing.md and its generator (normlab.docs, `normlab docs`), and the docstrings
of normlab's public API (what help() shows)."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import statistics
from pathlib import Path

import pytest

import normlab
from normlab import docs
from normlab.cli import main

REPO = Path(__file__).resolve().parents[1]


def _section(text: str, title: str) -> str:
    """The Markdown of the method section headed ``### title``."""
    start = text.index(f"### {title}\n")
    end = text.find("\n### ", start + 1)
    end = text.find("\n## ", start + 1) if end == -1 else end
    return text[start:end]


# ------------------------------------------------------------------- synthetic evidence

CLAIMS = [
    {"id": "bn_fewer_steps", "number": 1, "title": "BN needs fewer steps",
     "verdict": "reproduced", "reason": "14x fewer steps measured, criterion 5x"},
    {"id": "gn_batch_stable", "number": 8, "title": "GN is stable across batch sizes",
     "verdict": "not reproduced", "reason": "accuracy spread 9 points, criterion 2"},
    {"id": "mystery_claim", "number": 99, "title": "A claim no method lists",
     "verdict": "inconclusive", "reason": "too noisy"},
]


def _record(layer, impl, ms, ratio=None, shape=(8, 16, 4, 4), mode="train", pass_="fwd"):
    return {"layer": layer, "impl": impl, "shape": list(shape), "dtype": "float32",
            "layout": "nchw", "mode": mode, "pass": pass_, "median_ms": ms,
            "ratio_to_torch": ratio}


def _bench():
    records = []
    # BatchNorm in three cells: torch.nn's time / normlab's is 0.9, 1.1 and 1.3.
    for i, (torch_ms, ours) in enumerate([(0.9, 1.0), (2.2, 2.0), (3.9, 3.0)]):
        shape = (8, 16, 4, 4 + i)
        records += [_record("BatchNorm", "torch", torch_ms, shape=shape),
                    _record("BatchNorm", "normlab", ours, round(torch_ms / ours, 4),
                            shape=shape),
                    _record("BatchNorm", "composite", 2 * ours, shape=shape),
                    _record("BatchNorm", "copy", 0.1, shape=shape)]
    # OnlineNorm has no torch.nn peer: the per-sample loop is its peer (5x and 10x slower).
    for i, (loop, ours) in enumerate([(10.0, 2.0), (30.0, 3.0)]):
        shape = (2 + i, 16, 4, 4)
        records += [_record("OnlineNorm", "normlab", ours, shape=shape),
                    _record("OnlineNorm", "loop", loop, shape=shape)]
    return records


@pytest.fixture
def evidence(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / "claims.json").write_text(json.dumps(CLAIMS))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(_bench()))
    return study, bench


def test_without_evidence_every_method_reads_not_measured_yet():
    text = docs.generate()
    for m in docs.METHODS.values():
        section = _section(text, m["title"])
        for field in ("normalises", "use", "avoid", "costs"):
            assert m[field] in section
        if m["claims"]:
            assert f"Claims ({', '.join(m['claims'])}): not measured yet." in section
        if m["bench"]:
            assert f"Speed ({', '.join(m['bench'])}): not measured yet." in section
    # No verdict and no ratio is invented.
    assert not re.search(r"\*\*(reproduced|not reproduced|inconclusive)\*\*", text)
    assert "median over" not in text


def test_evidence_is_filled_in_from_the_json(evidence):
    study, bench = evidence
    text = docs.generate(docs.load_claims(study), docs.load_bench(bench), "study", "b.json")

    bn = _section(text, docs.METHODS["batch"]["title"])
    assert ("Claim 1. BN needs fewer steps (`bn_fewer_steps`): **reproduced**: "
            "14x fewer steps measured, criterion 5x") in bn
    # A listed claim the study does not hold is said to be missing, not invented.
    assert "Claim `bn_higher_lr`: not measured yet (not in this study)." in bn
    ratios = [0.9 / 1.0, 2.2 / 2.0, 3.9 / 3.0]
    assert (f"torch.nn's time / normlab's = {statistics.median(ratios):.2f} median over 3 "
            f"cells (range {min(ratios):.2f} to {max(ratios):.2f}; slowest: 8x16x4x4 "
            f"float32 nchw train fwd, {min(ratios):.2f})") in bn
    assert "composite's time / normlab's = 2.00 median (range 2.00 to 2.00)" in bn
    assert "BatchNorm+LeakyReLU): not measured yet (no record in the benchmark)" in bn

    gn = _section(text, docs.METHODS["group"]["title"])
    assert "**not reproduced**: accuracy spread 9 points, criterion 2" in gn
    assert "Speed (GroupNorm): not measured yet (no record in the benchmark)." in gn

    online = _section(text, docs.METHODS["online"]["title"])
    loop = [10.0 / 2.0, 30.0 / 3.0]
    assert "Speed (OnlineNorm, 2 cells): torch.nn has no such layer" in online
    assert (f"loop's time / normlab's = {statistics.median(loop):.2f} median "
            f"(range {min(loop):.2f} to {max(loop):.2f})") in online

    # The study's claims that no method lists are not lost.
    other = text[text.index("## Other claims of the study"):]
    assert "A claim no method lists (`mystery_claim`): **inconclusive**: too noisy" in other
    # The summary table carries the same numbers.
    row = next(line for line in text.splitlines() if line.startswith("| [Batch Normalization]"))
    assert "1: reproduced" in row and f"BatchNorm: {statistics.median(ratios):.2f}" in row


def test_bench_summary_skips_cells_without_a_time():
    records = [_record("GroupNorm", "normlab", None, 1.2), _record("GroupNorm", "torch", 1.0)]
    assert docs.bench_summary(records, "GroupNorm") is None
    assert docs.bench_summary(records, "NoSuchLayer") is None


def test_cli_docs_writes_the_page(evidence, tmp_path, capsys):
    study, bench = evidence
    out = tmp_path / "sub" / "choosing.md"
    assert main(["docs", "--study", str(study), "--bench", str(bench), "--out", str(out)]) == 0
    expected = docs.generate(docs.load_claims(study), docs.load_bench(bench), str(study),
                             str(bench))
    assert out.read_text() == expected
    assert f"--study {study} --bench {bench} --out docs/choosing.md" in expected
    assert "wrote" in capsys.readouterr().out


def test_cli_docs_reports_bad_evidence(tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text(json.dumps({"not": "records"}))
    assert main(["docs", "--bench", str(bad), "--out", "-"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "benchmark records" in err
    assert main(["docs", "--study", str(tmp_path / "missing"), "--out", "-"]) == 2
    assert "claims file not found" in capsys.readouterr().err


def test_every_registry_norm_and_lab_claim_has_a_method_entry():
    covered = {n for m in docs.METHODS.values() for n in m["norms"]}
    assert set(normlab.list_norms()) <= covered
    from normlab.claims import all_claims

    listed = {c for m in docs.METHODS.values() for c in m["claims"]}
    assert {c.id for c in all_claims()} <= listed
    for key, m in docs.METHODS.items():
        for field in ("title", "build", "normalises", "use", "avoid", "costs", "portability"):
            assert len(m[field]) >= 5, (key, field)


def test_bench_names_exist_in_the_benchmark():
    bench = pytest.importorskip("normlab.bench")
    names = {n for m in docs.METHODS.values() for n in m["bench"]}
    assert names <= set(bench.LAYERS)


def test_repository_page_is_generated_from_the_current_data():
    """docs/choosing.md is the generator's output (regenerated with `normlab docs`),
    holding every method's hand-written text as METHODS has it now."""
    text = (REPO / "docs" / "choosing.md").read_text()
    assert text.startswith("# Choosing a normalization layer\n\n<!-- Generated by `normlab docs`")
    for m in docs.METHODS.values():
        section = _section(text, m["title"])
        for field in ("normalises", "use", "avoid", "costs", "portability"):
            assert m[field] in section, (m["title"], field)


# --------------------------------------------------------------------- public docstrings

PUBLIC_MODULES = ["normlab", "normlab.nn", "normlab.functional", "normlab.convert",
                  "normlab.init", "normlab.models", "normlab.stats", "normlab.data",
                  "normlab.train", "normlab.uncertainty"]


def _public_callables():
    seen = set()
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        assert hasattr(module, "__all__"), f"{module_name} has no __all__"
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not callable(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{module_name}.{name}", obj


PUBLIC = list(_public_callables())


@pytest.mark.parametrize("name, obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_function_or_class_has_a_docstring_of_substance(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert len(doc) >= 40, f"{name}: docstring of {len(doc)} characters: {doc!r}"
    if inspect.isclass(obj):
        # Public methods defined by normlab (forward and extra_repr follow torch.nn's
        # conventions, described in the class docstring).
        for attr, value in vars(obj).items():
            if attr.startswith("_") or attr in ("forward", "extra_repr"):
                continue
            if inspect.isfunction(value) or isinstance(value, property):
                method_doc = inspect.getdoc(getattr(obj, attr, value)) or (
                    value.__doc__ if isinstance(value, property) else None) or ""
                assert len(method_doc) >= 20, f"{name}.{attr} has no docstring"


# ------------------------------------------------------------ the protocol's claim records

NEW_RECORD = {
    "id": "bn_fewer_steps", "number": 1, "title": "BN needs fewer steps",
    "verdict": "not testable at this scale", "reason": "the old field, not shown",
    "takeaway": "BN saved steps, but far fewer than the paper's 14x.",
    "scale_note": "3-layer CNN on 8x8 digits, not Inception on ImageNet.",
    "effects": [
        {"name": "step ratio", "unit": "x", "estimate": 2.04, "low": 1.5, "high": 2.6,
         "confidence": 0.95, "threshold": 3.0, "test": "greater",
         "verdict": "not reproduced"},
        {"name": "accuracy gap", "unit": "points", "estimate": -0.4, "low": None,
         "high": None, "threshold": 0.0, "margin": 1.0, "test": "equivalent",
         "verdict": "not available"},
    ],
}


def test_protocol_records_give_verdict_intervals_and_scale_note():
    text = docs.generate([NEW_RECORD, CLAIMS[1]])
    bn = _section(text, docs.METHODS["batch"]["title"])
    assert ("- Claim 1. BN needs fewer steps (`bn_fewer_steps`): **not testable at this "
            "scale**: BN saved steps, but far fewer than the paper's 14x.") in bn
    assert "the old field" not in bn  # the takeaway replaces the reason
    assert ("  - step ratio: 2.04 x, 95% interval [1.5, 2.6]; the paper's claim: above 3 x: "
            "not reproduced") in bn
    assert ("  - accuracy gap: -0.4 points, interval [n/a, n/a]; the paper's claim: within "
            "1 of 0 points: not available") in bn
    assert ("  - Against the paper: the lab's verdict is 'not testable at this scale', so it "
            "does not confirm the paper. Why the scale may explain it: 3-layer CNN on 8x8 "
            "digits, not Inception on ImageNet.") in bn
    agree = docs.generate([{**NEW_RECORD, "verdict": "reproduced"}])
    assert "  - Against the paper: the lab agrees at its small scale." in agree
    differs = docs.generate([{**NEW_RECORD, "verdict": "not reproduced"}])
    assert "the lab's verdict differs from the paper's claim. Why the scale" in differs
    # An old record in the same study keeps its reason.
    gn = _section(text, docs.METHODS["group"]["title"])
    assert "**not reproduced**: accuracy spread 9 points, criterion 2" in gn
    row = next(line for line in text.splitlines() if line.startswith("| [Batch Normalization]"))
    assert "1: not testable at this scale" in row


def test_method_guide_files_are_parsed_and_checked():
    m = docs.METHODS["batch"]
    assert m["claims"][0] == "bn_fewer_steps" and m["bench"] == ["BatchNorm",
                                                                  "BatchNorm+LeakyReLU"]
    assert "\n" not in m["use"] and m["use"].startswith("convolutional and fully")
    text = "---\ntitle: T\npaper: P\nbuild: B\nnorms:\nclaims: a, b\nbench:\n---\n\n## Costs\n\nx\n"
    with pytest.raises(ValueError, match=r"guide/methods/99_t.md lacks \['normalises'"):
        docs._parse_method("99_t.md", text)
    with pytest.raises(ValueError, match="front matter"):
        docs._parse_method("99_t.md", "## Costs\n")
