"""One lookup over every host integration table (timm always; Hugging Face transformers once it is imported).

``sparsify_``, ``convert`` and ``apply_plan`` ask this module, never a table directly. A model can only hold
transformers classes when transformers has been imported, so the HF table is consulted only then: ``import
dynsparse`` and timm-only work never import transformers.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType
from typing import Any

from torch import nn

from ..gates import GateSpec
from ..layers.base import GatedLayer
from ..layers.residual import Branch
from ..modules import submodule_or_none

__all__ = [
    "branches_of",
    "check_width",
    "close_branches",
    "covered",
    "finalize_",
    "fold_branch_scale_",
    "gate_branches_",
    "gate_width_",
    "gated_class",
    "host_type",
    "input_producers",
    "output_projection",
    "owns",
    "returned_outputs",
    "round_width_",
    "slice_width_",
    "slot_owner",
    "tables",
    "unknown_block_reason",
    "unscaled",
    "unslot_",
    "unsupported_reason",
]

log = logging.getLogger(__name__)
_HF_FAILED: list[str] = []


def tables() -> list[ModuleType]:
    """The integration tables to consult, timm first."""
    from . import timm as timm_table

    out = [timm_table]
    if "transformers" in sys.modules:
        try:
            from . import hf
        except ImportError as e:  # an incompatible transformers must not break timm models
            if not _HF_FAILED:
                _HF_FAILED.append(str(e))
                log.warning("dynsparse: the Hugging Face table is unavailable (%s)", e)
        else:
            out.append(hf)
    return out


def host_type(module: nn.Module) -> type[nn.Module]:
    """The host class of ``module`` (its own class, or the host class of a gated layer)."""
    return getattr(type(module), "host_class", type(module))


def gated_class(dim: str, module: nn.Module) -> type[GatedLayer] | None:
    """The gated class of ``module``'s host class for ``dim``, or None."""
    host = host_type(module)
    for t in tables():
        cls = t.GATED_LAYERS.get(dim, {}).get(host)
        if cls is not None:
            return cls
    return None


def unsupported_reason(dim: str, module: nn.Module) -> str | None:
    """Why ``module`` looks gatable for ``dim`` but is not, if a table says so."""
    host = host_type(module)
    for t in tables():
        reason = t.UNSUPPORTED.get(dim, {}).get(host)
        if reason is not None:
            return reason
    return None


def covered(dim: str, module: nn.Module) -> bool:
    """True when ``module`` is gated for ``dim`` through a parent (so it is not reported as unknown)."""
    return any(host_type(module) in getattr(t, "COVERED", {}).get(dim, {}) for t in tables())


def unknown_block_reason(module: nn.Module) -> str | None:
    """Why a block that looks like a residual layer of a known host library has no ``layers`` gates, or None."""
    for t in tables():
        fn = getattr(t, "unknown_block_reason", None)
        reason = fn(module) if fn is not None else None
        if reason is not None:
            return reason
    return None


def output_projection(block: nn.Module) -> tuple[str, ...] | None:
    """Children that alone produce ``block``'s output channels (conv first), if a table knows ``block``.

    Raises:
        UnsupportedModuleError: a table knows ``block`` but its output channels cannot be sliced (e.g. a skip).
    """
    for t in tables():
        fn = getattr(t, "output_projection", None)
        proj = fn(block) if fn is not None else None
        if proj is not None:
            return proj
    return None


def input_producers(parent: nn.Module, child: str) -> tuple[str, ...] | None:
    """Children of ``parent`` that produce the input of its child ``child`` (conv first), if a table says so."""
    for t in tables():
        fn = getattr(t, "input_producers", None)
        found = fn(parent, child) if fn is not None else None
        if found is not None:
            return found
    return None


def returned_outputs(parent: nn.Module, child: str) -> str | None:
    """Why ``parent`` itself reads the outputs of the children of its ``nn.Sequential`` ``child`` (a ``features_only``
    model returns stage outputs), if a table says so."""
    for t in tables():
        fn = getattr(t, "returned_outputs", None)
        reason = fn(parent, child) if fn is not None else None
        if reason is not None:
            return reason
    return None


def _table_of_block(block: nn.Module) -> ModuleType | None:
    host = host_type(block)
    return next((t for t in tables() if host in t.BRANCHES), None)


def branches_of(module: nn.Module) -> list[Branch] | None:
    """Residual branches of ``module`` (slots may be paths below it), or None."""
    t = _table_of_block(module)
    return t.branches_of(module) if t is not None else None


def gate_branches_(block: nn.Module, gate: GateSpec, fqn: str = "") -> nn.Module:
    """Put a ``layers`` gate on every residual branch of ``block`` (in place)."""
    t = _table_of_block(block)
    branches = t.branches_of(block)
    if hasattr(t, "gate_branches_"):
        return t.gate_branches_(block, branches, gate, fqn=fqn)
    from ..layers.residual import gate_branches_

    return gate_branches_(block, branches, gate, fqn=fqn)


def fold_branch_scale_(block: nn.Module, slot: str, v: float) -> None:
    """Fold a branch gate value ``v`` into the last affine step of the branch at ``slot``."""
    _table_of_block(block).fold_branch_scale_(block, slot, v)


