"""The lab's claims: one module per claim, ``cNN_<id>.py``, each defining ``CLAIM``.

:func:`all_claims` discovers them in number order; :func:`get_claim` finds one by id or
number. See :mod:`normlab.claims.base` for what a claim holds.
"""

from __future__ import annotations

import importlib
import pkgutil

from normlab.claims.base import BUDGETS, VERDICTS, Budget, Claim, RunContext

__all__ = ["Claim", "Budget", "BUDGETS", "VERDICTS", "RunContext", "all_claims", "get_claim"]


def all_claims() -> list[Claim]:
    """Every claim module's ``CLAIM``, sorted by number."""
    claims = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("c") and info.name[1:3].isdigit():
            module = importlib.import_module(f"{__name__}.{info.name}")
            claims.append(module.CLAIM)
    claims.sort(key=lambda c: c.number)
    numbers = [c.number for c in claims]
    ids = [c.id for c in claims]
    if len(set(numbers)) != len(numbers) or len(set(ids)) != len(ids):
        raise RuntimeError(f"normlab.claims: duplicate claim numbers or ids: {numbers} {ids}")
    return claims


def get_claim(name: str | int) -> Claim:
    """The claim with this id or number; ValueError listing the known ones. Only the
    matching module is imported."""
    wanted = str(name)
    for info in pkgutil.iter_modules(__path__):
        if not (info.name.startswith("c") and info.name[1:3].isdigit()):
            continue
        number, claim_id = str(int(info.name[1:3])), info.name[4:]
        if wanted in (number, claim_id, info.name):
            return importlib.import_module(f"{__name__}.{info.name}").CLAIM
    known = ", ".join(info.name[1:] for info in pkgutil.iter_modules(__path__)
                      if info.name.startswith("c") and info.name[1:3].isdigit())
    raise ValueError(f"normlab.claims: unknown claim {name!r}; known: {known}")
