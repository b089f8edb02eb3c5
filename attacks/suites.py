"""Named attack suites for robustness reports, built from the registry.

``quick``: FGSM and PGD-20 — a first look, seconds on a CPU.
``standard``: the strong, parameter-free protocol of AutoAttack (Croce & Hein 2020) — APGD-CE, targeted APGD-DLR,
a minimum-norm attack, and the black-box Square attack; run as a cascade, so its worst case is what survives all.
``full``: standard plus the decision-based attacks; patch and pixel attacks are added as *other threat models*
(their budgets are not the eps-ball, so they are reported beside the worst case, not inside it).
"""

from __future__ import annotations

from typing import Optional

from attacks.base import Attack
from attacks.registry import available, get

#: (registry name, hyperparameters) per suite, in cascade order. Budgets (eps, norm) are added when building.
SUITES: dict[str, list[tuple[str, dict]]] = {
    "quick": [("fgsm", {}), ("pgd", {"steps": 20})],
    "standard": [("apgd", {"loss": "ce"}), ("apgd-t", {}), ("deepfool", {}), ("square", {"max_queries": 5000})],
    "full": [("apgd", {"loss": "ce"}), ("apgd-t", {}), ("deepfool", {}), ("square", {"max_queries": 5000}),
             ("hopskipjump", {}), ("boundary", {}), ("patch", {}), ("onepixel", {})],
}

#: Kinds whose threat model is not an Lp ball of radius eps.
OTHER_THREAT_MODELS = ("patch", "pixel")


def suite_names() -> list[str]:
    return list(SUITES)


def build_suite(name: Optional[str] = None, *, attack_names: Optional[list[str]] = None, eps: float,
                norm: str = "linf") -> list[Attack]:
    """The attacks of suite ``name`` (or of the explicit ``attack_names``) at budget ``eps`` under ``norm``.

    Attacks that do not support ``norm`` are left out of a named suite (e.g. no Linf CW); an explicit list
    refuses them. Raises ``ValueError`` for an unknown suite or attack.
    """
    if attack_names is not None:
        entries = [(a, {}) for a in attack_names]
        if not entries:
            raise ValueError("give at least one attack")
    elif name in SUITES:
        entries = [(a, kw) for a, kw in SUITES[name] if a in available()]
        missing = [a for a, _ in SUITES[name] if a not in available()]
        if missing and name != "full":
            raise ValueError(f"suite {name!r} needs attacks that are not registered: {', '.join(missing)}")
    else:
        raise ValueError(f"unknown suite {name!r}: choose one of {', '.join(SUITES)}")
    out = []
    for attack, kw in entries:
        spec = get(attack)
        params = dict(kw)
        if spec.kind in OTHER_THREAT_MODELS:
            out.append(spec.build(**params))
            continue
        if norm not in spec.norms:
            if attack_names is not None:
                raise ValueError(f"{attack} does not support norm {norm}: it supports {', '.join(spec.norms)}")
            continue
        if "norm" in spec.params:
            params["norm"] = norm
        if "eps" in spec.params:
            params["eps"] = eps
        out.append(spec.build(**params))
    return out
