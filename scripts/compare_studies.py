"""Verdicts and interval half-widths of several study folders, side by side.

    python scripts/compare_studies.py DIR [DIR ...] [--names A B ...]

One row per claim: each study's verdict, then, for each claim effect, its estimate and
95% interval half-width in each study. The first study is the reference: a verdict
that differs from it is marked with '*', and one that contradicts it ("reproduced"
against "not reproduced") with '!'. Old-format records (no effects) show their
verdict only.
"""

import argparse
import json
from pathlib import Path

OPPOSITE = {("reproduced", "not reproduced"), ("not reproduced", "reproduced")}


def load(folder: Path) -> dict:
    return {r["number"]: r for r in json.loads((folder / "claims.json").read_text())}


def mark(verdict: str, reference: str) -> str:
    if (verdict, reference) in OPPOSITE:
        return verdict + " !"
    return verdict + (" *" if verdict != reference else "")


def effect_cells(records: list, key: str) -> list[str]:
    cells = []
    for rec in records:
        row = next((e for e in (rec or {}).get("effects") or [] if e["key"] == key), None)
        if row is None or row.get("estimate") is None:
            cells.append("-")
        elif row.get("half_width") is None:
            cells.append(f"{row['estimate']:.2f} (no interval)")
        else:
            cells.append(f"{row['estimate']:.2f} ±{row['half_width']:.2f}")
    return cells


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--names", nargs="+", default=None)
    args = ap.parse_args()
    names = args.names or [f.name for f in args.folders]
    studies = [load(f) for f in args.folders]
    numbers = sorted(set().union(*studies))
    print("| claim | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    contradictions = differences = 0
    for n in numbers:
        recs = [s.get(n) for s in studies]
        ref = recs[0]["verdict"] if recs[0] else "-"
        cells = [mark(r["verdict"], ref) if r else "-" for r in recs]
        differences += sum(c.endswith("*") for c in cells)
        contradictions += sum(c.endswith("!") for c in cells)
        title = next(r for r in recs if r)["id"]
        print(f"| {n} {title} | " + " | ".join(cells) + " |")
        with_effects = next((r for r in recs if r and r.get("effects")), {})
        keys = [e["key"] for e in with_effects.get("effects") or [] if e.get("role") == "claim"]
        for key in keys:
            print(f"|   {key} | " + " | ".join(effect_cells(recs, key)) + " |")
    print(f"\n{len(numbers)} claims; verdicts differing from {names[0]}: {differences}; "
          f"contradicting it: {contradictions}")


if __name__ == "__main__":
    main()
