"""``convert``: freeze gates into a physically smaller model made of the host library's own classes."""

from __future__ import annotations

import copy
import logging
from collections import defaultdict

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DynsparseError, UnsupportedModuleError
from ..gates import InputDependentGate
from ..modules import join_fqn
from .io import HISTORY_ATTR
from .plan import SlicePlan, compose
from .producer import check_producers, slice_producers_, slot_producers
from .verify import verify

__all__ = ["apply_plan", "convert", "make_plan"]

log = logging.getLogger(__name__)
_NO_SLICER = "no slicer is known for this module"


def _slots(model: nn.Module):
    from ..layers.slot import GateSlot

    return [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, GateSlot)]


def _keep(slot) -> tuple[Tensor, Tensor]:
    """Keep indices and eval values of a slot's gate; keep-none keeps one unit with value 0 (no 0-width tensor)."""
    with torch.no_grad():
        values = slot.gate.eval_values().detach()
        idx = slot.gate.keep_mask().nonzero().flatten()
    if idx.numel() == 0:
        return torch.zeros(1, dtype=torch.long, device=values.device), torch.zeros(
            1, dtype=values.dtype, device=values.device
        )
    return idx, values[idx]


def make_plan(model: nn.Module) -> SlicePlan:
    """The `SlicePlan` of a gated model: for every gate slot, the sorted indices its gate keeps.

    A gate on a layer's input channels that removes any (`GatedLayer.input_slots`) also records the modules
    outside the layer that produce those channels (``plan.producers``).

    Raises:
        UnsupportedModuleError: such a gate removes channels whose producer cannot be sliced exactly (names the
            layer and the module that stops the search).
    """
    _refuse_meta(model, "make_plan")
    plan = SlicePlan()
    for fqn, slot in _slots(model):
        keep = slot.gate.keep_mask().nonzero().flatten().tolist()
        plan.entries[fqn] = {slot.dimension: keep}
        plan.units[fqn] = slot.gate.num_units
        if len(keep) < slot.gate.num_units:
            found = slot_producers(model, fqn, slot.dimension)
            if found is not None:
                plan.producers[fqn] = found
    return plan


def _refuse_meta(model: nn.Module, caller: str) -> None:
    """Raise `ConfigError` naming the first gate on the meta device: its keep mask and values have no data."""
    for fqn, slot in _slots(model):
        if any(t.is_meta for t in (*slot.gate.parameters(), *slot.gate.buffers())):
            raise ConfigError(
                f"{caller}: the gate {join_fqn(fqn, 'gate')!r} is on the meta device, so its keep mask has no values; "
                "materialize the model and load its weights first (model.to_empty(device=...), load_state_dict)"
            )


