"""The attack registry: one ``@register`` line makes an attack appear in ``attacks.available()``, the CLI's
``--method`` choices, ``robustcnn attacks`` and the contract tests."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Optional

from attacks.base import KINDS, Attack

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

    @property
    def params(self) -> dict[str, object]:
        """Hyperparameter names and their defaults (what ``factory(**kwargs)`` accepts)."""
        out = {}
        for f in dataclasses.fields(self.factory):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out

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

