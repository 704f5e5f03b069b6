"""torch.export and ONNX export of every normlab layer in eval mode.

* torch.export.export: the exported program gives the layer's outputs, on the input
  it was traced with and on another input of the same shape (so nothing data-dependent
  was frozen into the graph).
* torch.onnx.export (the dynamo exporter, which needs the ``onnx`` and ``onnxscript``
  packages): the ONNX model, run by onnxruntime, gives PyTorch's outputs within 1e-5.

Each layer is first trained for two batches, so that its running statistics (and
BN-LSTM's per-step ones) are not the initial values. The ONNX tests need the optional
extra ``export`` (``pip install -e ".[export]"``, installed by the Makefile) and are
skipped, naming the missing package, only when it is not importable.

Slow (a few seconds per layer): ``make test-slow`` or ``pytest -m slow``.
"""

from __future__ import annotations

import pytest
import torch

from project.test_portability import CASE_IDS, CASES, tensors, warm

pytestmark = pytest.mark.slow


def _require(module: str):
    return pytest.importorskip(
        module, reason=f"ONNX export tests need the optional package {module!r}: "
        "pip install -e '.[export]'"
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_torch_export_eval(case):
    m = warm(case).eval()
    x = case.input(seed=1)
    program = torch.export.export(m, (x,))
    exported = program.module()
    for inp in (x, case.input(seed=2)):
        with torch.no_grad():
            expected = tensors(m(inp))
            got = tensors(exported(inp))
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_onnx_export_eval_matches_onnxruntime(case):
    _require("onnx")
    _require("onnxscript")
    ort = _require("onnxruntime")
    m = warm(case).eval()
    x = case.input(seed=1)
    program = torch.onnx.export(m, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (feed,) = session.get_inputs()
    for inp in (x, case.input(seed=2)):
        with torch.no_grad():
            expected = tensors(m(inp))
        got = session.run(None, {feed.name: inp.numpy()})
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(torch.from_numpy(a), b, rtol=0, atol=1e-5)
