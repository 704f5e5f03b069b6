"""``docs/choosing.md``: which normalization to use, with the lab's evidence.

The page has two parts. The prose (what each method normalises, when to use it and when
not, its costs) is Markdown shipped with the package, one file per method in
``normlab/guide/methods/`` (``NN_key.md``: a front matter of ``key: value`` lines, then
one ``## heading`` section per field; ``NN`` orders the page) and a few page-wide texts
in ``normlab/guide/``. The evidence is not typed: :func:`generate` fills it in from the
JSON the lab writes, the claim records of a study (``claims.json``, from
``normlab study``) and the speed ratios of a benchmark (the records of
``normlab bench --json``). Without them, the evidence reads "not measured yet". The
command::

    normlab docs --study normlab-study --bench bench.json --out docs/choosing.md

regenerates the page; edit the Markdown in ``src/normlab/guide/``, not the page.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

__all__ = ["METHODS", "load_methods", "load_claims", "load_bench", "bench_summary",
           "generate", "write"]

NOT_MEASURED = "not measured yet"

# The front-matter keys of a method file (the last three are comma-separated lists) and
# its sections, heading -> key.
_META = ("title", "paper", "build", "norms", "claims", "bench")
_LISTS = ("norms", "claims", "bench")
_SECTIONS = {"Normalises": "normalises", "Use it for": "use", "Avoid it for": "avoid",
             "Costs": "costs", "torch.compile, export, autocast": "portability"}


def _guide(name: str) -> str:
    return (resources.files("normlab") / "guide" / name).read_text(encoding="utf-8")


def _unwrap(text: str) -> str:
    """Each paragraph of ``text`` on one line (headings, lists, tables and code as they
    are), so that the page does not depend on how the source was wrapped."""
    blocks = []
    for block in text.strip().split("\n\n"):
        verbatim = block.lstrip().startswith(("#", "-", "|", "```", "<"))
        blocks.append(block if verbatim else " ".join(block.split()))
    return "\n\n".join(blocks)


def _parse_method(name: str, text: str) -> dict:
    """A method file's front matter and sections as the dict :data:`METHODS` holds."""
    lines = text.splitlines()
    if not lines or lines[0] != "---" or "---" not in lines[1:]:
        raise ValueError(f"normlab.docs: guide/methods/{name} must start with a front "
                         "matter between two '---' lines")
    end = lines.index("---", 1)
    m: dict = {}
    for line in lines[1:end]:
        key, _, value = line.partition(":")
        value = value.strip()
        m[key.strip()] = ([v.strip() for v in value.split(",") if v.strip()]
                          if key.strip() in _LISTS else value)
    field, body = None, []
    for line in lines[end + 1:] + ["## "]:
        if line.startswith("## "):
            if field is not None:
                m[field] = _unwrap("\n".join(body))
            heading = line[3:].strip()
            field, body = _SECTIONS.get(heading, heading or None), []
        else:
            body.append(line)
    missing = [f for f in (*_META, *_SECTIONS.values()) if f not in m]
    if missing:
        raise ValueError(f"normlab.docs: guide/methods/{name} lacks {missing}")
    return m


def load_methods() -> dict[str, dict]:
    """The hand-written part of the page, ``{key: method}`` in page order, from
    ``normlab/guide/methods/NN_key.md``. A method's keys: ``title``, ``paper``,
    ``build`` (how to get it), ``normalises``, ``use``, ``avoid``, ``costs``,
    ``portability`` (torch.compile / export / autocast notes), ``claims`` (ids of the
    lab's claims about it), ``bench`` (its names in ``normlab bench``), ``norms`` (its
    names in :func:`normlab.list_norms`, if any)."""
    folder = resources.files("normlab") / "guide" / "methods"
    names = sorted(f.name for f in folder.iterdir() if f.name.endswith(".md"))
    return {n[:-3].split("_", 1)[1]: _parse_method(n, (folder / n).read_text(encoding="utf-8"))
            for n in names}


#: The hand-written part of docs/choosing.md (see :func:`load_methods`).
METHODS: dict[str, dict] = load_methods()


# ------------------------------------------------------------------------ loading the JSON


