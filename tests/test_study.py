"""`normlab study` end to end at a tiny budget, with fake claims defined here: verdicts
from the protocol, errors, missing layers, files written, content-keyed resume, the
folder lock, the umask, and a killed study leaving no worker behind."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from normlab.claims.base import Budget, Claim, atomic_write_json
from normlab.claims.protocol import Effect
from normlab.cli import main
from normlab.study import StudyLocked, _FolderLock, grid_config, grid_runs, run_study

TINY = Budget("test", step_scale=0.02, seeds=3)
#: Two norms x two batch sizes x one learning rate, a sliver of an epoch: 4 real runs.
TINY_GRID = {"norms": ["none", "bn"], "batch_sizes": [8, 32], "lr_factors": [1.0],
             "epochs": 0.1, "seeds": [0]}
OFFSET = 10


def affine(x: int, offset: int) -> dict:
    """A run: deterministic, cheap, and with every input in its arguments."""
    return {"y": 2 * x + offset, "pid": os.getpid()}


def measure_affine(ctx) -> dict:
    # one batch of runs (computed in parallel), then a second that depends on it
    first = ctx.map(affine, [{"x": s, "offset": OFFSET} for s in ctx.seeds])
    second = ctx.map(affine, [{"x": r["y"], "offset": 0} for r in first])
    # y2 = 2 (2 s + 10) = 4 s + 20: the per-seed effect "y2 - 4 s" is 20 for every seed
    return {"effects": {"d": [r["y"] - 4 * s for s, r in zip(ctx.seeds, second, strict=True)]},
            "pids": sorted({r["pid"] for r in first + second})}


def plot_affine(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot(m["effects"]["d"], "o-")
    fig.savefig(Path(out_dir) / "fake_affine.png")
    plt.close(fig)
    return ["fake_affine.png"]


def measure_boom(ctx) -> dict:
    ctx.map(affine, [{"x": 1, "offset": 1}])
    raise ValueError("boom: the experiment broke")


def _claim(number, id, measure, effects, **kw):
    return Claim(number=number, id=id, title=id.replace("_", " "), statement="-",
                 source="test_study.py", setup="-", measure=measure, effects=effects, **kw)


FAKE_UP = _claim(1, "fake_up", measure_affine,
                 (Effect("d", "y2 - 4 seed", "units", "greater", threshold=15.0),),
                 plot=plot_affine, lessons={"reproduced": "It holds."})
FAKE_DOWN = _claim(2, "fake_down", measure_affine,
                   (Effect("d", "y2 - 4 seed", "units", "greater", threshold=25.0),))
FAKE_BOOM = _claim(3, "fake_boom", measure_boom, (Effect("d", "d", "units", "greater"),))
FAKE_MISSING = _claim(4, "fake_missing", measure_affine, (Effect("d", "d", "u", "greater"),),
                      requires=("normlab.nn.NoSuchLayer",))
FAKES = [FAKE_UP, FAKE_DOWN, FAKE_BOOM, FAKE_MISSING]


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


def test_verdicts_come_from_the_protocol(finished):
    out, summary, _ = finished
    by_id = {r["id"]: r for r in summary["claims"]}
    up, down = by_id["fake_up"], by_id["fake_down"]
    assert up["verdict"] == "reproduced" and down["verdict"] == "not reproduced"
    (eff,) = up["effects"]
    assert eff["values"] == [20.0, 20.0, 20.0] and eff["low"] == eff["high"] == 20.0
    assert up["takeaway"].startswith("It holds.") and "20" in up["reason"]
    assert "15 units" in up["criterion"]
    assert up["runs_done"] == 6 and up["plots"] == ["fake_affine.png"]
    assert by_id["fake_boom"]["verdict"] == "inconclusive"
    assert "boom" in by_id["fake_boom"]["error"] and by_id["fake_boom"]["traceback"]
    assert by_id["fake_missing"]["verdict"] == "not available"
    assert len(set(up["measured"]["pids"])) >= 1 and os.getpid() not in up["measured"]["pids"]


def test_files_written(finished):
    out, summary, _ = finished
    meta = json.loads((out / "study.json").read_text())
    assert len(meta["code_hash"]) == 64 and meta["normlab_version"]
    assert meta["budget_detail"] == {"name": "test", "step_scale": 0.02, "seeds": 3,
                                     "decisive": True}
    claims = json.loads((out / "claims.json").read_text())
    assert [c["id"] for c in claims] == ["fake_up", "fake_down", "fake_boom", "fake_missing"]
    grid = json.loads((out / "grid.json").read_text())
    assert len(grid["runs"]) == 4 and all(r["final_test_acc"] is not None for r in grid["runs"])
    assert (out / "index.html").is_file() and (out / "README.md").is_file()


def test_a_rerun_computes_nothing_and_a_deleted_run_is_redone(finished, tmp_path):
    import shutil

    out, summary, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again, _ = _study(copy, workers=0)
    assert again["runs_done"] == 0
    runs = sorted((copy / "runs").glob("affine-*.json"))
    runs[0].unlink()
    runs[1].write_text("{not json")
    redo, _ = _study(copy, workers=0)
    assert redo["runs_done"] == 2
    assert any("corrupt result file" in w for w in redo["warnings"])
    assert [r["verdict"] for r in redo["claims"]] == [r["verdict"] for r in summary["claims"]]


def test_a_changed_constant_recomputes_what_it_affects(finished, tmp_path, monkeypatch):
    import shutil

    out, _, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    monkeypatch.setattr(sys.modules[__name__], "OFFSET", 11)
    changed, _ = _study(copy, workers=0)
    # both fake claims share the runs: 3 first-batch runs and 3 second-batch runs are new
    assert changed["runs_done"] == 6
    up = next(r for r in changed["claims"] if r["id"] == "fake_up")
    assert up["effects"][0]["values"] == [22.0, 22.0, 22.0]


def test_a_second_study_on_the_same_folder_is_refused(tmp_path):
    with _FolderLock(tmp_path), pytest.raises(StudyLocked, match="another study"):
        run_study(tmp_path, budget=TINY, claims=[FAKE_UP], workers=0, grid=False,
                  log=lambda line: None)
    # released: the same call now runs
    run_study(tmp_path, budget=TINY, claims=[FAKE_UP], workers=0, grid=False,
              log=lambda line: None)


def test_stored_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o640


def test_out_must_be_a_writable_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run_study(f, budget=TINY, claims=[FAKE_UP], workers=0, grid=False)


def test_unknown_claim_and_budget_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown budget"):
        run_study(tmp_path, budget="huge", claims=[FAKE_UP], workers=0, grid=False)
    with pytest.raises(ValueError, match="unknown claim 'nope'"):
        run_study(tmp_path, budget=TINY, claims=["nope"], workers=0, grid=False)


def test_grid_config_same_epochs_and_linear_lr():
    cfg = grid_config(Budget("default", 1.0, 5))
    runs = grid_runs(cfg, num_train=1024)
    by_batch = {r["batch_size"]: r for r in runs if r["lr_factor"] == 1.0}
    assert by_batch[2]["steps"] == 16 * by_batch[32]["steps"]
    assert by_batch[2]["lr"] == pytest.approx(by_batch[32]["lr"] / 16)


def _session_alive(sid: int) -> list[int]:
    alive = []
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit():
            try:
                if os.getsid(int(pid_dir.name)) == sid:
                    alive.append(int(pid_dir.name))
            except OSError:
                pass
    return alive


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to list processes")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_study_leaves_no_worker_and_no_writer(tmp_path, sig):
    out = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-m", "normlab", "study", "--quick", "--claims",
                             "gn_batch_stable", "--no-grid", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not list((out / "runs").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list((out / "runs").glob("*.json")), "the study stored no run within 60 s"
    os.kill(proc.pid, sig)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _session_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session_alive(proc.pid) == [], "worker processes outlived the study"
    before = sorted(p.name for p in out.rglob("*"))
    time.sleep(1.5)
    assert sorted(p.name for p in out.rglob("*")) == before
    # the lock died with its owner: a new study on the folder is not refused
    with _FolderLock(out):
        pass


@pytest.mark.parametrize("command", ["study", "claims", "report"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: normlab {command}" in capsys.readouterr().out


def test_cli_claims_lists_every_claim(capsys):
    from normlab.study import discover_claims

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["claims"]) == 0
        found = discover_claims()
    out = capsys.readouterr().out
    for f in found:
        assert f.claim.id in out and f.claim.title in out


def test_cli_study_unknown_claim_exits_2(tmp_path, capsys):
    assert main(["study", "--claims", "no_such_claim", "--out", str(tmp_path / "x"),
                 "--no-grid", "--workers", "0"]) == 2
    assert "unknown claim 'no_such_claim'" in capsys.readouterr().err


def test_cli_study_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot happen here")
    assert main(["study", "--claims", "gn_batch_stable", "--device", "cuda", "--no-grid",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda" in err[0] and "no CUDA" in err[0]


def broken_run(x: int) -> dict:
    raise RuntimeError(f"run {x} broke")


def measure_broken_runs(ctx) -> dict:
    ctx.map(affine, [{"x": 0, "offset": 0}])  # stored, then reused by the next study
    ctx.map(broken_run, [{"x": s} for s in ctx.seeds])
    return {"effects": {"d": [0.0] * len(ctx.seeds)}}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failed_run_is_counted_neither_computed_nor_reused(tmp_path, workers):
    claim = _claim(5, "fake_broken_runs", measure_broken_runs, (Effect("d", "d", "u", "greater"),))
    for attempt in range(2):
        summary = run_study(tmp_path, budget=TINY, claims=[claim], workers=workers, grid=False,
                            log=lambda line: None)
        (rec,) = summary["claims"]
        assert "broke" in rec["error"] and rec["verdict"] == "inconclusive"
        assert len(rec["run_files"]) == 4  # the stored run and the three failed ones
        # the first study computed the one good run, the second found it stored
        assert (rec["runs_done"], rec["runs_reused"]) == ((1, 0) if attempt == 0 else (0, 1))
        assert (summary["runs_done"], summary["runs_reused"]) == (rec["runs_done"],
                                                                  rec["runs_reused"])
