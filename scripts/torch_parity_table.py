"""Print the table of issue 14: torch's module_db/op_db cases for its normalization
layers and ops, run through torch and normlab (tests/_torch_parity.py), per module or op:
cases, agree, refused by design, disagree; then every case that is not "agree".

    PYTHONPATH=src python scripts/torch_parity_table.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import _torch_parity as tp  # noqa: E402

torch.set_num_threads(1)
samples = tp.generate_samples()
totals = {"cases": 0, "agree": 0, "refused": 0, "disagree": 0}
rows, notes = {}, []
for case in tp.cases(samples):
    result = tp.outcome(case)
    row = rows.setdefault(case.sample["name"], dict.fromkeys(totals, 0))
    kind = result.split(":")[0]
    for r in (row, totals):
        r["cases"] += 1
        r[kind] += 1
    if kind != "agree":
        notes.append(f"  {case.id}: {result}")
print(f"{'module / op':32} {'cases':>6} {'agree':>6} {'refused':>8} {'disagree':>9}")
for name, r in [*rows.items(), ("total", totals)]:
    print(f"{name:32} {r['cases']:6} {r['agree']:6} {r['refused']:8} {r['disagree']:9}")
print("\nrefusals by design:")
for _, error, pattern, reason in tp.REFUSALS:
    print(f"  {error.__name__} /{pattern}/: {reason}")
print("\nnot agreeing:")
print("\n".join(notes) or "  none")
