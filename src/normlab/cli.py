"""The ``normlab`` command (also ``python -m normlab``).

Each subcommand is a pair: ``_add_NAME(subparsers)`` declares its arguments and
``_run_NAME(args)`` runs it, importing what it needs only then, so ``normlab --help``
stays fast.
"""

from __future__ import annotations

import argparse
import sys

from normlab import __version__


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list the normalization layers create_norm knows")
    p.set_defaults(run=_run_list)


def _run_list(args) -> int:
    from normlab.registry import _SPECS

    for spec in _SPECS.values():
        aliases = ", ".join(spec.aliases)
        print(f"{spec.name:16s} {spec.description}" + (f"  [aliases: {aliases}]" if aliases else ""))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small CNN on real digits with several norms and batch sizes (~1 min)",
        description="A short, real comparison of normalization layers: a small CNN on "
        "scikit-learn's 8x8 handwritten digits, trained with each norm at a small and "
        "a normal batch size, reporting test accuracy.",
    )
    p.add_argument("--norms", nargs="+", default=["none", "bn", "gn", "ln"],
                   help="normalization names (see `normlab list`)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 32])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from normlab.demo import run_demo

    run_demo(norms=args.norms, batch_sizes=args.batch_sizes, steps=args.steps, lr=args.lr,
             seed=args.seed)
    return 0


_COMMANDS = [_add_list, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab",
        description="normlab: normalization layers for deep networks, and a lab that "
        "re-runs their papers' claims.",
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
