"""`normlab study --scale paper`: the papers' setups on CIFAR-10 read from a folder,
tested on generated CIFAR-format batches at a tiny budget (claim 8 end to end, the
claims without a paper setup reported as not run at this scale, the CLI's errors), and
the crop-and-flip augmentation the paper setups train with."""

import json

import pytest
import torch
from torch import nn

from _cifar import TINY
from _cifar import write_cifar as _write_cifar
from normlab import data
from normlab.claims.base import Claim, make_spec
from normlab.claims.design import split, train_run
from normlab.cli import main
from normlab.study import run_study
from normlab.train import crop_flip, train

# --------------------------------------------------------------------------- crop_flip


def _candidates(img: torch.Tensor, pad: int) -> list[tuple[int, int, bool, torch.Tensor]]:
    """Every crop of the zero-padded image at every offset, flipped or not (loops, from
    the definition)."""
    _, h, w = img.shape
    padded = torch.zeros(img.shape[0], h + 2 * pad, w + 2 * pad, dtype=img.dtype)
    padded[:, pad:pad + h, pad:pad + w] = img
    out = []
    for a in range(2 * pad + 1):
        for b in range(2 * pad + 1):
            crop = padded[:, a:a + h, b:b + w]
            out += [(a, b, False, crop), (a, b, True, crop.flip(-1))]
    return out


def test_crop_flip_gives_a_crop_of_the_padded_image_at_every_offset_flipped_half_the_time():
    pad, n = 2, 200
    x = torch.rand(n, 3, 6, 5, generator=torch.Generator().manual_seed(1)) + 1.0
    y = crop_flip(x, torch.Generator().manual_seed(0), pad=pad)
    assert y.shape == x.shape
    seen = []
    for i in range(n):
        match = [(a, b, f) for a, b, f, c in _candidates(x[i], pad) if torch.equal(c, y[i])]
        assert len(match) == 1, i  # exactly one crop/flip of image i, never another image
        seen.append(match[0])
    assert {(a, b) for a, b, _ in seen} == {(a, b) for a in range(5) for b in range(5)}
    flipped = sum(f for _, _, f in seen) / n
    assert 0.35 < flipped < 0.65
    # reproducible from the generator, and pad=0 leaves only the image or its mirror
    assert torch.equal(crop_flip(x, torch.Generator().manual_seed(0), pad=pad), y)
    z = crop_flip(x, torch.Generator().manual_seed(3), pad=0)
    assert all(torch.equal(z[i], x[i]) or torch.equal(z[i], x[i].flip(-1)) for i in range(n))


def test_crop_flip_bad_input():
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"crop_flip: expected images \(N, C, H, W\), got"):
        crop_flip(torch.zeros(4, 8), g)
    with pytest.raises(ValueError, match="crop_flip: pad must be an int >= 0, got -1"):
        crop_flip(torch.zeros(1, 1, 4, 4), g, pad=-1)


