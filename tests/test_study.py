"""`normlab study` end to end at a tiny budget, with fake claims defined here: verdicts,
errors, missing layers, files written, resume after deleted and corrupt runs, and the
command line."""

import json
import os
import warnings
from pathlib import Path

import pytest

from normlab.claims.base import Budget, Claim, atomic_write_json
from normlab.cli import main
from normlab.study import grid_config, grid_runs, run_study

TINY = Budget("test", step_scale=0.02, seeds=1)
#: Two norms x two batch sizes x one learning rate, a sliver of an epoch: 4 real runs.
TINY_GRID = {"norms": ["none", "bn"], "batch_sizes": [8, 32], "lr_factors": [1.0],
             "epochs": 0.1, "seeds": [0]}


def _square_sum(n: int) -> dict:
    return {"value": float(sum(i * i for i in range(n)))}


def measure_sums(ctx) -> dict:
    # Three units of work, each cached by RunContext under runs/fake_sums/.
    values = [ctx.run(f"sum-{n}", lambda n=n: _square_sum(n))["value"] for n in (3, 4, 5)]
    return {"values": values, "total": sum(values), "nan": float("nan")}


def judge_sums(m: dict) -> tuple[str, str]:
    # 0+1+4 + 0+1+4+9 + 0+1+4+9+16 = 49, computed independently of measure().
    if m["total"] == 49.0:
        return "reproduced", f"total {m['total']} == 49"
    return "not reproduced", f"total {m['total']} != 49"


