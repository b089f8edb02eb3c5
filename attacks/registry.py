"""The attack registry: one ``@register`` line on a class in a module under ``attacks/`` (every module there is
imported by the package) makes an attack appear in ``attacks.available()``, the CLI's ``--method`` choices and
``--param`` names, ``robustcnn attacks`` and the contract tests. Its fields, declared with
:func:`attacks.params.param`, carry their help text and fast test setting (:attr:`AttackSpec.parameters`)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Optional

from attacks.base import KINDS, Attack
from attacks.params import Param, parameters

_REGISTRY: dict[str, "AttackSpec"] = {}


@dataclass(frozen=True)
class AttackSpec:
    """What the registry knows of an attack: how to build it and what it can do."""

    name: str
    factory: type[Attack]
    kind: str
    norms: tuple[str, ...]
    targeted: bool
    description: str
    parameters: tuple[Param, ...]  # every hyperparameter: name, type, default, help text, fast setting

    @property
    def params(self) -> dict[str, object]:
        """Hyperparameter names and their defaults (what ``factory(**kwargs)`` accepts)."""
        return {p.name: p.default for p in self.parameters if p.default is not dataclasses.MISSING}

    @property
    def fast(self) -> dict[str, object]:
        """The fast setting of every hyperparameter that declares one: ``build(**spec.fast)`` is the attack the
        contract tests run (quick on a tiny model, a large budget)."""
        return {p.name: p.fast for p in self.parameters if p.has_fast}

    def parameter(self, name: str) -> Param:
        """The hyperparameter ``name``; ``ValueError`` naming the accepted ones if the attack has none so called."""
        for p in self.parameters:
            if p.name == name:
                return p
        raise ValueError(f"{self.name} has no parameter {name!r}; it takes {', '.join(self.params) or 'none'}")

    def build(self, **kwargs) -> Attack:
        """Build the attack; unknown hyperparameters raise ``ValueError`` naming the accepted ones."""
        unknown = sorted(set(kwargs) - set(self.params))
        if unknown:
            raise ValueError(
                f"{self.name} does not take {', '.join(unknown)}; it takes {', '.join(self.params) or 'no options'}"
            )
        return self.factory(**kwargs)


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator: add an attack to the registry under ``cls.name``."""
    if not cls.name or cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__} needs a name and a kind in {KINDS}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name].factory is not cls:
        raise ValueError(f"an attack named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = AttackSpec(
        name=cls.name,
        factory=cls,
        kind=cls.kind,
        norms=tuple(cls.supported_norms),
        targeted=bool(cls.targeted_ok),
        description=cls.description,
        parameters=parameters(cls),
    )
    return cls


def available(kind: Optional[str] = None) -> list[str]:
    """Names of the registered attacks, optionally only those of one kind, sorted."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: choose one of {', '.join(KINDS)}")
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def get(name: str) -> AttackSpec:
    """The spec of attack ``name``; an unknown name raises ``ValueError`` listing close matches."""
    key = name.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else f"; available: {', '.join(available())}"
    raise ValueError(f"unknown attack {name!r}{hint}")


def build(name: str, **kwargs) -> Attack:
    """Shortcut for ``get(name).build(**kwargs)``."""
    return get(name).build(**kwargs)

