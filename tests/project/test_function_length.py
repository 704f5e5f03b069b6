"""No function in src/ longer than 80 lines (docs/design.md, conventions), measured as
scripts/longest_functions.py measures it: from the ``def`` to the last line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import normlab

REPO = Path(__file__).resolve().parents[2]
SRC = Path(normlab.__file__).parent
LIMIT = 80


def _script():
    spec = importlib.util.spec_from_file_location(
        "longest_functions", REPO / "scripts" / "longest_functions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_function_over_80_lines():
    rows = _script().functions(SRC)
    assert len(rows) > 500  # the walk found the package's functions
    long = [(n, Path(p).relative_to(SRC).as_posix(), line, name) for n, p, line, name in rows
            if n > LIMIT]
    assert long == []


def test_the_script_measures_def_to_last_line_and_nested_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("@decorator\ndef a():\n    x = 1\n\n    def b():\n        return x\n"
                 "    return b\n\n\nclass C:\n    def m(self):\n        pass\n")
    assert sorted(_script().functions(f)) == [(2, str(f), 5, "a.b"), (2, str(f), 11, "C.m"),
                                              (6, str(f), 2, "a")]