def _set(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    if not fqn:
        return new
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def _slice_units(model: nn.Module, fqn: str, child: str, dim: str, idx: Tensor, scale: Tensor | None) -> None:
    """Slice the host layer at ``fqn`` for the gate at its child ``child``."""
    from ..integrations import tables as table

    module = model.get_submodule(fqn) if fqn else model
    gated_cls = table.gated_class(dim, module)
    if gated_cls is None:
        raise UnsupportedModuleError(
            fqn, type(module).__name__, dim, "no slicer is known for this module", action="convert"
        )
    try:
        gated_cls.slice_(module, child, idx, scale)
    except UnsupportedModuleError as e:
        raise UnsupportedModuleError(fqn, e.module_type, e.dimension, e.reason, action="convert") from None


def _close(model: nn.Module, closed: dict[str, set[str]]) -> nn.Module:
    from ..integrations import tables as table

    # deepest first, so a replaced block never hides another closed block's path
    for fqn in sorted(closed, key=lambda f: -f.count(".")):
        block = model.get_submodule(fqn) if fqn else model
        try:
            new = table.close_branches(block, closed[fqn])
        except UnsupportedModuleError as e:
            raise UnsupportedModuleError(fqn, e.module_type, e.dimension, e.reason, action="convert") from None
        if new is not None:
            model = _set(model, fqn, new)
    return model


def convert(
    model: nn.Module,
    *,
    verify_inputs: Tensor | tuple | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    static: bool = True,
    uniform: bool = False,
) -> nn.Module:
    """Freeze every gate into a new, physically smaller model; the input model is not changed.

    For each gate the kept units (its ``keep_mask()``) are sliced out of its producer and consumer weights; the
    eval value of a kept unit or branch, when not 1, is folded into the consumer; a ``layers`` gate whose mask
    removes the branch removes it (the block becomes
    ``nn.Identity``, its shortcut, or keeps a parameter-free ``ZeroBranch``); keep-none of a unit gate keeps
    one unit whose consumer weights are zero, so no tensor has width 0. The result holds the host
    library's own classes (timm ``Attention`` with fewer ``num_heads``, ``Mlp`` with a narrower ``fc1``, ...)
    and no gate, slot or hook of dynsparse. It is returned in eval mode, with its `SlicePlan` as
    ``model.slice_plan``.

    Args:
        model: A gated model (``sparsify_``-ed, possibly with fixed gates).
        verify_inputs: If given, run both models on it (eval mode) and raise when outputs differ by more than
            ``atol + rtol * |reference|``; the max-abs difference is logged.
        atol: Absolute tolerance of the check.
        rtol: Relative tolerance of the check.
        static: ``True`` refuses input-dependent gates (a fully static model); ``False`` keeps them as run-time
            skip modules.
        uniform: First make every layer keep the same number of units per dimension (`uniform_gates_`: the mean
            count, best units by gate value), so a Hugging Face model's config can describe the result and
            ``save_pretrained`` / ``from_pretrained`` rebuild it; raises when its config still cannot (see
            `dynsparse.integrations.hf.finalize_`). ``verify_inputs`` then compares with the equalized model.

    Returns:
        The converted model.

    Raises:
        ConfigError: input-dependent gates with ``static=True``.
        UnsupportedModuleError: a gate whose producer cannot be sliced (names the fqn).
        DynsparseError: the verification failed.
    """
    dynamic = [fqn for fqn, m in model.named_modules() if isinstance(m, InputDependentGate)]
    if dynamic and static:
        raise ConfigError(
            f"convert(static=True): the model has input-dependent gates ({', '.join(dynamic[:5])}); "
            "pass static=False to keep them as run-time skip modules"
        )
    _refuse_meta(model, "convert")
    if uniform:
        from .uniform import uniform_gates_

        model = uniform_gates_(copy.deepcopy(model))
    plan = make_plan(model)
    prior = getattr(model, "slice_plan", None)  # a converted (or loaded) model gated again: its earlier plan
    if prior is not None:
        _compose(prior, plan)  # refuse before the work
    new = copy.deepcopy(model).eval()
    from ..integrations import tables as table
    from ..layers.base import GatedLayer

    # 1. unit gates: slice producer/consumer, fold eval values, then swap the layer back to its host class
    owners: dict[str, list[tuple[str, object]]] = defaultdict(list)
    for fqn, slot in _slots(new):
        if slot.dimension not in ("layers", "width"):
            parent, child = table.slot_owner(new, fqn, slot.dimension)
            owners[parent].append((child, slot))
    for parent, items in owners.items():
        for child, slot in items:
            idx, values = _keep(slot)
            full = idx.numel() == slot.gate.num_units and bool(torch.all(values == 1))
            if not full:
                _slice_units(new, parent, child, slot.dimension, idx, None if bool(torch.all(values == 1)) else values)
            fqn = f"{parent}.{child}".strip(".")
            if fqn in plan.producers:  # a gate on the layer's input channels: slice what produces them
                slice_producers_(new, plan.producers[fqn], idx)
        layer = new.get_submodule(parent) if parent else new
        if isinstance(layer, GatedLayer):
            new = _set(new, parent, layer.to_host())
        else:  # a slot installed by hand in a host module
            for child, slot in items:
                table.unslot_(new, f"{parent}.{child}".strip("."), slot.inner)
    # 2. branch gates: fold non-binary values, restore the original child, then remove closed branches
    closed: dict[str, set[str]] = defaultdict(set)
    widths = [(fqn, slot) for fqn, slot in _slots(new) if slot.dimension == "width"]
    for fqn, slot in _slots(new):
        if slot.dimension == "width":
            continue
        parent, child = table.slot_owner(new, fqn, "layers")
        block = new.get_submodule(parent) if parent else new
        # the mask decides, as in make_plan: a kept branch with value 0 stays (weights scaled by 0), a negative
        # value is folded like any other, so the converted model and its plan always agree
        kept = bool(slot.gate.keep_mask().reshape(()))
        v = float(slot.gate.eval_values().detach().reshape(()))
        if not kept:
            closed[parent].add(child)
        elif v != 1.0:
            try:
                table.fold_branch_scale_(block, child, v)
            except UnsupportedModuleError as e:
                raise UnsupportedModuleError(parent, e.module_type, e.dimension, e.reason, action="convert") from None
        table.unslot_(new, fqn, slot.inner)
    new = _close(new, closed)
    for _, slot in widths:  # 3. the residual-stream width, one gate for the whole model
        idx, values = _keep(slot)
        table.slice_width_(new, idx, None if bool(torch.all(values == 1)) else values)
    new = table.finalize_(new, uniform=uniform).eval()  # the stand-ins of removed parts too
    _check_clean(new)
    if not static:
        plan.dynamic.update(dynamic_specs(new))
    new.slice_plan = plan if prior is None else _compose(prior, plan)
    new.__dict__.pop(HISTORY_ATTR, None)  # the sparsify_ calls made the gates this model no longer has
    if verify_inputs is not None:
        width = None
        if "width" in plan.entries and plan.units.get("width") is not None:
            width = (int(plan.units["width"]), plan.keep("width"))
        try:
            diff = verify(model, new, verify_inputs, atol=atol, rtol=rtol, width=width)
        except DynsparseError:
            raise
        except Exception as e:  # a shape mismatch left by a slicer: refuse instead of a raw traceback
            raise DynsparseError(
                f"convert: the gated or the converted model fails on verify_inputs ({type(e).__name__}: {e}); "
                "if the gated model runs on them, the conversion is wrong: please report it"
            ) from e
        log.info("convert: max-abs difference to the gated model %.3g", diff)
    return new


def _compose(prior: SlicePlan, plan: SlicePlan, caller: str = "convert") -> SlicePlan:
    """``plan`` (of a model converted before, gated again) made relative to the original host; `compose` errors
    name the ``caller``."""
    try:
        return compose(prior, plan)
    except ConfigError as e:
        raise ConfigError(
            f"{caller}: the model was converted before (it carries a slice plan), and the new plan cannot be made "
            f"relative to the original host (its result could not be saved): {e}"
        ) from None


def dynamic_specs(model: nn.Module) -> dict[str, dict]:
    """The plan's ``dynamic`` field for ``model`` as it is now: each run-time part's spec, current budgets included.

    Read from the model, not from a cached plan, so a budget changed after `convert` (``set_budget_``) is what a
    save records.
    """
    from ..layers.dynamic import DYNAMIC_PARTS

    out = {}
    for key, part in DYNAMIC_PARTS.items():
        try:
            spec = part.spec_of(model)
        except ImportError:  # a part whose module is not part of this build
            continue
        if spec is not None:
            out[key] = spec
    return out


def _check_clean(model: nn.Module) -> None:
    from ..gates import Gate
    from ..layers.base import GatedLayer
    from ..layers.slot import GateSlot

    left = [fqn for fqn, m in model.named_modules() if isinstance(m, (Gate, GateSlot, GatedLayer))]
    if left:
        raise DynsparseError(f"convert left gated modules behind: {left[:5]}")


def apply_plan(model: nn.Module, plan: SlicePlan) -> nn.Module:
    """Replay ``plan`` on a fresh, ungated host model (in place) and return it (it may be a new root).

    Only shapes change: the weights are those of ``model``, sliced; load the converted weights afterwards. The
    result carries the plan as ``model.slice_plan``, as `convert`'s does (composed with the plan ``model`` already
    carried, if any), so it can be saved, or gated and converted again.

    Raises:
        ConfigError: a plan entry names a module the model does not have, or a unit count that differs.
    """
    from ..integrations import tables as table

    prior = getattr(model, "slice_plan", None)
    if prior is not None:
        _compose(prior, plan, "apply_plan")  # refuse before the model changes
    closed: dict[str, set[str]] = defaultdict(set)
    width: list[int] | None = None
    for fqn in sorted(plan.entries):
        dim, keep = plan.dimension(fqn), plan.keep(fqn)
        if dim == "width":
            width = keep if keep else [0]
            continue
        parent, child = table.slot_owner(model, fqn, dim)
        try:
            block = model.get_submodule(parent) if parent else model
        except AttributeError:
            raise ConfigError(f"slice plan entry {fqn!r}: the model has no module {parent!r}") from None
        if not hasattr(block, child) and not _listed(block, dim, child):
            raise ConfigError(f"slice plan entry {fqn!r}: {type(block).__name__} at {parent!r} has no child {child!r}")
        if dim == "layers":
            if not keep:
                closed[parent].add(child)
            continue
        n = plan.units.get(fqn)
        if n is None:  # the field is optional: check the indices against the model's own count
            _check_range(fqn, dim, keep, _units(block, dim, child))
        else:
            gated_cls = table.gated_class(dim, block)
            if gated_cls is None:
                raise UnsupportedModuleError(
                    parent, type(block).__name__, dim, "no slicer is known for this module", action="convert"
                )
            specs = {s.child: s.num_units for s in gated_cls._slot_specs(block)}
            if specs.get(child) != n:
                raise ConfigError(f"slice plan entry {fqn!r}: plan has {n} units, the model has {specs.get(child)}")
        if n is not None and len(keep) == n:
            continue
        idx = torch.tensor(keep if keep else [0], dtype=torch.long)
        producers = plan.producers.get(fqn)
        if producers is None:
            producers = slot_producers(model, fqn, dim)  # a plan written without the record
        if producers is not None:
            check_producers(model, producers, n if n is not None else _units(block, dim, child), fqn)
        _slice_units(model, parent, child, dim, idx, None)
        if producers is not None:
            slice_producers_(model, producers, idx)
    model = _close(model, closed)
    if width is not None:
        table.slice_width_(model, torch.tensor(width, dtype=torch.long))
    model = table.finalize_(model)
    if plan.dynamic:
        from ..layers.dynamic import DYNAMIC_PARTS

        for key, part in DYNAMIC_PARTS.items():
            if key in plan.dynamic:
                try:
                    part.apply_(model, **plan.dynamic[key])
                except (ConfigError, TypeError) as e:
                    raise ConfigError(f"slice plan 'dynamic.{key}': {e}") from None
    model.slice_plan = plan if prior is None else _compose(prior, plan, "apply_plan")
    return model


def _check_range(fqn: str, dim: str, keep: list[int], n: int | None) -> None:
    """Raise `ConfigError` naming the plan entry when ``keep`` indexes past the ``n`` units the model has."""
    if n is not None and keep and keep[-1] >= n:
        raise ConfigError(f"slice plan entry {fqn!r}.{dim}: index {keep[-1]} out of range, the model has {n} units")


def _units(block: nn.Module, dim: str, child: str) -> int | None:
    from ..integrations import tables as table

    gated_cls = table.gated_class(dim, block)
    specs = {s.child: s.num_units for s in gated_cls._slot_specs(block)} if gated_cls is not None else {}
    return specs.get(child)


def _listed(block: nn.Module, dim: str, child: str) -> bool:
    """True when a table lists ``child`` (a path such as ``"o_proj.gate_in"``) as a slot of ``block``."""
    from ..integrations import tables as table

    return table.owns(block, dim, child)
