"""Measure one claim in this process and print its verdict, effects and cost.

    python scripts/run_claim.py gn_batch_stable [--budget default|quick] [--out DIR]

Runs are stored (content-keyed) under DIR/runs (default /tmp/normlab-claim-<id>), so a
second call reuses them. For developing a claim; the study runs claims in parallel.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from normlab.claims import BUDGETS, RunContext, get_claim
from normlab.claims.protocol import judge


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("claim")
    ap.add_argument("--budget", default="default", choices=sorted(BUDGETS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", action="store_true", help="also write the claim's plots")
    args = ap.parse_args()
    torch.set_num_threads(1)
    claim = get_claim(args.claim)
    out = Path(args.out or f"/tmp/normlab-claim-{claim.id}")
    budget = BUDGETS[args.budget]
    ctx = RunContext(claim.id, budget, out)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    measured = claim.measure(ctx)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    record = judge(claim, measured, budget.decisive)
    print(f"[{claim.number}] {claim.id} ({budget.name}): {record['verdict']}")
    print(record["reason"])
    print("takeaway:", record["takeaway"])
    print(f"runs computed {ctx.runs_done}, reused {ctx.runs_reused}; "
          f"CPU {cpu:.1f} s, wall {wall:.1f} s")
    if args.plot and claim.plot is not None:
        (out / "plots").mkdir(parents=True, exist_ok=True)
        print("plots:", claim.plot(json.loads(json.dumps(measured)), out / "plots"))


if __name__ == "__main__":
    main()
