"""``SlicePlan``: which units a conversion keeps, as versioned JSON data (no code, no pickle)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "SlicePlan", "compose"]

PLAN_FORMAT = "dynsparse.slice_plan"
#: The newest plan version this dynsparse writes and reads. Version 2 adds ``producers``; a plan without them is
#: written as version 1, so older readers still load it, and a reader that predates ``producers`` refuses a plan
#: that needs them (by version) instead of failing later at the weights.
PLAN_VERSION = 2
_READS = (1, 2)
_DIMS = ("neurons", "heads", "channels", "layers", "width")


@dataclass
class SlicePlan:
    """``fqn -> dimension -> sorted keep indices``, where ``fqn`` names the place a gate sits.

    The fqn is the gate slot's qualified name in the host model (``"blocks.0.mlp.norm"`` for an MLP's
    neurons, ``"layer1.0.act1"`` for a ResNet block's first internal channels, ``"blocks.3.drop_path1"``
    for a ViT block's attention branch). ``units`` records each gate's original unit count, so a plan can
    be checked against the model it is applied to. A ``layers`` entry is ``[0]`` (kept) or ``[]`` (removed).

    A gate on a layer's *input* channels (the depthwise channels of a timm ``DepthwiseSeparableConv``) also
    slices modules outside its layer: ``producers`` records them, ``fqn -> [module fqns]`` (``["conv_stem",
    "bn1"]``), each sliced on its output channels with the entry's keep indices, so a replay needs no search.

    Examples:
        >>> plan = SlicePlan({"blocks.0.mlp.norm": {"neurons": [0, 2]}}, {"blocks.0.mlp.norm": 4})
        >>> SlicePlan.from_json(plan.to_json()) == plan
        True
    """

    entries: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    units: dict[str, int] = field(default_factory=dict)
    #: Input-dependent parts kept as run-time modules, as ``dynsparse.sparsify_`` specs (e.g. ``{"tokens": ...}``).
    dynamic: dict[str, Any] = field(default_factory=dict)
    #: Modules outside a gate's layer that produce its units (``fqn -> [module fqns]``), sliced with the entry.
    producers: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for fqn, n in self.units.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ConfigError(f"slice plan units {fqn!r}: expected a positive int (the unit count), got {n!r}")
        for fqn, mods in self.producers.items():
            if fqn not in self.entries:
                raise ConfigError(f"slice plan producers {fqn!r}: no entry of that name")
            if not isinstance(mods, list) or not all(isinstance(m, str) for m in mods):
                raise ConfigError(f"slice plan producers {fqn!r}: expected a list of module names")
        for fqn, dims in self.entries.items():
            if not isinstance(dims, Mapping) or len(dims) != 1:
                raise ConfigError(f"slice plan entry {fqn!r} must map exactly one dimension to keep indices")
            for dim, idx in dims.items():
                if dim not in _DIMS:
                    raise ConfigError(f"slice plan entry {fqn!r}: unknown dimension {dim!r} (known: {_DIMS})")
                if not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
                    raise ConfigError(f"slice plan entry {fqn!r}.{dim}: indices must be ints")
                if list(idx) != sorted(set(idx)):
                    raise ConfigError(f"slice plan entry {fqn!r}.{dim}: indices must be sorted and unique")
                if idx and idx[0] < 0:
                    raise ConfigError(f"slice plan entry {fqn!r}.{dim}: negative index {idx[0]}")
                if dim == "layers" and list(idx) not in ([], [0]):
                    raise ConfigError(f"slice plan entry {fqn!r}.layers: must be [0] (kept) or [] (removed)")
                n = self.units.get(fqn)
                if n is not None and idx and idx[-1] >= n:
                    raise ConfigError(f"slice plan entry {fqn!r}.{dim}: index {idx[-1]} out of range for {n} units")

    def dimension(self, fqn: str) -> str:
        """The dimension of the entry at ``fqn``."""
        return next(iter(self.entries[fqn]))

    def keep(self, fqn: str) -> list[int]:
        """The keep indices of the entry at ``fqn``."""
        return next(iter(self.entries[fqn].values()))

    def to_dict(self) -> dict[str, Any]:
        version = PLAN_VERSION if self.producers else 1
        out = {"format": PLAN_FORMAT, "version": version, "entries": self.entries, "units": self.units}
        if self.dynamic:
            out["dynamic"] = self.dynamic
        if self.producers:
            out["producers"] = self.producers
        return out

    def to_json(self) -> str:
        """Compact, deterministic JSON text."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "slice plan") -> SlicePlan:
        """Parse and validate; errors name ``source`` and the field."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object")
        if data.get("format") != PLAN_FORMAT:
            raise ConfigError(f"{source}: field 'format' must be {PLAN_FORMAT!r}, got {data.get('format')!r}")
        version = data.get("version")
        if version not in _READS:
            raise ConfigError(
                f"{source}: unsupported plan version {version!r} (this dynsparse reads versions "
                f"{', '.join(map(str, _READS))}; a newer dynsparse wrote it)"
            )
        entries, units, dynamic = data.get("entries"), data.get("units", {}), data.get("dynamic", {})
        producers = data.get("producers", {})
        fields = {"entries": entries, "units": units, "dynamic": dynamic, "producers": producers}
        for name, value in fields.items():
            if not isinstance(value, Mapping):
                got = "None" if value is None else type(value).__name__
                raise ConfigError(f"{source}: field {name!r} must be an object, got {got}")
        from ..layers.dynamic import DYNAMIC_PARTS

        unknown = sorted(set(dynamic) - set(DYNAMIC_PARTS))
        if unknown:
            raise ConfigError(f"{source}: unknown dynamic part {unknown[0]!r} (known: {', '.join(DYNAMIC_PARTS)})")
        try:
            return cls(
                {k: {d: list(i) for d, i in v.items()} for k, v in entries.items()},
                dict(units),
                dict(dynamic),
                {k: list(v) if isinstance(v, list) else v for k, v in producers.items()},
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (AttributeError, TypeError) as e:
            raise ConfigError(f"{source}: malformed entries ({e})") from None

    @classmethod
    def from_json(cls, text: str, source: str = "slice plan") -> SlicePlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(data, source)


def compose(first: SlicePlan, second: SlicePlan) -> SlicePlan:
    """The plan of converting twice, relative to the original host: ``first`` converted it, ``second`` the result.

    An fqn in both keeps ``[first.keep[i] for i in second.keep]`` of the host's ``first.units`` (a keep-none
    ``first`` entry left one zeroed unit, so it stays keep-none; a removed branch stays removed); an fqn in one
    plan comes in as it is (the first conversion leaves the unit counts it did not gate as they were). ``dynamic``
    is ``second``'s (the run-time parts of the result); ``producers`` are the union.

    Raises:
        ConfigError: the plans do not compose (names the fqn and the field): an fqn with two dimensions, a
            ``second`` unit count other than what ``first`` kept, or two producer lists for one fqn.

    Examples:
        >>> first = SlicePlan({"mlp.norm": {"neurons": [1, 3, 4]}}, {"mlp.norm": 6})
        >>> second = SlicePlan({"mlp.norm": {"neurons": [0, 2]}}, {"mlp.norm": 3})
        >>> compose(first, second).entries
        {'mlp.norm': {'neurons': [1, 4]}}
    """
    entries = {fqn: {d: list(i) for d, i in dims.items()} for fqn, dims in first.entries.items()}
    units, producers = dict(first.units), {k: list(v) for k, v in first.producers.items()}
    for fqn in second.entries:
        dim, keep = second.dimension(fqn), second.keep(fqn)
        if fqn not in first.entries:
            entries[fqn] = {dim: list(keep)}
            if fqn in second.units:
                units[fqn] = second.units[fqn]
        else:
            entries[fqn] = {dim: _compose_keep(first, fqn, dim, second.units.get(fqn), keep)}
        if fqn in second.producers:
            if producers.get(fqn, second.producers[fqn]) != second.producers[fqn]:
                raise ConfigError(
                    f"slice plan entry {fqn!r}: the two conversions slice different producers "
                    f"({producers[fqn]} and {second.producers[fqn]}); the plans do not compose"
                )
            producers[fqn] = list(second.producers[fqn])
    return SlicePlan(entries, units, dict(second.dynamic), producers)


def _compose_keep(first: SlicePlan, fqn: str, dim: str, n: int | None, keep: list[int]) -> list[int]:
    """The keep indices of the host for ``fqn`` after ``first``, then ``keep`` of the ``n`` units ``first`` left."""
    if first.dimension(fqn) != dim:
        raise ConfigError(
            f"slice plan entry {fqn!r}: the first conversion sliced {first.dimension(fqn)!r}, the second {dim!r}; "
            "the plans do not compose"
        )
    kept = first.keep(fqn)
    if not kept:  # keep-none (one zeroed unit left) or a removed branch: nothing of the host comes back
        return []
    left = len(kept)
    if (n is not None and n != left) or (keep and keep[-1] >= left):
        raise ConfigError(
            f"slice plan entry {fqn!r}.{dim}: the first conversion kept {left} units, the second plan "
            f"{'has ' + str(n) + ' units' if n is not None else 'indexes unit ' + str(keep[-1])}; "
            "the plans do not compose"
        )
    return [kept[i] for i in keep]
