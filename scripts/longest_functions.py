"""The longest functions of a source tree, for the 80-line rule of docs/design.md.

Lists every function and method (nested ones too) by its length in lines, from its
``def`` (decorators left out) to its last line, docstring included:

    .venv/bin/python scripts/longest_functions.py                  # the ten longest in src/
    .venv/bin/python scripts/longest_functions.py --top 20 src tests
    .venv/bin/python scripts/longest_functions.py --over 80 --exclude 'src/normlab/claims/*'

With ``--over N`` it lists every function longer than N lines instead and exits 1 if
there is one (``--exclude`` leaves out files by glob pattern).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import sys
from pathlib import Path


def functions(root: Path) -> list[tuple[int, str, int, str]]:
    """``(lines, path, line number, qualified name)`` of every function under ``root``."""
    found = []
    for path in sorted(root.rglob("*.py") if root.is_dir() else [root]):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        stack = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    length = child.end_lineno - child.lineno + 1
                    found.append((length, str(path), child.lineno, name))
                    stack.append((child, name + "."))
                elif isinstance(child, ast.ClassDef):
                    stack.append((child, f"{prefix}{child.name}."))
                else:
                    stack.append((child, prefix))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="*", default=["src"], help="folders or files (default src)")
    p.add_argument("--top", type=int, default=10, help="how many to list (default 10)")
    p.add_argument("--over", type=int, default=None,
                   help="list every function longer than this; exit 1 if any")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out files matching this pattern (repeatable)")
    args = p.parse_args(argv)
    rows = [r for root in args.roots for r in functions(Path(root))
            if not any(fnmatch.fnmatch(r[1], pat) for pat in args.exclude)]
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    shown = [r for r in rows if r[0] > args.over] if args.over is not None else rows[:args.top]
    for length, path, line, name in shown:
        print(f"{length:5d}  {path}:{line}  {name}")
    if args.over is not None:
        print(f"{len(shown)} function(s) over {args.over} lines")
        return 1 if shown else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
