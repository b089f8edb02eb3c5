"""robustcnn's attack library: every attack family behind one contract, usable on any PyTorch classifier.

>>> import attacks
>>> res = attacks.PGD(eps=8/255, steps=10)(model, x, y)
>>> res.success.float().mean()              # attack success rate on this batch
>>> attacks.available("white-box")          # registered attacks of one kind
>>> attacks.get("pgd").build(eps=0.1)       # build by name, as the CLI does

The model must map images in [0, 1] to logits (normalization inside the model). Attacks never modify the model or
``x``; see :mod:`attacks.base` for the full contract.

Every module of this package is imported here, in name order, so an attack is added by one file: its ``@register``
runs on import, and every attack class with a ``name`` (the registered ones, and :class:`KLPGD`, the TRADES inner
maximization, which is named but not registered) is exported as ``attacks.<ClassName>``.
"""

import importlib
import pkgutil

from attacks.base import (
    DEFAULT_EPS, KINDS, Attack, AttackResult, BoundedAttack, Context, LabelRangeError, MinNormAttack, ModelState,
    NonFiniteOutputError,
)
from attacks.registry import AttackSpec, available, build, get, register
from attacks.evaluate import AttackStats, Report, evaluate
from attacks.suites import DEFAULT_SUITE, SUITES, Escalation, build_suite, describe_suite, suite_names

_CORE = [
    "DEFAULT_EPS", "KINDS", "Attack", "AttackResult", "AttackSpec", "BoundedAttack", "Context", "MinNormAttack",
    "NonFiniteOutputError", "LabelRangeError", "ModelState", "available", "build", "get", "register", "AttackStats",
    "Report", "evaluate", "DEFAULT_SUITE", "SUITES", "Escalation", "build_suite", "describe_suite", "suite_names",
]


def _attack_classes() -> dict[str, type]:
    """Import every module of the package; return its public attack classes with a ``name``, by class name."""
    found: dict[str, type] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Attack) and obj.name and obj.__module__ == module.__name__
                    and not obj.__name__.startswith("_")):
                found[obj.__name__] = obj
    return found


_ATTACKS = _attack_classes()
globals().update(_ATTACKS)
__all__ = _CORE + sorted(_ATTACKS)