def plot_sums(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot(m["values"], "o-")
    ax.set_title("fake sums")
    fig.savefig(Path(out_dir) / "fake_sums_values.png")
    plt.close(fig)
    return ["fake_sums_values.png"]


def measure_one(ctx) -> dict:
    return ctx.run("one", lambda: {"x": 1})


def judge_negative(m: dict) -> tuple[str, str]:
    return ("not reproduced", "x is 1, the criterion wanted 2")


def measure_boom(ctx) -> dict:
    ctx.run("before-boom", lambda: {"x": 2})
    raise ValueError("boom: the experiment broke")


FAKE_SUMS = Claim(number=1, id="fake_sums", title="Sums of squares add up",
                  statement="the sum is 49", source="test_study.py", setup="three sums",
                  criterion="total == 49", measure=measure_sums, judge=judge_sums,
                  plot=plot_sums, takeaway="squares add up")
FAKE_NEG = Claim(number=2, id="fake_negative", title="One equals two", statement="1 == 2",
                 source="test_study.py", setup="one run", criterion="x == 2",
                 measure=measure_one, judge=judge_negative)
FAKE_BOOM = Claim(number=3, id="fake_boom", title="An experiment that raises",
                  statement="-", source="test_study.py", setup="-", criterion="-",
                  measure=measure_boom, judge=judge_sums)
FAKE_MISSING = Claim(number=4, id="fake_missing", title="Needs a layer that does not exist",
                     statement="-", source="test_study.py", setup="-", criterion="-",
                     measure=measure_one, judge=judge_sums,
                     requires=("normlab.nn.NoSuchLayer",))
FAKES = [FAKE_SUMS, FAKE_NEG, FAKE_BOOM, FAKE_MISSING]


def _study(out, workers, **kw):
    lines = []
    summary = run_study(out, budget=TINY, claims=FAKES, workers=workers, grid=TINY_GRID,
                        log=lines.append, **kw)
    return summary, lines


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One study with two worker processes, shared by the checks below."""
    out = tmp_path_factory.mktemp("study")
    summary, lines = _study(out, workers=2)
    return out, summary, lines


def test_verdicts_errors_and_missing_layers(finished):
    out, summary, lines = finished
    by_id = {r["id"]: r for r in summary["claims"]}
    assert [r["id"] for r in summary["claims"]] == [c.id for c in FAKES]
    assert by_id["fake_sums"]["verdict"] == "reproduced"
    assert by_id["fake_sums"]["measured"]["total"] == 49.0
    assert by_id["fake_sums"]["measured"]["nan"] is None  # NaN stored as null: strict JSON
    assert by_id["fake_negative"]["verdict"] == "not reproduced"
    boom = by_id["fake_boom"]
    assert boom["verdict"] == "inconclusive"
    assert boom["error"] == "ValueError: boom: the experiment broke"
    assert "Traceback" in boom["traceback"] and "measure_boom" in boom["traceback"]
    miss = by_id["fake_missing"]
    assert miss["verdict"] == "not available"
    assert miss["missing"] == ["normlab.nn.NoSuchLayer"]
    # One start and one finish line per claim that ran.
    for cid in ("fake_sums", "fake_negative", "fake_boom"):
        assert sum(f"] {cid}: started" in line for line in lines) == 1
        assert sum(f"] {cid}: " in line and " in " in line and "s CPU" in line
                   for line in lines) == 1


def test_files_written(finished):
    out, summary, _ = finished
    for cid in ("fake_sums", "fake_negative", "fake_boom", "fake_missing"):
        stored = json.loads((out / "claims" / f"{cid}.json").read_text())
        assert stored["budget"] == "test" and stored["data"] == "digits"
    assert (out / "plots" / "fake_sums_values.png").stat().st_size > 1000
    assert json.loads((out / "claims" / "fake_sums.json").read_text())["plots"] == \
        ["fake_sums_values.png"]
    grid = json.loads((out / "grid.json").read_text())
    assert len(grid["runs"]) == 4
    for r in grid["runs"]:
        assert {"norm", "batch_size", "lr", "seed", "final_test_acc", "diverged", "steps",
                "seconds"} <= set(r)
        assert 0.0 <= r["final_test_acc"] <= 1.0
        # Same number of epochs at every batch size: steps = epochs * (1438 // batch).
        assert r["steps"] == max(1, round(0.1 * (1438 // r["batch_size"])))
        assert r["lr"] == pytest.approx(0.05 * r["batch_size"] / 32)
    meta = json.loads((out / "study.json").read_text())
    assert meta["budget"] == "test" and meta["machine"]["cpu_count"] == os.cpu_count()
    for name in ("grid_accuracy_vs_batch.png", "grid_training_curves.png",
                 "grid_lr_sensitivity.png"):
        assert (out / "plots" / name).stat().st_size > 1000


def test_one_worker_then_resume_redoes_only_deleted_and_corrupt_runs(finished, tmp_path):
    out = tmp_path / "s"
    first, _ = _study(out, workers=1)
    # One worker gives what two gave, bit for bit (training is deterministic).
    _, two, _ = finished
    assert [(r["id"], r["verdict"], r["measured"]) for r in first["claims"]] == \
        [(r["id"], r["verdict"], r["measured"]) for r in two["claims"]]
    assert [r["final_test_acc"] for r in first["grid"]["runs"]] == \
        [r["final_test_acc"] for r in two["grid"]["runs"]]
    # fake_sums: 3 runs, fake_negative: 1, fake_boom: 1 before raising, grid: 4.
    assert first["runs_done"] == 9 and first["runs_reused"] == 0
    again, _ = _study(out, workers=1)
    # Finished claims are reused whole; the one that raised is measured again (its run
    # before the error is reused), and the grid reads its 4 stored runs.
    assert again["runs_done"] == 0 and again["runs_reused"] == 5
    sums_runs = sorted((out / "runs" / "fake_sums").glob("*.json"))
    grid_runs_ = sorted((out / "runs" / "grid").glob("*.json"))
    sums_runs[0].unlink()
    grid_runs_[0].unlink()
    corrupt = sums_runs[1]
    corrupt.write_text('{"key": "sum-4", "result": {"val')  # a half-written file
    with pytest.warns(RuntimeWarning, match=corrupt.name):
        third, lines = _study(out, workers=1)
    # Exactly the deleted and the corrupt run of the claim and the deleted grid run.
    assert third["runs_done"] == 3
    assert any("warning" in line and corrupt.name in line for line in lines)
    assert json.loads(corrupt.read_text())["result"] == {"value": 14.0}  # 0+1+4+9
    by_id = {r["id"]: r for r in third["claims"]}
    assert by_id["fake_sums"]["verdict"] == "reproduced"


def test_changed_budget_or_data_redoes_the_claim(tmp_path):
    out = tmp_path / "s"
    run_study(out, budget=TINY, claims=[FAKE_NEG], workers=0, grid=False, log=lambda s: None)
    before = json.loads((out / "claims" / "fake_negative.json").read_text())
    other = Budget("test", step_scale=0.05, seeds=1)
    lines = []
    run_study(out, budget=other, claims=[FAKE_NEG], workers=0, grid=False, log=lines.append)
    after = json.loads((out / "claims" / "fake_negative.json").read_text())
    assert before["budget_detail"]["step_scale"] == 0.02
    assert after["budget_detail"]["step_scale"] == 0.05
    assert not any("stored result reused" in line for line in lines)
    # Same budget again: reused. Then a result stored by other code (another digest of
    # the claim's source) or with another criterion is judged again.
    path = out / "claims" / "fake_negative.json"
    for change in (None, {"code_sha1": "0" * 40}, {"criterion": "x == 3"}):
        if change:
            atomic_write_json(path, {**json.loads(path.read_text()), **change})
        lines = []
        run_study(out, budget=other, claims=[FAKE_NEG], workers=0, grid=False,
                  log=lines.append)
        assert any("stored result reused" in line for line in lines) == (change is None)
        assert json.loads(path.read_text())["criterion"] == "x == 2"


def test_corrupt_claim_result_is_reported_and_redone(tmp_path):
    out = tmp_path / "s"
    run_study(out, budget=TINY, claims=[FAKE_NEG], workers=0, grid=False, log=lambda s: None)
    path = out / "claims" / "fake_negative.json"
    path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="fake_negative.json"):
        summary = run_study(out, budget=TINY, claims=[FAKE_NEG], workers=0, grid=False,
                            log=lambda s: None)
    assert summary["claims"][0]["verdict"] == "not reproduced"
    assert json.loads(path.read_text())["verdict"] == "not reproduced"


def test_unknown_claim_and_budget_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown claim 'no_such_claim'"):
        run_study(tmp_path, claims=["no_such_claim"], workers=0, grid=False)
    with pytest.raises(ValueError, match="unknown budget 'huge'"):
        run_study(tmp_path, budget="huge", workers=0, grid=False)


def test_grid_config_same_epochs_and_linear_lr():
    from normlab.claims.base import BUDGETS

    for name in ("quick", "default", "full"):
        cfg = grid_config(BUDGETS[name])
        assert min(cfg["batch_sizes"]) == 2 and max(cfg["batch_sizes"]) == 128
        assert {"none", "bn", "gn", "ln", "in", "brn", "sn"} <= set(cfg["norms"])
        assert len(cfg["seeds"]) == BUDGETS[name].seeds
        runs = grid_runs(cfg, num_train=1438)
        assert len(runs) == (len(cfg["norms"]) * len(cfg["batch_sizes"])
                             * len(cfg["lr_factors"]) * len(cfg["seeds"]))
        for r in runs:
            # Samples seen = epochs x (whole batches per epoch) x batch, at every size.
            assert r["steps"] == cfg["epochs"] * (1438 // r["batch_size"])
            assert r["lr"] == pytest.approx(0.05 * r["lr_factor"] * r["batch_size"] / 32,
                                             rel=1e-5)


@pytest.mark.parametrize("command", ["study", "claims", "report"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: normlab {command}" in capsys.readouterr().out


def test_cli_claims_lists_every_claim(capsys):
    from normlab.study import discover_claims

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a claim module being written may not load yet
        assert main(["claims"]) == 0
        found = discover_claims()
    out = capsys.readouterr().out
    for f in found:
        assert f.claim.id in out and f.claim.title in out
    if not found:
        assert "no claims yet" in out


def test_cli_study_unknown_claim_exits_2(tmp_path, capsys):
    assert main(["study", "--claims", "no_such_claim", "--out", str(tmp_path / "x"),
                 "--no-grid", "--workers", "0"]) == 2
    assert "unknown claim 'no_such_claim'" in capsys.readouterr().err
