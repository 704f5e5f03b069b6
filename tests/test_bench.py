"""normlab.bench and `normlab bench`: the records it writes, the peers it measures in
the same cell, the bytes-saved counter, and the command line. Tiny shapes only; the
layers with a fused implementation are run only by the test marked ``kernels``."""

from __future__ import annotations

import json

import pytest
import torch

from normlab import bench
from normlab.cli import main

KEYS = {"layer", "impl", "shape", "dtype", "layout", "mode", "pass", "median_ms",
        "ratio_to_torch", "gbps", "peak_saved_bytes"}


@pytest.fixture(scope="module")
def small_run():
    return bench.run(layers=["ChannelLayerNorm", "OnlineNorm", "InstanceNorm"],
                     shapes=[(4, 32, 3, 3)], dtypes=["float32"], repeats=2, warmup=1,
                     comparisons=False)


def test_records_cover_the_grid_with_peers_and_copy(small_run):
    recs = small_run.records
    assert all(set(r) >= KEYS for r in recs)
    cells = {(r["layer"], r["layout"], r["mode"], r["pass"]) for r in recs}
    # ChannelLayerNorm/InstanceNorm: train only (eval is the same math); OnlineNorm: both.
    assert len(cells) == 2 * 2 * 1 * 2 + 2 * 2 * 2
    for layer, peers in (("ChannelLayerNorm", {"normlab", "normlab-reference", "torch",
                                               "composite", "copy"}),
                         ("OnlineNorm", {"normlab", "loop", "copy"})):
        impls = {r["impl"] for r in recs if r["layer"] == layer}
        assert impls == peers
    assert all(r["median_ms"] is not None and r["median_ms"] > 0 for r in recs), \
        [r for r in recs if r["error"]]


def test_ratios_and_bandwidth_are_computed_from_the_medians(small_run):
    recs = small_run.records
    for r in recs:
        cell = [q for q in recs if all(q[k] == r[k] for k in ("layer", "shape", "dtype",
                                                              "layout", "mode", "pass"))]
        torch_rec = next((q for q in cell if q["impl"] == "torch"), None)
        if torch_rec is None or r["impl"] == "copy":
            assert r["ratio_to_torch"] is None
        else:
            assert r["ratio_to_torch"] == pytest.approx(
                torch_rec["median_ms"] / r["median_ms"], rel=1e-3, abs=1e-4)
        numel = 4 * 32 * 9
        moved = numel * 4 * (2 if r["pass"] == "fwd" or r["impl"] == "copy" else 5)
        assert r["gbps"] == pytest.approx(moved / (r["median_ms"] * 1e-3) / 1e9, rel=1e-2)


def test_saved_bytes_only_for_backward_cells(small_run):
    for r in small_run.records:
        if r["pass"] == "fwd+bwd" and r["impl"] != "copy":
            assert r["peak_saved_bytes"] > 0
        else:
            assert r["peak_saved_bytes"] is None


def test_fused_implementations_are_declared():
    """GroupNorm's and LayerNorm's implementations: the fused one needs the kernels and
    is not train-only (group norm has no running statistics: eval is the same math)."""
    impls = {name: set(spec.impls) for name, spec in bench.LAYERS.items()}
    assert impls["GroupNorm"] == {"normlab", "normlab-fused", "normlab-reference", "torch",
                                  "composite"}
    assert impls["LayerNorm"] == impls["GroupNorm"]
    for name in ("GroupNorm", "LayerNorm"):
        assert bench.LAYERS[name].needs_kernels == ("normlab-fused",)
        assert bench.LAYERS[name].train_only_impls == ()


@pytest.mark.kernels
def test_fused_group_and_layer_norm_are_measured_against_torch():
    res = bench.run(layers=["GroupNorm", "LayerNorm"], shapes=[(2, 32, 3, 3)],
                    dtypes=["float32"], modes=["train"], passes=["fwd+bwd"], repeats=1,
                    warmup=1, comparisons=False)
    assert res.meta["kernels"]["available"]
    fused = [r for r in res.records if r["impl"] == "normlab-fused"]
    assert {(r["layer"], r["layout"]) for r in fused} == {
        (layer, layout) for layer in ("GroupNorm", "LayerNorm")
        for layout in ("nchw", "channels_last")}
    assert all(r["error"] is None and r["ratio_to_torch"] > 0 for r in fused), fused


def test_saved_bytes_counts_distinct_storages():
    x = torch.randn(10, 20, requires_grad=True)
    w = torch.randn(20, requires_grad=True)
    assert bench.saved_bytes(lambda: x * w) == x.nbytes + w.nbytes  # mul saves both
    assert bench.saved_bytes(lambda: x * x) == x.nbytes  # the same storage once
    assert bench.saved_bytes(lambda: x + w) == 0  # add saves nothing
    bn = torch.nn.BatchNorm1d(20)
    # torch's batch norm keeps its input (and the per-channel statistics and weight)
    kept = bench.saved_bytes(lambda: bn(x))
    assert x.nbytes <= kept <= x.nbytes + 8 * 20 * 4


def test_json_is_a_list_of_records_and_markdown_has_the_table(small_run, tmp_path):
    path = tmp_path / "b.json"
    small_run.to_json(str(path))
    data = json.loads(path.read_text())
    assert isinstance(data, list) and len(data) == len(small_run.records)
    md = small_run.to_markdown()
    assert "| layer | shape |" in md and "ChannelLayerNorm" in md and "intra-op thread" in md


def test_unknown_layer_and_bad_shape_are_named():
    with pytest.raises(ValueError, match="unknown layers.*Nope"):
        bench.run(layers=["Nope"], comparisons=False)
    with pytest.raises(ValueError, match="bad shape"):
        bench.parse_shape("32xx")
    assert bench.parse_shape("2x3x4") == (2, 3, 4)


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["bench", "--layers", "SELU", "RMSNorm", "--shapes", "2x4x3x3", "--repeats", "1",
               "--dtypes", "float32", "--layouts", "nchw", "--no-comparisons", "--json", str(js),
               "--md", str(md)])
    assert rc == 0
    recs = json.loads(js.read_text())
    assert {r["layer"] for r in recs} == {"SELU", "RMSNorm"}
    assert {r["pass"] for r in recs} == {"fwd", "fwd+bwd"}
    assert "| SELU |" in md.read_text()
    assert main(["bench", "--shapes", "0x"]) == 2
    assert "bad shape" in capsys.readouterr().err
