"""The method plugin interface and its registry.

A method is one class in one module: a short ``name``, a ``Knobs`` dataclass of its settings with
defaults, ``solve`` (whole-model target ratio -> its own knob, by counting) and ``compress``. Built-in
methods live in the ``methods`` package; third-party ones are found through the ``slimbench.methods``
entry-point group. Both register with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

from torch import nn

from bench.errors import UserError

ENTRY_POINT_GROUP = "slimbench.methods"
#: ``field(default=..., metadata=OPERATIONAL)`` marks a knob that cannot change a result (see Method.operational_knobs)
OPERATIONAL = {"operational": True}
#: ``field(default=..., metadata=KEYED_WHEN_SET)`` marks a knob added after records existed whose default is exactly the
#: behaviour before it: at its default it stays out of the cell's key, so those records keep their keys and are reused
KEYED_WHEN_SET = {"keyed_when_set": True}
_REGISTRY: dict[str, type[Method]] = {}
_DISCOVERED = False


@dataclass
class Solution:
    """What a solver decided: the method's own knob values and the parameter count they give."""

    knobs: dict[str, Any]
    predicted_params: int
    notes: str = ""


@dataclass
class CompressionInfo:
    """What compressing cost and decided, beyond the structure itself."""

    train_tokens: int = 0
    #: seconds of compress spent training (what ``train_tokens`` cost; 0 for a method that does not train)
    train_seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    #: files the method kept so that a run killed before the cell's record is written can skip work already done (a
    #: finished training state); the harness removes them once the cell is evaluated and its record is on disk
    scratch: list[Path] = field(default_factory=list)


class Method:
    """Base class of a compression method plugin."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: True for methods that remove whole units (blocks, sub-layers) and cannot hit every ratio.
    coarse: ClassVar[bool] = False

    @dataclass
    class Knobs:
        pass

    def __init__(self, **knobs: Any):
        names = {f.name for f in dataclasses.fields(self.Knobs)}
        unknown = sorted(set(knobs) - names)
        if unknown:
            raise UserError(
                f"method {self.name!r} has no knob {', '.join(unknown)}; its knobs: "
                f"{', '.join(sorted(names)) or '(none)'}"
            )
        hints = get_type_hints(self.Knobs)
        self.knobs = self.Knobs(**{k: _coerce(self.name, k, v, hints.get(k)) for k, v in knobs.items()})

    def knob_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.knobs)

    @classmethod
    def operational_knobs(cls) -> set[str]:
        """Knobs that change how a run goes but not its result (declared ``field(metadata=OPERATIONAL)``, e.g. how
        often a long training saves its state): left out of the cell's key and its record's file name."""
        return {f.name for f in dataclasses.fields(cls.Knobs) if f.metadata.get("operational")}

    def result_knobs(self) -> dict[str, Any]:
        """The knobs that decide the result: the ones a cell's key is made of. A ``KEYED_WHEN_SET`` knob counts only
        when it differs from its default (its default reproduces what runs did before the knob existed)."""
        ops = self.operational_knobs()
        later = {f.name: f.default for f in dataclasses.fields(self.Knobs) if f.metadata.get("keyed_when_set")}
        return {k: v for k, v in self.knob_dict().items()
                if k not in ops and not (k in later and v == later[k])}

    # -- to implement ------------------------------------------------------------------------
    def solve(self, adapter, ratio: float) -> Solution:
        """Turn the whole-model target ``ratio`` into this method's knob by counting parameters.

        Raise :class:`UserError` when the ratio is outside what the method can do.
        """
        raise NotImplementedError

    def compress(self, model: nn.Module, adapter, calibration, solution: Solution) -> CompressionInfo:
        """Compress ``model`` in place (structural changes through :mod:`bench.structure`)."""
        raise NotImplementedError

    def device_workspace(self, adapter, tokens: int) -> int:
        """Bytes this method's own arithmetic holds on the work device at once, beyond what the block-wise engine
        places there (a block, its statistics, the calibration activations): its factorisation buffers, its float
        copies of the activations. ``tokens``: calibration tokens. The run adds the largest of its methods' to the
        up-front fit estimate (:func:`bench.placement.fits_or_refuse`). Default: nothing beyond the engine's."""
        return 0


def _coerce(method: str, knob: str, value: Any, typ: Any) -> Any:
    """Turn a CLI string into the knob's declared type (``X | None`` accepts "none"); NaN and infinity are refused."""
    if not isinstance(value, str) or typ is None or typ is str:
        return value
    text = str(typ).replace("typing.", "")
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts or "NoneType" in parts
    base = next((p for p in parts if p not in ("None", "NoneType")), text)
    base = {"<class 'int'>": "int", "<class 'float'>": "float", "<class 'bool'>": "bool"}.get(base, base)
    example = {"int": "2", "float": "0.5", "bool": "true"}.get(base, "...")
    if optional and value.strip().lower() in {"none", "null", ""}:
        return None
    try:
        if base == "bool":
            if value.lower() in {"1", "true", "yes", "on"}:
                return True
            if value.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if base == "int":
            return int(value)
        if base == "float":
            number = float(value)
            if not math.isfinite(number):
                raise UserError(f"knob {method}.{knob}={value!r} is not a finite number; give e.g. "
                                f"{method}.{knob}={example}")
            return number
        if base.startswith(("list", "tuple")):
            return [v.strip() for v in value.split(",") if v.strip()]
    except ValueError:
        kind = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(base, base)
        none = " or none" if optional else ""
        raise UserError(f"knob {method}.{knob}={value!r} is not {kind}{none}; give e.g. {method}.{knob}={example}") \
            from None
    return value


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty `name`")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"two methods registered as {cls.name!r}: {existing.__module__} and {cls.__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def discover() -> None:
    """Import the built-in methods and every entry point of the ``slimbench.methods`` group, once."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import methods

    for info in pkgutil.iter_modules(methods.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"methods.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Method):
            register(obj)


def available() -> dict[str, type[Method]]:
    discover()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Method]:
    methods_ = available()
    if name not in methods_:
        raise UserError(f"unknown method {name!r}; available: {', '.join(methods_)} (see `bench list`)")
    return methods_[name]
