"""The study on a local Ray cluster (127.0.0.1, started and stopped by the test): the
same claims.json as the local workers, the driver the only writer."""

import json

import pytest

from normlab.claims.base import Budget, Claim
from normlab.claims.design import accuracy_or_chance, train_run
from normlab.claims.protocol import Effect
from normlab.study import run_study

ray = pytest.importorskip("ray", reason="Ray is the optional 'cluster' extra")

TINY = Budget("test", step_scale=1.0, seeds=2)


def measure_tiny(ctx) -> dict:
    def kwargs(norm, seed):
        return {"model": "mlp", "norm": norm, "data": "digits", "batch_size": 16,
                "lr": 0.05, "steps": 8, "seed": seed, "model_kwargs": {"width": 16}}
    bn = ctx.map(train_run, [kwargs("bn", s) for s in ctx.seeds])
    plain = ctx.map(train_run, [kwargs("none", s) for s in ctx.seeds])
    return {"effects": {"d": [100 * (accuracy_or_chance(a) - accuracy_or_chance(b))
                              for a, b in zip(bn, plain, strict=True)]}}


TINY_CLAIM = Claim(number=1, id="tiny_bn", title="tiny", statement="-", source="-",
                   setup="-", measure=measure_tiny,
                   effects=(Effect("d", "BN minus plain", "points", "greater"),))
VOLATILE = {"seconds", "cpu_seconds", "warnings", "runs_done", "runs_reused"}


def _claims(out):
    return [{k: v for k, v in r.items() if k not in VOLATILE}
            for r in json.loads((out / "claims.json").read_text())]


def test_ray_and_local_workers_give_the_same_claims_json(tmp_path):
    local = run_study(tmp_path / "local", budget=TINY, claims=[TINY_CLAIM], workers=2,
                      grid=False, log=lambda line: None)
    on_ray = run_study(tmp_path / "ray", budget=TINY, claims=[TINY_CLAIM], workers=2,
                       grid=False, log=lambda line: None, executor="ray")
    assert local["runs_done"] == on_ray["runs_done"] == 4
    assert _claims(tmp_path / "local") == _claims(tmp_path / "ray")
    meta = json.loads((tmp_path / "ray" / "study.json").read_text())
    assert meta["executor"] == "ray"
    assert not ray.is_initialized()  # the local cluster was stopped
