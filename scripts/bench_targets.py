"""Issue 7's acceptance targets for normlab's speed and memory, checked on this machine.

The library measures (normlab.bench: the grid of cells, and the head-to-head
comparisons of ``normlab.bench.measure_comparisons``, each a ratio "peer's time, or
bytes, over normlab's"); what those ratios had to reach is the issue's, and lives here.
The script runs the default-path layers' grid and the comparisons, then prints one row
per target: measured, threshold, met.

    .venv/bin/python scripts/bench_targets.py            # the default grid (minutes)
    .venv/bin/python scripts/bench_targets.py --quick    # one shape, 5 repeats (~1 min)

Exit status 1 if a target is not met.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys

from normlab import bench

# comparison id pattern -> (threshold on the measured ratio, what issue 7 asked for).
# Every ratio is peer / normlab, so "within k x of BatchNorm" is a ratio of 1/k or more.
TARGETS = {
    "default_path/*": (0.95, "default paths not slower than torch.nn (5% for noise)"),
    "fused_batch_norm/nchw": (1.5, "fused BatchNorm 1.5x torch.nn, NCHW"),
    "fused_batch_norm/channels_last": (2.0, "fused BatchNorm 2x torch.nn, channels_last"),
    "online*/loop/*": (10.0, "Online Norm 10x its per-sample loop"),
    "online*/*_bn": (1 / 3, "Online Norm within 3x of BatchNorm"),
    "SwitchableNorm/*": (0.5, "Switchable Norm within 2x of BatchNorm"),
    "AttentiveNorm/*": (0.5, "Attentive Norm within 2x of BatchNorm"),
    "memory/save_memory": (1.0 + 1e-9, "save_memory keeps fewer bytes than torch"),
}
DEFAULT_PATH_LAYERS = ["BatchNorm", "GroupNorm", "LayerNorm", "InstanceNorm"]


def judge(comparisons: list[dict]) -> list[dict]:
    """Each comparison with a target, with its ``threshold``, ``asked`` and ``met``."""
    rows = []
    for c in comparisons:
        for pattern, (threshold, asked) in TARGETS.items():
            if fnmatch.fnmatchcase(c["id"], pattern):
                rows.append(dict(c, threshold=round(threshold, 3), asked=asked,
                                 met=c["measured"] >= threshold))
                break
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one shape, 5 repeats")
    args = p.parse_args(argv)
    result = bench.run(layers=DEFAULT_PATH_LAYERS,
                       shapes=bench.QUICK_SHAPES if args.quick else None,
                       repeats=5 if args.quick else 15, warmup=1 if args.quick else 2,
                       progress=lambda s: print(f"bench_targets: {s}", flush=True))
    rows = judge(result.comparisons)
    print("| target | comparison | measured | threshold | met | detail |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['asked']} | {r['comparison']} | {r['measured']} | {r['threshold']} | "
              f"{'yes' if r['met'] else 'NO'} | {r['detail']} |")
    return 0 if all(r["met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
