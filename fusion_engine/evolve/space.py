"""The search space of an evolutionary merge: numbers in a merge YAML, mapped from a unit cube.

A template is an ordinary mergekit YAML with a ``models:`` list. Each searched parameter of each
non-base model becomes ``points`` coordinates: one scalar (``points = 1``) or a gradient of ``points``
values interpolated over the layers by mergekit's rule (``points >= 2``; "per-layer gradients"). A
candidate ``x ∈ [0, 1]^D`` maps to ``value = low + x · (high − low)``, rounded to ``digits`` decimals, and
written into the template's ``parameters`` of that model. The recipe of a candidate *is* the YAML text:
the in-memory merge parses that very text, so ``fusion-engine merge`` on the written file reproduces it.

Bounds default to mergekit-evolve's: weights in [0, 1] (``allow_negative_weights``: [-1, 1]) and
densities in [0.1, 1]; other parameters take the range the method declares.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from ..checkpoint.config import parse_config
from ..errors import ConfigError
from ..methods import registry

DEFAULT_BOUNDS = {"weight": (0.0, 1.0), "density": (0.1, 1.0)}


@dataclass(frozen=True)
class Coordinate:
    """Coordinate(s) of the search: ``parameter`` of ``models[model_index]``, ``points`` gradient values."""

    model_index: int
    model: str
    parameter: str
    points: int
    low: float
    high: float


class SearchSpace:
    """The template's searched parameters; :meth:`recipe` turns a point of [0, 1]^D into YAML text."""

    def __init__(self, template_text: str, parameters: list[str] | None = None, *, points: int = 1,
                 bounds: dict[str, tuple[float, float]] | None = None, allow_negative_weights: bool = False,
                 digits: int = 6, filename: str = "template.yaml"):
        if points < 1:
            raise ConfigError(f"gradient points must be >= 1, got {points}")
        config = parse_config(template_text, filename)
        if config.models is None:
            raise ConfigError(f"{filename}: evolve searches a config with a `models:` list, not `slices:`")
        method = registry.get(config.merge_method)
        searchable = [p for p in method.parameters if p.scope in (registry.INPUT, registry.NON_BASE)
                      and p.kind is float]
        names = [p.name for p in searchable]
        if parameters is None:
            parameters = [n for n in ("weight", "density") if n in names]
        unknown = [p for p in parameters if p not in names]
        if unknown or not parameters:
            raise ConfigError(f"{config.merge_method} has no per-model number parameter {unknown or parameters}; "
                              f"search among {', '.join(names) or 'none'}")
        limits = dict(DEFAULT_BOUNDS)
        if allow_negative_weights:
            limits["weight"] = (-1.0, 1.0)
        limits.update(bounds or {})
        self.template = yaml.safe_load(template_text)
        self.text = template_text
        self.filename = filename
        self.digits = digits
        self.coordinates: list[Coordinate] = []
        specs = {p.name: p for p in searchable}
        for index, entry in enumerate(config.models):
            if entry.model == config.base_model and method.base != registry.BASE_IGNORED:
                continue  # the base of a task-vector method has no weight
            for name in parameters:
                spec = specs[name]
                low, high = limits.get(name, (spec.low, spec.high))
                if low is None or high is None or not low < high:
                    raise ConfigError(f"parameter {name}: give finite bounds low < high (--bounds {name}=LOW:HIGH)")
                self.coordinates.append(Coordinate(index, entry.model, name, points, float(low), float(high)))
        if not self.coordinates:
            raise ConfigError(f"{filename}: no model other than the base to search over")

    @property
    def dimension(self) -> int:
        return sum(c.points for c in self.coordinates)

    def values(self, x) -> list[float | list[float]]:
        """Each coordinate's value (a scalar, or a gradient list) at the unit-cube point ``x``."""
        out, i = [], 0
        for c in self.coordinates:
            vals = [round(c.low + min(max(float(v), 0.0), 1.0) * (c.high - c.low), self.digits)
                    for v in x[i:i + c.points]]
            out.append(vals[0] if c.points == 1 else vals)
            i += c.points
        return out

    def initial_point(self) -> list[float]:
        """The template's own values where it sets a scalar in range, else the middle of the range."""
        x = []
        for c in self.coordinates:
            value = (self.template["models"][c.model_index].get("parameters") or {}).get(c.parameter)
            start = 0.5
            if isinstance(value, (int, float)) and not isinstance(value, bool) and c.low <= value <= c.high:
                start = (value - c.low) / (c.high - c.low)
            x += [start] * c.points
        return x

    def recipe(self, x) -> str:
        """The merge YAML of the point ``x``: the template with the searched values filled in."""
        doc = yaml.safe_load(self.text)
        for c, value in zip(self.coordinates, self.values(x)):
            entry = doc["models"][c.model_index]
            if not isinstance(entry, dict):
                entry = doc["models"][c.model_index] = {"model": entry}
            params = entry.get("parameters") or {}
            params[c.parameter] = value
            entry["parameters"] = params
        return yaml.safe_dump(doc, sort_keys=False)

    def describe(self, x) -> str:
        """``model.parameter=value`` for every coordinate, one line."""
        return ", ".join(f"{c.model.rsplit('/', 1)[-1]}.{c.parameter}={v}" for c, v in zip(self.coordinates,
                                                                                              self.values(x)))