class _Recorder(nn.Module):
    """A linear classifier that keeps every training input it is given."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 6 * 6, 4)
        self.inputs = []

    def forward(self, x):
        if self.training:
            self.inputs.append(x.detach().clone())
        return self.fc(x.flatten(1))


def test_train_augment_crops_each_batch_and_keeps_the_batch_order():
    x = torch.rand(24, 3, 6, 6, generator=torch.Generator().manual_seed(0)) + 1.0
    y = torch.arange(24) % 4
    plain, aug = _Recorder(), _Recorder()
    train(plain, x, y, steps=2, batch_size=6, seed=5, progress=False)
    result = train(aug, x, y, steps=2, batch_size=6, seed=5, progress=False,
                   augment="crop_flip")
    assert result.config["augment"] == "crop_flip"
    changed = 0
    for originals, seen in zip(plain.inputs, aug.inputs, strict=True):
        for orig, img in zip(originals, seen, strict=True):
            assert any(torch.equal(c, img) for *_, c in _candidates(orig, 4))
            changed += not torch.equal(orig, img)
    assert changed > 6  # most of the 12 images seen were moved or mirrored


def test_train_augment_bad_input_changes_nothing():
    model = nn.Linear(8, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 8), torch.arange(8) % 2
    with pytest.raises(ValueError, match=r"train: augment='crop_flip' needs images"):
        train(model, x, y, steps=2, batch_size=4, progress=False, augment="crop_flip")
    with pytest.raises(ValueError, match="train: augment must be None or one of"):
        train(model, x, y, steps=2, batch_size=4, progress=False, augment="mixup")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- data


def test_split_reads_cifar10_from_data_dir_official_test_set_val_by_seed(tmp_path):
    root = _write_cifar(tmp_path / "cifar", per_class=2)
    ref = data.load_cifar10(root)
    fit0, (xv0, yv0) = split("cifar10", 0, data_dir=str(root))
    fit1, (xv1, _) = split("cifar10", 1, data_dir=str(root))
    assert torch.equal(fit0.x_test, ref.x_test) and torch.equal(fit0.y_test, ref.y_test)
    assert fit0.num_train + len(xv0) == ref.num_train == 100
    assert sorted(yv0.tolist()) == [c for c in range(10) for _ in range(2)]  # stratified
    # fit and validation partition the official training set
    rows = {tuple(r) for r in ref.x_train.flatten(1).tolist()}
    parts = [tuple(r) for r in torch.cat([fit0.x_train, xv0]).flatten(1).tolist()]
    assert len(set(parts)) == len(parts) and set(parts) == rows
    assert not torch.equal(xv0, xv1)  # the seed draws the validation part


# --------------------------------------------------------------------------- the study


def _never(ctx):
    raise AssertionError("a claim without a paper setup was measured at the paper scale")


#: A claim with the default scales (small only), as every claim but 8 and 15 is today.
SMALL_ONLY = Claim(number=30, id="small_only", title="small only", statement="s", source="src",
                   setup="set", measure=_never)


def test_paper_scale_study_measures_claim8_and_reports_the_others_not_run(tmp_path):
    root = _write_cifar(tmp_path / "cifar")
    lines = []
    summary = run_study(tmp_path / "out", budget=TINY, claims=[8, SMALL_ONLY], workers=0,
                        scale="paper", data_dir=root, log=lines.append)
    by_id = {r["id"]: r for r in summary["claims"]}
    gn = by_id["gn_batch_stable"]
    assert gn["error"] is None and gn["scale"] == "paper"
    assert gn["plot_error"] is None and gn["plots"]
    assert gn["verdict"] == "inconclusive"  # the test budget decides nothing
    assert gn["setup"].startswith("ResNet-20") and "CIFAR-10" in gn["setup"]
    # the small setup's notes and the old protocol's noise figure are not this scale's
    assert (gn["setup_change"], gn["scale_note"], gn["width_note"]) == ("", "", "")
    assert all(e["previous_noise"] is None for e in gn["effects"])
    assert gn["criterion_change"] is not None  # the criterion is the same at both scales
    acc = gn["measured"]["acc"]
    assert set(acc) == {"gn_b2", "gn_b32", "bn_b2", "bn_b32"}
    assert all(len(v) == 2 and all(0 <= a <= 100 for a in v) for v in acc.values())
    assert gn["measured"]["lr"] == {"gn_b2": 0.0015625, "bn_b2": 0.0015625,
                                    "gn_b32": 0.025, "bn_b32": 0.025}
    # every run read the folder, trained ResNet-20 with the paper's recipe, and the folder
    # is in its key: the same run at the small scale (no data_dir) has another key
    for name in gn["run_files"]:
        stored = json.loads((tmp_path / "out" / "runs" / name).read_text())
        kw = stored["kwargs"]
        assert kw["data_dir"] == str(root.resolve()) and kw["model"] == "resnet"
        assert kw["model_kwargs"] == {"width": 16, "depth": 3}
        assert kw["train_kwargs"]["augment"] == "crop_flip"
        cfg = stored["result"]["config"]
        assert (cfg["schedule"], cfg["weight_decay"], cfg["momentum"]) == ("cosine", 1e-4, 0.9)
        assert cfg["num_train"] == 40 and cfg["num_test"] == 10
        small = {k: v for k, v in kw.items() if k != "data_dir"}
        assert make_spec(train_run, small).key != stored["key"]
    assert len(gn["run_files"]) == 8  # 4 arms x 2 seeds
    # a claim without a paper setup: a record, a log line and a report line, not an error
    other = by_id["small_only"]
    assert other["verdict"] == "not run at this scale" and other["error"] is None
    assert any("small_only: not run at this scale (paper" in line for line in lines)
    assert any(line.startswith("grid: not run at this scale") for line in lines)
    assert summary["grid"] is None and not (tmp_path / "out" / "grid.json").exists()
    meta = json.loads((tmp_path / "out" / "study.json").read_text())
    assert (meta["scale"], meta["data_dir"]) == ("paper", str(root.resolve()))
    assert meta["not_run_at_scale"] == ["small_only"]
    assert "--scale paper --data-dir" in meta["command"]
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "re-run at the papers' scale" in readme
    assert "- **scale:** paper (the papers' setups" in readme
    assert "### Not run at this scale" in readme
    assert "previous noise" not in readme and "Interval not halved" not in readme
    assert "What changed in the setup" not in readme and "**Scale.**" not in readme
    assert "Not run at this scale (no setup at the study's scale): claim 30." in readme
    claims_json = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert {r["id"]: r["scale"] for r in claims_json} == {"small_only": "paper",
                                                          "gn_batch_stable": "paper"}
    # the same study again computes nothing: every run is found under its key
    again = run_study(tmp_path / "out", budget=TINY, claims=[8, SMALL_ONLY], workers=0,
                      scale="paper", data_dir=root, log=lambda line: None)
    assert (again["runs_done"], again["runs_reused"]) == (0, 8)
    assert again["claims"][0]["measured"] == gn["measured"]


def test_cli_passes_the_scale_and_the_folder_to_the_study(tmp_path, monkeypatch, capsys):
    import normlab.study

    seen = {}

    def fake_run_study(out, **kwargs):
        seen.update(kwargs)
        return {"claims": [], "wall_seconds": 0.0, "runs_done": 0, "runs_reused": 0,
                "report": str(out)}

    monkeypatch.setattr(normlab.study, "run_study", fake_run_study)
    folder = str(tmp_path / "cifar")
    assert main(["study", "--scale", "paper", "--data-dir", folder, "--out", "o"]) == 0
    assert (seen["scale"], seen["data_dir"]) == ("paper", folder)
    assert "--scale paper --data-dir " + folder in seen["command"]
    assert main(["study", "--out", "o"]) == 0
    assert (seen["scale"], seen["data_dir"]) == ("small", None)


@pytest.mark.parametrize("args,expected", [
    (["--scale", "paper"], "--scale paper needs --data-dir DIR"),
    (["--scale", "paper", "--data-dir", "{empty}"], "holds no CIFAR-10 python batches "
                                                    "(missing data_batch_1"),
    (["--data-dir", "{cifar}"], "--data-dir is read at --scale paper only"),
])
def test_cli_scale_errors_are_one_line_and_exit_2(tmp_path, capsys, args, expected):
    (tmp_path / "empty").mkdir()
    _write_cifar(tmp_path / "cifar")
    args = [a.format(empty=tmp_path / "empty", cifar=tmp_path / "cifar") for a in args]
    out = tmp_path / "out"
    assert main(["study", *args, "--out", str(out), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and err.startswith("normlab study: ")
    assert not out.exists()  # refused before anything was written


def test_small_scale_is_the_default_and_recorded(tmp_path):
    from normlab.claims.protocol import Effect

    def measure(ctx):
        return {"effects": {"d": [1.0 + ctx.seeds[i] * 0.1 for i in range(2)]},
                "scale": ctx.scale, "data_dir": ctx.data_dir}

    claim = Claim(number=1, id="fake", title="t", statement="s", source="src", setup="set",
                  measure=measure, effects=(Effect("d", "d", "u", "greater", 0.0),))
    summary = run_study(tmp_path / "out", budget=TINY, claims=[claim], workers=0, grid=False,
                        log=lambda line: None)
    rec = summary["claims"][0]
    assert (rec["scale"], rec["measured"]["scale"], rec["measured"]["data_dir"]) == \
        ("small", "small", None)
    meta = json.loads((tmp_path / "out" / "study.json").read_text())
    assert meta["scale"] == "small" and meta["not_run_at_scale"] == []
    assert "- **scale:** small" in (tmp_path / "out" / "README.md").read_text()
