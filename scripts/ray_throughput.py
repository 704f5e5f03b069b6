"""Throughput of the study's runs on a local Ray cluster with 1, 2 and 4 workers, and
a model of a full study's time on N machines.

    python scripts/ray_throughput.py [--claims gn_batch_stable] [--budget quick]
        [--workers 1 2 4] [--study DIR]

Each worker count runs the same claims from an empty folder (so every run is
computed) and reports runs per second of wall time. With ``--study DIR`` (a finished
study), the model uses that study's stored runs: the total CPU seconds C, the longest
single run L, and the number of cores c of a machine; N machines take about
``C / (N c) + L`` (work spread evenly, plus the tail of the last run), which ignores
the driver's replay time and assumes the claims' dependency chains are short next to
C / (N c).
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from normlab.study import run_study


def measure(claims, budget, workers) -> tuple[float, int]:
    out = Path(tempfile.mkdtemp(prefix=f"normlab-ray-{workers}-"))
    try:
        t0 = time.perf_counter()
        summary = run_study(out, budget=budget, claims=claims, workers=workers, grid=False,
                            executor="ray", log=lambda line: None)
        return time.perf_counter() - t0, summary["runs_done"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def model(study: Path, cores: int) -> None:
    runs = [json.loads(p.read_text()) for p in (study / "runs").glob("*.json")]
    cpu = [float(r.get("cpu_seconds") or 0.0) for r in runs]
    total, longest = sum(cpu), max(cpu)
    print(f"\n{study}: {len(runs)} runs, {total:.0f} CPU-s in all, longest run {longest:.1f} s")
    print("machines  cores  modelled wall time")
    for n in (1, 2, 4, 8, 16):
        print(f"{n:8d}  {n * cores:5d}  {total / (n * cores) + longest:8.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--claims", nargs="+", default=["gn_batch_stable"])
    ap.add_argument("--budget", default="quick")
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--study", type=Path, default=None)
    ap.add_argument("--cores", type=int, default=2, help="cores of one machine in the model")
    args = ap.parse_args()
    print("workers  runs  wall s  runs/s")
    for w in args.workers:
        wall, runs = measure(args.claims, args.budget, w)
        print(f"{w:7d}  {runs:4d}  {wall:6.1f}  {runs / wall:6.2f}")
    if args.study:
        model(args.study, args.cores)


if __name__ == "__main__":
    main()
