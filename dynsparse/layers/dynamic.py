"""The table of input-dependent ("dynamic") parts that ``sparsify_``, ``convert`` and ``apply_plan`` know.

A dynamic part is a way of skipping work per input at run time: ``tokens`` (`dynsparse.layers.tokens`),
``depth`` (`dynsparse.layers.routing`), and per-input ``channels`` / ``neurons`` / ``heads`` (a static dimension
becomes dynamic when its spec names a gate of the part's registry, e.g. ``{"channels": {"gate": "fbs"}}``).

Each part is data: the module holding its functions, by name, so nothing is imported before it is used:

- ``apply(model, **spec)`` installs the part in place (``sparsify_`` and ``apply_plan`` call it);
- ``spec(model) -> dict | None`` gives the ``apply`` arguments that rebuild the part (``convert`` saves them in
  the plan's ``dynamic`` field, so a converted model reloads without pickle);
- ``registry`` names the `dynsparse.registry.Registry` of the gates the part accepts, as ``"module:attribute"``
  (``":NAME"``: an attribute of the part's own module).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..registry import suggest

__all__ = ["DYNAMIC_PARTS", "DynamicPart", "dynamic_part_of"]


@dataclass(frozen=True)
class DynamicPart:
    """One input-dependent part (see the module doc)."""

    key: str
    module: str
    apply: str
    spec: str
    registry: str
    default_gate: str | None
    what: str
    #: True when the part owns the dimension whatever the gate (``tokens``, ``depth``); False when only a gate
    #: of its registry makes the (otherwise static) dimension dynamic (``channels``, ``neurons``).
    always: bool = True
    #: True when ``apply`` takes ``include`` / ``exclude`` fqn globs; False for a part placed by block indices
    #: alone (``tokens``: a token gate changes the tokens of every later block), whose ``blocks`` the top-level
    #: globs of ``sparsify_`` must select instead.
    globs: bool = True

    def _module(self):
        return importlib.import_module(self.module, package=__package__)

    def gates(self):
        """The registry of gates this part accepts (``registry`` is ``"module:attribute"``, relative to here)."""
        mod, _, attr = self.registry.rpartition(":")
        return getattr(importlib.import_module(mod, package=__package__) if mod else self._module(), attr)

    def apply_(self, model, **spec):
        return getattr(self._module(), self.apply)(model, **spec)

    def default(self, option: str) -> Any:
        """The default of ``apply``'s argument ``option``."""
        return inspect.signature(getattr(self._module(), self.apply)).parameters[option].default

    def spec_of(self, model) -> dict | None:
        return getattr(self._module(), self.spec)(model)

    def check(self, opts: dict[str, Any]) -> None:
        """Raise `ConfigError` when ``opts['gate']`` is not a gate of this part, or an option is neither an argument
        of ``apply`` nor of the gate (a typo would otherwise end in a bare ``TypeError`` from the gate's class)."""
        names = self.gates().names()
        name = opts.get("gate", self.default_gate)
        if name not in names:
            raise ConfigError(
                f"sparsify spec field {self.key!r}: unknown {self.what} {name!r}.{suggest(str(name), names)} "
                f"Known: {', '.join(names)}"
            )
        own, of_gate = _arguments(getattr(self._module(), self.apply)), _arguments(self.gates().get(name))
        if own is None or of_gate is None:  # a **kwargs catch-all: the callee checks
            return
        known = (own | of_gate) - _SET_BY_THE_LAYER
        for key in opts:
            if key not in known and key not in ("include", "exclude"):  # globs: `sparsify._dynamic_options` checks
                raise ConfigError(
                    f"sparsify spec field '{self.key}.{key}': not an option of the {name!r} {self.what}."
                    f"{suggest(str(key), sorted(known))} Options: {', '.join(sorted(known))}"
                )


#: Gate arguments that the layer installing a gate sets (from the model), never a spec.
_SET_BY_THE_LAYER = {"model", "num_units", "dim", "in_dim", "device", "dtype"}


def _arguments(fn: Any) -> set[str] | None:
    """Named arguments of ``fn`` (a function or a class), without a ``**`` catch-all's name (a part's ``apply``
    passes those on to the gate); None for a class whose ``__init__`` takes any keyword (only it can check)."""
    params = inspect.signature(fn).parameters.values()
    if inspect.isclass(fn) and any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


#: key -> part, in the order parts are installed (inner modules first, then whole blocks; token gates before
#: routers, which route the blocks after a token gate in the token gates' layout; per-input heads after token
#: gates, which they refuse).
DYNAMIC_PARTS: dict[str, DynamicPart] = {
    "neurons": DynamicPart(
        "neurons",
        ".neuron_gating",
        "gate_neurons_",
        "neuron_spec",
        ":NEURON_GATES",
        None,
        "per-input neuron gate",
        always=False,
    ),
    "channels": DynamicPart(
        "channels",
        ".channel_gating",
        "gate_channels_",
        "channel_spec",
        ":CHANNEL_GATES",
        None,
        "per-input channel gate",
        always=False,
    ),
    "tokens": DynamicPart(
        "tokens",
        ".token_setup",
        "gate_tokens_",
        "token_spec",
        "..gates.tokens:TOKEN_GATES",
        "cls_attention",
        "token gate",
        globs=False,
    ),
    "heads": DynamicPart(
        "heads",
        ".head_gating",
        "gate_heads_",
        "head_spec",
        "..gates.head_gates:HEAD_GATES",
        None,
        "per-input head gate",
        always=False,
    ),
    "depth": DynamicPart(
        "depth", ".routing", "route_blocks_", "depth_spec", "..gates.routers:ROUTERS", "router", "block router"
    ),
}


def dynamic_part_of(dim: str, opts: dict[str, Any] | None) -> DynamicPart | None:
    """The dynamic part a ``sparsify_`` spec entry asks for, or None for a static dimension."""
    part = DYNAMIC_PARTS.get(dim)
    if part is None:
        return None
    if part.always:
        return part
    gate = (opts or {}).get("gate")
    if not isinstance(gate, str):
        return None
    try:
        names = part.gates().names()
    except (ImportError, AttributeError):  # the part's module is not built yet
        return None
    return part if gate in names else None
