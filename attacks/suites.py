"""Named attack suites for robustness reports, built from the registry.

``adaptive`` (the default, :data:`DEFAULT_SUITE`): APGD-CE, then targeted APGD-DLR aimed only at the three wrong
classes whose decision boundaries are nearest to the clean image by a linear estimate (margin over gradient norm,
the way DeepFool and FAB pick a class; instead of all nine), then a short Square attack as a probe for gradient
masking, and the full 5,000-query Square attack only when that probe fooled a sample the gradient attacks had
missed: black-box queries are spent where the white-box stages give a reason, not everywhere.
``quick``: FGSM and PGD-20 — a first look, seconds on a CPU.
``standard``: the strong, parameter-free protocol of AutoAttack (Croce & Hein 2020) — APGD-CE, targeted APGD-DLR
over nine classes, a minimum-norm attack, and the black-box Square attack; run as a cascade, so its worst case is
what survives all.
``full``: standard plus the decision-based attacks; patch and pixel attacks are added as *other threat models*
(their budgets are not the eps-ball, so they are reported beside the worst case, not inside it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from attacks.base import Attack
from attacks.registry import available, get


@dataclass(frozen=True)
class Entry:
    """One attack of a suite: its registry name, its hyperparameters (budgets are added when building) and whether
    it is an :class:`Escalation` (``escalation``: its ``min_rate``; None: an attack that always runs)."""

    attack: str
    params: Mapping[str, Any] = field(default_factory=dict)
    escalation: Optional[float] = None  # an escalation: its ``min_rate``


class Escalation:
    """An attack of a cascade that runs only when the attack right before it fooled a sample (which the attacks
    before that had all missed) — with ``min_rate``, at least that fraction of the samples it saw; otherwise the
    cascade records it as skipped, at no cost.

    It behaves as the attack it wraps in every other way: same name, configuration and random streams, so when it
    runs its results are, sample by sample, those of the attack alone."""

    def __init__(self, attack: Attack, min_rate: float = 0.0):
        if not 0 <= min_rate < 1:
            raise ValueError(f"min_rate must be in [0, 1), got {min_rate}")
        self.attack, self.min_rate = attack, min_rate

    def wanted(self, fooled: int, seen: int) -> bool:
        """Whether the attack before, having fooled ``fooled`` of the ``seen`` samples it saw, calls this one in."""
        return fooled > 0 and fooled >= self.min_rate * seen

    def __getattr__(self, name: str):
        return getattr(self.attack, name)

    def __call__(self, *args, **kwargs):
        return self.attack(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Escalation({self.attack!r}, min_rate={self.min_rate})"


#: Entries per suite, in cascade order.
SUITES: dict[str, list[Entry]] = {
    "adaptive": [Entry("apgd", {"loss": "ce"}), Entry("apgd-t", {"n_target_classes": 3, "rank": "distance"}),
                 Entry("square", {"max_queries": 300}), Entry("square", {"max_queries": 5000}, escalation=0.0)],
    "quick": [Entry("fgsm"), Entry("pgd", {"steps": 20})],
    "standard": [Entry("apgd", {"loss": "ce"}), Entry("apgd-t"), Entry("deepfool"),
                 Entry("square", {"max_queries": 5000})],
    "full": [Entry("apgd", {"loss": "ce"}), Entry("apgd-t"), Entry("deepfool"), Entry("square", {"max_queries": 5000}),
             Entry("hopskipjump"), Entry("boundary"), Entry("patch"), Entry("onepixel")],
}

#: The suite `robustcnn report` runs when none is named.
DEFAULT_SUITE = "adaptive"

#: Kinds whose threat model is not an Lp ball of radius eps.
OTHER_THREAT_MODELS = ("patch", "pixel")


def suite_names() -> list[str]:
    return list(SUITES)


def describe_suite(name: str) -> str:
    """The attacks of a suite in cascade order, e.g. ``apgd(loss=ce), apgd-t(n_target_classes=3), ...``."""
    def one(e: Entry) -> str:
        args = ", ".join(f"{k}={v}" for k, v in e.params.items())
        text = f"{e.attack}({args})" if args else e.attack
        if e.escalation is None:
            return text
        return f"{text} if the one before fooled " + (f"{e.escalation:.0%} of what it saw" if e.escalation else "any")
    return ", ".join(one(e) for e in SUITES[name])


def build_suite(name: Optional[str] = None, *, attack_names: Optional[list[str]] = None, eps: float,
                norm: str = "linf") -> list[Attack]:
    """The attacks of suite ``name`` (or of the explicit ``attack_names``) at budget ``eps`` under ``norm``.

    An explicit list refuses an attack that does not support ``norm``; a named suite leaves out its optional
    attacks that do not (``full``'s), and refuses to run without one it relies on, naming it and the norms it
    supports. Raises ``ValueError`` for an unknown suite or attack.
    """
    if attack_names is not None:
        entries = [Entry(a) for a in attack_names]
        if not entries:
            raise ValueError("give at least one attack")
    elif name in SUITES:
        entries = [e for e in SUITES[name] if e.attack in available()]
        missing = [e.attack for e in SUITES[name] if e.attack not in available()]
        if missing and name != "full":
            raise ValueError(f"suite {name!r} needs attacks that are not registered: {', '.join(missing)}")
    else:
        raise ValueError(f"unknown suite {name!r}: choose one of {', '.join(SUITES)}")
    out: list[Attack] = []
    for entry in entries:
        spec = get(entry.attack)
        params = dict(entry.params)
        if spec.kind in OTHER_THREAT_MODELS:
            out.append(spec.build(**params))
            continue
        if norm not in spec.norms:
            if attack_names is not None:
                raise ValueError(f"{entry.attack} does not support norm {norm}: it supports {', '.join(spec.norms)}")
            if name != "full":
                raise ValueError(f"suite {name!r} cannot run under norm {norm}: its attack {entry.attack} supports "
                                 f"only {', '.join(spec.norms)}")
            continue
        if "norm" in spec.params:
            params["norm"] = norm
        if "eps" in spec.params:
            params["eps"] = eps
        atk = spec.build(**params)
        out.append(atk if entry.escalation is None else Escalation(atk, entry.escalation))
    return out