def _read_json(path: Path, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"normlab docs: {what} file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"normlab docs: {what} file {path} is not valid JSON ({e})") from None


def load_claims(path: str | os.PathLike) -> list[dict]:
    """The claim records of a study: ``path`` is the study's output folder (holding
    ``claims.json``) or the JSON file itself, a list of objects with at least ``id``
    and ``verdict`` (and usually ``number``, ``title``, ``reason``).

    Raises:
        FileNotFoundError, ValueError: no such file, or not a list of claim objects.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "claims.json"
    data = _read_json(path, "claims")
    if not isinstance(data, list) or not all(
        isinstance(r, dict) and {"id", "verdict"} <= set(r) for r in data
    ):
        raise ValueError(f"normlab docs: {path} must hold a list of claim objects with at "
                         "least 'id' and 'verdict' (a study's claims.json)")
    return data


def load_bench(path: str | os.PathLike) -> list[dict]:
    """The records of a benchmark JSON (``normlab bench --json PATH``): a list of objects
    with at least ``layer``, ``impl``, ``shape``, ``dtype``, ``layout``, ``mode``,
    ``pass``, ``median_ms`` and ``ratio_to_torch`` (torch.nn's time over this
    implementation's: above 1 is faster than torch.nn). A dict holding the list under
    ``"records"`` is accepted too.

    Raises:
        FileNotFoundError, ValueError: no such file, or records without those keys.
    """
    path = Path(path)
    data = _read_json(path, "benchmark")
    if isinstance(data, dict) and "records" in data:
        data = data["records"]
    need = {"layer", "impl", "median_ms"}
    if not isinstance(data, list) or not all(isinstance(r, dict) and need <= set(r)
                                             for r in data):
        raise ValueError(f"normlab docs: {path} must hold a list of benchmark records with "
                         f"at least {sorted(need)} (the JSON of `normlab bench`)")
    return data


# ------------------------------------------------------------------------ summarising


def _cell_key(r: dict) -> tuple:
    return (str(r.get("shape")), r.get("dtype"), r.get("layout"), r.get("mode"),
            r.get("pass"))


def _describe_cell(r: dict) -> str:
    shape = "x".join(str(s) for s in r.get("shape") or [])
    parts = [shape, r.get("dtype"), r.get("layout"), r.get("mode"), r.get("pass")]
    return " ".join(str(p) for p in parts if p)


def _stats(values: Sequence[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values), "min": min(values),
            "max": max(values)}


def bench_summary(records: Iterable[dict], layer: str, impl: str = "normlab") -> dict | None:
    """Speed of ``impl`` of ``layer`` relative to its peers, over all benchmark cells.

    Returns None if the records hold no timing of it, else a dict with ``cells`` (how
    many cells timed it), ``vs_torch`` (statistics ``n, median, min, max`` of
    ``ratio_to_torch``, and ``worst``: the slowest cell's description and ratio) or
    None where torch.nn has no such layer, and ``vs_peers``: for every other
    implementation timed in the same cells (``composite``, ``loop``, ...), the same
    statistics of its time over this one's (above 1: ``impl`` is faster).
    """
    records = [r for r in records if r.get("layer") == layer]
    mine = {_cell_key(r): r for r in records
            if r.get("impl") == impl and isinstance(r.get("median_ms"), (int, float))}
    if not mine:
        return None
    ratios = [(r["ratio_to_torch"], r) for r in mine.values()
              if isinstance(r.get("ratio_to_torch"), (int, float))]
    vs_torch = None
    if ratios:
        worst_ratio, worst = min(ratios, key=lambda p: p[0])
        vs_torch = dict(_stats([v for v, _ in ratios]), worst=_describe_cell(worst),
                        worst_ratio=worst_ratio)
    peers: dict[str, list[float]] = {}
    for r in records:
        other = r.get("impl")
        ms = r.get("median_ms")
        if other in (impl, "torch", "copy") or not isinstance(ms, (int, float)):
            continue
        own = mine.get(_cell_key(r))
        if own is not None and own["median_ms"] > 0:
            peers.setdefault(other, []).append(ms / own["median_ms"])
    return {"cells": len(mine), "vs_torch": vs_torch,
            "vs_peers": {k: _stats(v) for k, v in sorted(peers.items())}}


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def _bench_lines(records: list[dict] | None, layers: list[str]) -> list[str]:
    if not layers:
        return ["- Speed: not benchmarked (not a layer `normlab bench` times)."]
    if records is None:
        return [f"- Speed ({', '.join(layers)}): {NOT_MEASURED}."]
    lines = []
    for layer in layers:
        s = bench_summary(records, layer)
        if s is None:
            lines.append(f"- Speed ({layer}): {NOT_MEASURED} (no record in the benchmark).")
            continue
        t = s["vs_torch"]
        if t is None:
            head = f"- Speed ({layer}, {s['cells']} cells): torch.nn has no such layer"
        else:
            head = (f"- Speed ({layer}): torch.nn's time / normlab's = {_fmt(t['median'])} "
                    f"median over {t['n']} cells (range {_fmt(t['min'])} to "
                    f"{_fmt(t['max'])}; slowest: {t['worst']}, {_fmt(t['worst_ratio'])})")
        peers = "; ".join(f"{name}'s time / normlab's = {_fmt(p['median'])} median "
                          f"(range {_fmt(p['min'])} to {_fmt(p['max'])})"
                          for name, p in s["vs_peers"].items())
        lines.append(head + (f"; {peers}." if peers else "."))
    return lines


def _one_line(text) -> str:
    return " ".join(str(text or "").split())


def _num(x) -> str:
    return "n/a" if not isinstance(x, (int, float)) else f"{x:.3g}"


def _effect_line(e: dict) -> str:
    """One measured effect of a claim record (the protocol's format): the estimate, its
    interval, the side of the threshold the paper's claim puts it on, the verdict."""
    unit = f" {e['unit']}" if e.get("unit") else ""
    conf = e.get("confidence")
    level = f"{round(100 * conf)}% " if isinstance(conf, (int, float)) else ""
    side = {"greater": f"above {_num(e.get('threshold'))}",
            "less": f"below {_num(e.get('threshold'))}"}.get(e.get("test"))
    if e.get("test") == "equivalent":
        side = f"within {_num(e.get('margin'))} of {_num(e.get('threshold'))}"
    claim = f"; the paper's claim: {side}{unit}" if side else ""
    verdict = f": {e['verdict']}" if e.get("verdict") else ""
    return (f"  - {_one_line(e.get('name') or e.get('key') or 'effect')}: "
            f"{_num(e.get('estimate'))}{unit}, {level}interval [{_num(e.get('low'))}, "
            f"{_num(e.get('high'))}]{claim}{verdict}")


def _claim_record_lines(c: dict) -> list[str]:
    """A claim record as Markdown. The protocol's records (with ``effects``) give the
    verdict and takeaway, each effect's interval, and the scale note; older records
    give the verdict and its reason."""
    number = f"{c['number']}. " if c.get("number") is not None else ""
    title = _one_line(c.get("title") or c.get("statement") or c["id"])
    effects = c.get("effects")
    new = isinstance(effects, list)
    summary = _one_line(c.get("takeaway") if new and c.get("takeaway") else c.get("reason"))
    lines = [f"- Claim {number}{title} (`{c['id']}`): **{c['verdict']}**"
             + (f": {summary}" if summary else ".")]
    if new:
        lines += [_effect_line(e) for e in effects if isinstance(e, dict)]
        lines.append(_against_paper(c))
    return lines


def _against_paper(c: dict) -> str:
    """Whether the lab's verdict agrees with the paper's claim and, where it does not,
    why the small scale may explain it (the claim's scale note)."""
    verdict = c.get("verdict")
    if verdict == "reproduced":
        return "  - Against the paper: the lab agrees at its small scale."
    why = _one_line(c.get("scale_note")) or "the claim gives no scale note"
    if verdict == "inconclusive":
        head = "the lab cannot yet confirm or refute the paper at its small scale"
    elif verdict == "not reproduced":
        head = "the lab's verdict differs from the paper's claim"
    else:
        head = f"the lab's verdict is '{verdict}', so it does not confirm the paper"
    return f"  - Against the paper: {head}. Why the scale may explain it: {why}"


def _claim_lines(claims: list[dict] | None, ids: list[str]) -> list[str]:
    if not ids:
        return ["- Claims: the lab has no claim about it yet."]
    if claims is None:
        return [f"- Claims ({', '.join(ids)}): {NOT_MEASURED}."]
    by_id = {c["id"]: c for c in claims}
    lines = []
    for cid in ids:
        if cid in by_id:
            lines += _claim_record_lines(by_id[cid])
        else:
            lines.append(f"- Claim `{cid}`: {NOT_MEASURED} (not in this study).")
    return lines


# ------------------------------------------------------------------------ the page


def _aliases_table() -> list[str]:
    from normlab.registry import list_norms

    rows = ["| `create_norm` name | also accepted (case-insensitive, `-` = `_`) |",
            "|---|---|"]
    for name, aliases in list_norms(with_aliases=True).items():
        rows.append(f"| `{name}` | {', '.join(f'`{a}`' for a in aliases) or '-'} |")
    return rows




def _method_section(key: str, m: dict, claims, records) -> list[str]:
    lines = [f"### {m['title']}", ""]
    meta = [m["build"]] + ([m["paper"]] if m["paper"] else [])
    lines += [" · ".join(meta), ""]
    lines += [f"- **Normalises:** {m['normalises']}",
              f"- **Use it for:** {m['use']}",
              f"- **Avoid it for:** {m['avoid']}",
              f"- **Costs:** {m['costs']}",
              f"- **torch.compile, export, autocast:** {m['portability']}",
              "", "Evidence:", ""]
    lines += _claim_lines(claims, m["claims"])
    lines += _bench_lines(records, m["bench"])
    return lines + [""]


def _summary_row(key: str, m: dict, claims, records) -> str:
    if not m["claims"]:
        verdicts = "-"
    elif claims is None:
        verdicts = NOT_MEASURED
    else:
        by_id = {c["id"]: c for c in claims}
        verdicts = ", ".join(
            f"{by_id[c].get('number', c)}: {by_id[c]['verdict']}" if c in by_id
            else f"{c}: {NOT_MEASURED}" for c in m["claims"])
    if not m["bench"]:
        speed = "-"
    elif records is None:
        speed = NOT_MEASURED
    else:
        parts = []
        for layer in m["bench"]:
            s = bench_summary(records, layer)
            if s is None:
                parts.append(f"{layer}: {NOT_MEASURED}")
            elif s["vs_torch"] is not None:
                parts.append(f"{layer}: {_fmt(s['vs_torch']['median'])}")
            else:
                parts.append(f"{layer}: no torch.nn peer")
        speed = "; ".join(parts)
    return f"| [{m['title']}](#{_anchor(m['title'])}) | {verdicts} | {speed} |"


def _anchor(title: str) -> str:
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -")
    return keep.replace(" ", "-")


def generate(claims: list[dict] | None = None, bench: list[dict] | None = None,
             study_label: str | None = None, bench_label: str | None = None) -> str:
    """The Markdown of docs/choosing.md.

    Args:
        claims: the study's claim records (:func:`load_claims`), or None: the claim
            evidence then reads "not measured yet".
        bench: the benchmark's records (:func:`load_bench`), or None: the speed
            evidence reads "not measured yet".
        study_label, bench_label: how to name the sources on the page (their paths).

    Claims of the study that no method lists appear at the end, so that none is lost.
    """
    for key, m in METHODS.items():
        missing = [f for f in (*_META, *_SECTIONS.values()) if f not in m]
        if missing:
            raise ValueError(f"normlab.docs.METHODS[{key!r}] lacks {missing}")
    src_claims = (f"`{study_label or 'claims.json'}` ({len(claims)} claims)"
                  if claims is not None else NOT_MEASURED)
    src_bench = (f"`{bench_label or 'bench JSON'}` ({len(bench)} records)"
                 if bench is not None else NOT_MEASURED)
    cmd = "normlab docs" + (f" --study {study_label}" if study_label else "") + (
        f" --bench {bench_label}" if bench_label else "") + " --out docs/choosing.md"
    out = [
        "# Choosing a normalization layer",
        "",
        "<!-- Generated by `normlab docs`: edit the Markdown in src/normlab/guide/, "
        "not this file. -->",
        "",
        _unwrap(_guide("intro.md")),
        "",
        f"- Claim verdicts: {src_claims}.",
        f"- Speed: {src_bench}. A ratio is the peer's time over normlab's time in the "
        "same cell (shape, dtype, layout, mode, pass): above 1, normlab is faster.",
        f"- Regenerate: `{cmd}`.",
        "",
        "## At a glance",
        "",
        "| method | lab claims (number: verdict) | speed: torch.nn's time / normlab's, "
        "median |",
        "|---|---|---|",
    ]
    out += [_summary_row(k, m, claims, bench) for k, m in METHODS.items()]
    out += ["", _unwrap(_guide("rules_of_thumb.md")), "", "## Methods", ""]
    for key, m in METHODS.items():
        out += _method_section(key, m, claims, bench)
    if claims is not None:
        listed = {c for m in METHODS.values() for c in m["claims"]}
        others = [c for c in claims if c["id"] not in listed]
        if others:
            out += ["## Other claims of the study", ""]
            out += _claim_lines(others, [c["id"] for c in others]) + [""]
    out += [_guide("recipes.md"), _unwrap(_guide("names.md")), ""]
    out += _aliases_table() + [""]
    return "\n".join(out)


def write(out: str | os.PathLike | None = "docs/choosing.md",
          study: str | os.PathLike | None = None,
          bench: str | os.PathLike | None = None) -> str:
    """Load the evidence, :func:`generate` the page and write it to ``out`` (a path;
    ``None`` or ``"-"``: write nothing). Returns the Markdown."""
    claims = None if study is None else load_claims(study)
    records = None if bench is None else load_bench(bench)
    text = generate(claims, records, None if study is None else str(study),
                    None if bench is None else str(bench))
    if out not in (None, "-"):
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text
