"""robustcnn's attack library: every attack family behind one contract, usable on any PyTorch classifier.

>>> import attacks
>>> res = attacks.PGD(eps=8/255, steps=10)(model, x, y)
>>> res.success.float().mean()              # attack success rate on this batch
>>> attacks.available("white-box")          # registered attacks of one kind
>>> attacks.get("pgd").build(eps=0.1)       # build by name, as the CLI does

The model must map images in [0, 1] to logits (normalization inside the model). Attacks never modify the model or
``x``; see :mod:`attacks.base` for the full contract.
"""

from attacks.base import (
    DEFAULT_EPS, KINDS, Attack, AttackResult, BoundedAttack, Context, LabelRangeError, MinNormAttack, ModelState,
    NonFiniteOutputError,
)
from attacks.registry import AttackSpec, available, build, get, register
from attacks.evaluate import AttackStats, Report, evaluate
from attacks.suites import SUITES, build_suite, suite_names

# importing the attack modules registers them
from attacks.fgsm import FGSM  # noqa: E402  (isort: skip)
from attacks.pgd import PGD  # noqa: E402
from attacks.bim import BIM  # noqa: E402
from attacks.mifgsm import MIFGSM  # noqa: E402
from attacks.eotpgd import EOTPGD  # noqa: E402
from attacks.apgd import APGD, APGDT  # noqa: E402
from attacks.cw import CarliniWagner  # noqa: E402
from attacks.deepfool import DeepFool  # noqa: E402
from attacks.square import Square  # noqa: E402
from attacks.simba import SimBA  # noqa: E402
from attacks.nes import NES  # noqa: E402
from attacks.spsa import SPSA  # noqa: E402
from attacks.hopskipjump import HopSkipJump  # noqa: E402
from attacks.boundary import Boundary  # noqa: E402
from attacks.patch import LocalizedPatch, UniversalPatch  # noqa: E402
from attacks.onepixel import OnePixel  # noqa: E402
from attacks.greedyl0 import GreedyL0  # noqa: E402
from attacks.trades import KLPGD  # noqa: E402  (not registered: the TRADES inner maximization)

__all__ = [
    "DEFAULT_EPS", "KINDS", "Attack", "AttackResult", "AttackSpec", "BoundedAttack", "Context", "MinNormAttack",
    "NonFiniteOutputError", "LabelRangeError", "ModelState", "available", "build", "get", "register", "AttackStats", "Report", "evaluate", "SUITES", "build_suite", "suite_names",
    "FGSM", "PGD", "BIM", "MIFGSM", "EOTPGD", "APGD", "APGDT", "CarliniWagner", "DeepFool",
    "Square", "SimBA", "NES", "SPSA", "HopSkipJump", "Boundary",
    "UniversalPatch", "LocalizedPatch", "OnePixel", "GreedyL0", "KLPGD",
]
