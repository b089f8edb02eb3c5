"""Hyperparameters that describe themselves: an attack declares each field with its help text and its fast setting.

>>> steps: int = param(10, "Gradient steps per run.", fast=3)

:func:`param` stores the help text, the fast setting (what the contract tests use to keep the attack quick on their
tiny model) and the ``runtime`` flag in the field's metadata; :func:`parameters` reads them back as :class:`Param`
records, which the registry (:attr:`attacks.AttackSpec.parameters`), the CLI (``--param NAME=VALUE``,
``robustcnn attacks NAME``) and the tests use. A field declared in a base class keeps its description in every
subclass; a subclass whose field means something else, or has another default, declares the field again.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Union


class _NoFast:
    """The fast setting of a field that has none (its default is quick enough)."""

    def __repr__(self) -> str:
        return "NO_FAST"


NO_FAST: Any = _NoFast()

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def param(default: Any, help: str, *, fast: Any = NO_FAST, runtime: bool = False, **field_options: Any) -> Any:
    """A dataclass field with ``default``, described by ``help`` (one or two sentences, units stated).

    ``fast``: the value the contract tests use, when the default is too slow on their tiny 8x8 model. ``runtime``:
    the field only says how the work is split, never what is computed; it is left out of
    :meth:`~attacks.base.Attack.config` and so of reports and of the per-sample random streams. ``field_options``
    go to :func:`dataclasses.field` as they are (``compare``, ``repr``).
    """
    metadata: dict[str, Any] = {"help": help}
    if fast is not NO_FAST:
        metadata["fast"] = fast
    if runtime:
        metadata["runtime"] = True
    return dataclasses.field(default=default, metadata=metadata, **field_options)


def _alternatives(annotation: Any) -> tuple[Any, ...]:
    """``(int, NoneType)`` for ``Optional[int]`` or ``int | None``; ``(int,)`` for ``int``."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


@dataclass(frozen=True)
class Param:
    """One hyperparameter of an attack: its field's name, annotated type, default, help text and fast setting."""

    name: str
    type: Any
    default: Any
    help: str
    fast: Any = NO_FAST
    runtime: bool = False

    @property
    def has_fast(self) -> bool:
        return self.fast is not NO_FAST

    @property
    def optional(self) -> bool:
        return type(None) in _alternatives(self.type)

    @property
    def type_name(self) -> str:
        """The type as a user reads it: ``int``, ``float or None``, ``Tensor or None``."""
        names = [getattr(t, "__name__", str(t)) for t in _alternatives(self.type) if t is not type(None)]
        return " or ".join(names + (["None"] if self.optional else []))

    def parse(self, text: str) -> Any:
        """The value ``text`` stands for, read by the field's type; ``ValueError`` (one line) if it cannot be.

        ``none`` is None for an optional field; ``int`` takes whole numbers, ``float`` decimals and fractions
        (``8/255``: the pixel-unit fields are in [0, 1]), ``bool`` true/false, yes/no, on/off or 1/0, ``str`` the
        text itself. Whether the value is allowed is for the attack to say when it is built.
        """
        raw = text.strip()
        if self.optional and raw.lower() == "none":
            return None
        kind = next(t for t in _alternatives(self.type) if t is not type(None))
        if kind is bool:
            if raw.lower() in _TRUE + _FALSE:
                return raw.lower() in _TRUE
            raise ValueError(f"{self.name} takes true or false, got {text!r}")
        if kind is int:
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{self.name} takes a whole number, got {text!r}") from None
        if kind is float:
            try:
                value = float(Fraction(raw)) if "/" in raw else float(raw)
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"{self.name} takes a number such as 0.03 or 8/255, got {text!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"{self.name} takes a finite number, got {text!r}")
            return value
        if kind is str:
            return raw
        raise ValueError(f"{self.name} ({self.type_name}) cannot be given as text")


def parameters(cls: type) -> tuple[Param, ...]:
    """The :class:`Param` of every field of the dataclass ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append(Param(name=f.name, type=hints[f.name], default=default, help=f.metadata.get("help", ""),
                         fast=f.metadata.get("fast", NO_FAST), runtime=bool(f.metadata.get("runtime"))))
    return tuple(out)
