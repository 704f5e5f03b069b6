"""SyncBatchNorm fails loudly across ranks: ranks that disagree on the channel count,
dtype, call number or mask raise the same ValueError on every rank (no gloo abort, no
forward on a wrong-sized buffer); a rank that skips a call or dies makes the other
fail within the process group's timeout, with an error naming the layer.

Two real gloo ranks, spawned once for the module (tests/_sync_header_workers.py);
the layers use a process group with a 3-second timeout and the whole run has a
deadline, so no test can wait for torch's 30-minute default.
"""

from __future__ import annotations

import os

import pytest
import torch

import _dist_workers as W  # tests/ is on sys.path under pytest
import _sync_header_workers as H


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sync_header"))
    W.launch(H.worker_header, 2, folder, timeout_s=120)
    return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False)
            for r in range(2)]


def _errors(ranks, key):
    got = [r[key] for r in ranks]
    assert all(g is not None for g in got), f"{key}: a rank did not raise: {got}"
    return got


def _same_error_on_every_rank(ranks, key, names, detail):
    got = _errors(ranks, key)
    for (kind, msg, _), name in zip(got, names, strict=True):
        assert kind == "ValueError", msg
        assert msg.startswith(f"{name}: the 2 ranks of the process group disagree on"), msg
        assert detail in msg and "Every rank raises this error" in msg, msg
    # the same text on both ranks, but for the layer's own name
    assert got[0][1].split(":", 1)[1] == got[1][1].split(":", 1)[1]


def test_channel_count_mismatch_raises_on_every_rank_and_changes_nothing(ranks):
    _same_error_on_every_rank(ranks, "channels", ["SyncBatchNorm(4)", "SyncBatchNorm(6)"],
                              "channel count (rank 0: 4, rank 1: 6)")
    assert all(r["channels_state_kept"] for r in ranks)


def test_dtype_mismatch_raises_on_every_rank(ranks):
    _same_error_on_every_rank(ranks, "dtype", ["SyncBatchNorm(4)"] * 2,
                              "dtype (rank 0: torch.float32, rank 1: torch.float64)")


def test_a_skipped_call_is_caught_by_the_call_number(ranks):
    _same_error_on_every_rank(ranks, "calls", ["SyncBatchNorm(4)"] * 2,
                              "call number (rank 0: 2, rank 1: 1)")


def test_mask_on_one_rank_only_raises_on_every_rank(ranks):
    _same_error_on_every_rank(ranks, "mask", ["SyncBatchNorm(4)"] * 2,
                              "mask given (rank 0: yes, rank 1: no)")


def test_protocol_layers_compare_the_header_too(ranks):
    _same_error_on_every_rank(ranks, "renorm", ["BatchRenorm(4)", "BatchRenorm(6)"],
                              "channel count (rank 0: 4, rank 1: 6)")


def test_after_refused_calls_the_group_still_gives_global_statistics(ranks):
    x = torch.cat([H.healthy_input(r) for r in range(2)])
    ref = torch.nn.BatchNorm1d(4)
    ref(x)
    for r in ranks:
        torch.testing.assert_close(r["healthy_running_mean"], ref.running_mean)


def test_a_rank_in_eval_makes_the_training_rank_fail_within_the_timeout(ranks):
    kind, msg, seconds = _errors(ranks[:1], "skipped")[0]
    assert kind == "RuntimeError", msg
    assert msg.startswith("SyncBatchNorm(4): the all_gather of batch statistics over 2 "
                          "ranks failed on rank 0"), msg
    assert "eval()" in msg and "timeout" in msg and "Backend error:" in msg, msg
    assert seconds < H.PG_TIMEOUT_S + 30  # the group's timeout, not torch's 30 minutes
    assert ranks[1]["skipped"] is None  # the eval rank itself does not communicate


def test_a_dead_peer_gives_an_error_naming_the_layer(ranks):
    kind, msg, seconds = _errors(ranks[:1], "peer_died")[0]
    assert kind == "RuntimeError", msg
    assert msg.startswith("SyncBatchNorm(4): the all_gather"), msg
    assert "died" in msg, msg
    assert seconds < H.PG_TIMEOUT_S + 30
