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
        """Raise `ConfigError` when ``opts['gate']`` is not a gate of this part."""
        names = self.gates().names()
        name = opts.get("gate", self.default_gate)
        if name not in names:
            raise ConfigError(
                f"sparsify spec field {self.key!r}: unknown {self.what} {name!r}.{suggest(str(name), names)} "
                f"Known: {', '.join(names)}"
            )


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
