"""README.md stays true: its Python example runs, and its commands exist."""

import re
from pathlib import Path

from normlab.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert "GroupNorm(64, num_groups=32" in capsys.readouterr().out


def test_readme_normlab_commands_exist():
    commands = set(re.findall(r"^normlab (\w+)", README.read_text(), re.M))
    commands |= set(re.findall(r"`normlab (\w+)", README.read_text()))
    subparsers = build_parser()._subparsers._group_actions[0].choices
    assert commands and commands <= set(subparsers), commands - set(subparsers)