def close_branches(block: nn.Module, closed: set[str]) -> nn.Module | None:
    """Remove closed branches of ``block``: a replacement module, or None when edited in place.

    The modules a table makes for the removed parts (`ZeroBranch`, ``nn.Identity``, ...) take ``block``'s training
    flag: a converted model is in eval mode throughout.
    """
    t = _table_of_block(block)
    if t is None:
        from . import timm as t  # its close_branches raises the "no rule" error
    mode, before = block.training, {id(m) for m in block.modules()}
    new = t.close_branches(block, closed)
    for m in (block if new is None else new).modules():
        if id(m) not in before:
            m.training = mode
    return new


def owns(module: nn.Module, dim: str, child: str) -> bool:
    if dim == "layers":
        branches = branches_of(module)
        return branches is not None and any(b.slot == child for b in branches)
    cls = gated_class(dim, module)
    return cls is not None and any(s.child == child for s in cls._slot_specs(module))


def slot_owner(model: nn.Module, fqn: str, dim: str) -> tuple[str, str]:
    """``(owner_fqn, child)``: the module a gate slot at ``fqn`` belongs to, and the slot's path below it.

    The owner is the nearest ancestor that a table knows for ``dim`` and that lists the slot (a timm slot is a
    direct child of its layer; a Hugging Face slot sits in a carrier, e.g. ``"o_proj.gate_in"``). Works on gated
    models and on fresh hosts (plan replay). Falls back to the direct parent.
    """
    parts = fqn.split(".")
    for i in range(len(parts) - 1, -1, -1):
        owner, child = ".".join(parts[:i]), ".".join(parts[i:])
        module = submodule_or_none(model, owner)
        if module is not None and owns(module, dim, child):
            return owner, child
    parent, _, child = fqn.rpartition(".")
    return parent, child


def unslot_(model: nn.Module, fqn: str, inner: nn.Module | None) -> None:
    """Take the gate slot at ``fqn`` out of ``model`` (in place), restoring the child it replaced (``inner``)."""
    parent_fqn, _, child = fqn.rpartition(".")
    parent = submodule_or_none(model, parent_fqn)
    if child in ("gate_in", "gate_out") and "transformers" in sys.modules:
        from ..layers.hf_base import is_carrier, uncarry_path_

        if is_carrier(parent):
            uncarry_path_(model, parent_fqn, child)
            return
    setattr(parent, child, inner)


def finalize_(model: nn.Module, uniform: bool = False) -> nn.Module:
    """Host-specific finishing of a converted or plan-replayed model (HF: cache indices and config)."""
    for t in tables():
        fn = getattr(t, "finalize_", None)
        if fn is not None:
            model = fn(model, uniform=uniform)
    return model


def arch_of(model: nn.Module) -> dict[str, Any] | None:
    """An architecture spec a table can give for ``model`` (HF: class name + config), or None."""
    for t in tables():
        fn = getattr(t, "arch_of", None)
        spec = fn(model) if fn is not None else None
        if spec is not None:
            return spec
    return None


def _width_table() -> ModuleType | None:
    if "transformers" not in sys.modules or not any(t.__name__.endswith(".hf") for t in tables()):
        return None
    from . import hf_width

    return hf_width


def unscaled(model: nn.Module, dim: str) -> list[str]:
    """Modules inside a ``dim`` gate's scope whose *own* cost that gate does not scale (fqns; their children still
    scale). For ``width`` (the whole model), the attention kernels: q·k and attention·v run over the heads'
    channels, not over the residual stream (`dynsparse.integrations.hf_width.KERNELS`)."""
    hw = _width_table() if dim == "width" else None
    return hw.kernels_of(model) if hw is not None else []


def check_width(model: nn.Module) -> int:
    """The residual-stream width of ``model`` (the units of its ``width`` gate); raise unless ``model`` can take a
    ``width`` gate (a Hugging Face model the width table covers)."""
    from ..errors import UnsupportedModuleError

    hw = _width_table()
    width = None if hw is None else hw.width_of(model)
    if width is None:
        raise UnsupportedModuleError(
            "",
            type(model).__name__,
            "width",
            "no residual-stream rule is known for this model (width covers Hugging Face BERT, RoBERTa, ViT, GPT-2, "
            "Llama, Qwen2 and Mistral)",
        )
    hw.check_covered(model)
    return width


def gate_width_(model: nn.Module, gate: GateSpec) -> nn.Module:
    """Put one ``width`` gate over the residual stream of ``model`` (in place)."""
    return _width_table().gate_width_(model, gate)


def slice_width_(model: nn.Module, idx: Any, scale: Any = None) -> nn.Module:
    """Keep residual-stream channels ``idx`` of ``model`` (in place); ``scale`` is folded into its norms."""
    hw = _width_table()
    if hw is None:
        from ..errors import ConfigError

        raise ConfigError(f"a 'width' plan entry needs a Hugging Face model, got {type(model).__name__}")
    return hw.slice_width_(model, idx, scale)


def round_width_(model: nn.Module) -> nn.Module:
    """``uniform=True``: let a table round a ``width`` gate's keep count to what a config can say (in place)."""
    for t in tables():
        fn = getattr(t, "round_width_", None)
        if fn is not None:
            fn(model)
    return model
