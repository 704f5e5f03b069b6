"""`normlab train` and `normlab study`: every bad argument gives one line naming it and
exit status 2, before any training starts (output paths included); a diverged run
exits with a status of its own."""

from __future__ import annotations

import json
import os

import pytest
import torch

import normlab.train
from normlab.cli import EXIT_DIVERGED, main


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if training starts: every check must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started despite a bad argument")

    monkeypatch.setattr(normlab.train, "train", refuse)


def _one_line_error(capsys, flag: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("normlab train: error: ") and flag in err[0], err
    return err[0]


TRAIN = ["train", "--data", "digits", "--model", "mlp", "--steps", "3", "--no-progress"]

BAD = [
    ("--batch-size", "0"), ("--batch-size", "-3"), ("--steps", "-5"), ("--steps", "0"),
    ("--lr", "-0.1"), ("--lr", "nan"), ("--lr", "inf"), ("--weight-decay", "-1"),
    ("--clip", "-1"), ("--clip", "0"), ("--clip", "nan"), ("--eval-every", "0"),
    ("--warmup", "-3"), ("--momentum", "2"), ("--momentum", "-0.5"), ("--threads", "-2"),
    ("--dropout", "1.5"), ("--init-scale", "nan"), ("--width", "0"), ("--depth", "-1"),
    ("--dist-timeout", "0"), ("--dist-timeout", "nan"), ("--device", "banana"),
]


@pytest.mark.parametrize("flag, value", BAD, ids=[f"{f}={v}" for f, v in BAD])
def test_bad_numeric_or_device_argument_is_one_line_and_exit_2(flag, value, capsys,
                                                               no_training):
    assert main(TRAIN + [flag, value]) == 2
    line = _one_line_error(capsys, flag)
    assert "got" in line or "device" in line  # what it got


@pytest.mark.parametrize("kw, expected", [
    ("eps=abc", "eps"), ("eps=nan", "eps"), ("bogus=1", "--norm-kw"),
    ("noequals", "--norm-kw"),
])
def test_bad_norm_keyword_is_one_line_and_exit_2(kw, expected, capsys, no_training):
    assert main(TRAIN + ["--norm", "bn", "--norm-kw", kw]) == 2
    _one_line_error(capsys, expected)


@pytest.mark.parametrize("flag, value", [("--norm", "nope"), ("--model", "nope"),
                                         ("--data", "nope")])
def test_unknown_names_are_one_line_and_exit_2(flag, value, capsys, no_training):
    assert main(TRAIN + [flag, value]) == 2
    _one_line_error(capsys, value)


def test_cuda_without_cuda_is_one_line_and_exit_2(capsys, monkeypatch, no_training):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(TRAIN + ["--device", "cuda"]) == 2
    assert "CUDA is not available" in _one_line_error(capsys, "--device")


def test_output_paths_are_checked_before_training(tmp_path, capsys, no_training):
    missing = tmp_path / "missing" / "r.json"
    assert main(TRAIN + ["--json", str(missing)]) == 2
    assert "does not exist" in _one_line_error(capsys, "--json")
    assert main(TRAIN + ["--save", str(tmp_path)]) == 2
    assert "is a folder" in _one_line_error(capsys, "--save")
    assert list(tmp_path.iterdir()) == []  # the write probe left nothing behind


def test_argparse_type_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as info:
        main(TRAIN + ["--batch-size", "abc"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size" in err[0] and "'abc'" in err[0], err


def test_a_diverged_run_exits_with_its_own_status_and_still_writes_its_result(tmp_path,
                                                                              capsys):
    out = tmp_path / "r.json"
    code = main(["train", "--data", "digits", "--model", "mlp", "--width", "16", "--steps",
                 "3", "--lr", "1e30", "--momentum", "0", "--no-progress", "--json", str(out)])
    assert code == EXIT_DIVERGED == 3
    assert "DIVERGED" in capsys.readouterr().out
    assert json.loads(out.read_text())["diverged"] is True


def test_train_function_refuses_a_negative_clip_norm_that_would_reverse_the_gradient():
    model = torch.nn.Linear(2, 2)
    x, y = torch.randn(8, 2), torch.randint(0, 2, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^train: clip_grad_norm must be .*> 0.*got -1"):
        normlab.train.train(model, x, y, steps=2, clip_grad_norm=-1.0, progress=False)
    for k, v in before.items():
        assert torch.equal(v, model.state_dict()[k])


# ----------------------------------------------------------------------------- study --out


def test_study_out_onto_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("")
    assert main(["study", "--quick", "--no-grid", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("normlab study: error: --out") \
        and "is a file" in err[0], err


def test_study_out_where_nothing_can_be_written_is_one_line_and_exit_2(capsys):
    # /proc refuses new files even to root (a chmod-ed folder would not stop root).
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc as a folder nobody can write into")
    assert main(["study", "--quick", "--no-grid", "--out", "/proc/normlab-study"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out: cannot write into folder '/proc'" in err[0], err


def test_study_workers_must_not_be_negative(tmp_path, capsys):
    assert main(["study", "--quick", "--no-grid", "--workers", "-1",
                 "--out", str(tmp_path / "s")]) == 2
    assert "--workers" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("extra, seconds", [([], 60.0), (["--dist-timeout", "7.5"], 7.5)])
def test_dist_timeout_reaches_the_process_group(extra, seconds, monkeypatch):
    import datetime

    import torch.distributed as dist

    seen = {}

    class Stop(Exception):
        pass

    def fake_init(backend, **kwargs):
        seen.update(kwargs, backend=backend)
        raise Stop

    monkeypatch.setattr(dist, "init_process_group", fake_init)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(Stop):
        main(TRAIN + extra)
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=seconds)}
