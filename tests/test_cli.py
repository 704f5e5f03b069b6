"""The `normlab` command and `python -m normlab`."""

import subprocess
import sys

import pytest

from normlab import list_norms
from normlab.cli import main


def test_python_dash_m_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "normlab", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "usage: normlab" in out
    for command in ("list", "demo"):
        assert command in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: normlab" in capsys.readouterr().out


def test_list_prints_every_registered_norm(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in list_norms():
        assert name in out


@pytest.mark.parametrize("command", ["list", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: normlab {command}" in capsys.readouterr().out
