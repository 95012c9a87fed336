"""``sparsify_`` and friends: put gates into a model, list them, freeze them, sum their penalties."""

from __future__ import annotations

import fnmatch
import inspect
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from .errors import ConfigError, GateError, UnsupportedModuleError
from .gates import GATES, Gate, InputDependentGate, make_gate
from .registry import suggest

__all__ = [
    "DIMENSIONS",
    "SparsifyPlan",
    "plan_sparsify",
    "sparsify_",
]

log = logging.getLogger(__name__)

#: The static dimensions ``sparsify_`` knows.
DIMENSIONS = ("neurons", "heads", "channels", "layers")
#: Input-dependent dimensions, decided per input at run time: ``tokens`` (`dynsparse.layers.tokens`) and
#: ``depth`` (per-input block skipping, `dynsparse.layers.routing`). ``channels``, ``neurons`` and ``heads`` are
#: dynamic too when their gate is a per-input one (see `dynsparse.layers.dynamic`).
DYNAMIC_DIMENSIONS = ("tokens", "depth")
#: Dimensions coupled across the whole model: ``width``, one mask over the residual stream of a Hugging Face
#: model (`dynsparse.integrations.hf_width`).
COUPLED_DIMENSIONS = ("width",)

# Class names that look like a candidate for a dimension; an unknown class matching one (that owns a Linear / Conv
# itself) is reported, not ignored. ``heads``: any attention class (timm's ``AttentionRope``, ``Attention2d``,
# ``AttentionCl``, ``EvaAttention``, CaiT's ``ClassAttn`` / ``TalkingHeadAttn``, Swin's ``WindowAttention``...), but
# not a block built around one (``...AttentionBlock``, CaiT's ``LayerScaleBlockClassAttn``).
_LOOKALIKE = {
    "neurons": re.compile(r"(Mlp|MLP|GLU|FeedForward|FFN)$"),
    "heads": re.compile(r"^(?!.*Block).*(Attention|Attn)"),
    "channels": re.compile(r"(BasicBlock|Bottleneck|Residual|SeparableConv|ConvNeXtBlock)$"),
}
_SPEC_KEYS = {"gate", "include", "exclude"}


@dataclass(frozen=True)
class Skipped:
    """A module that looked gatable for a dimension but was not gated, and why."""

    fqn: str
    module_type: str
    dimension: str
    reason: str


@dataclass
class SparsifyPlan:
    """What ``sparsify_`` will do: ``targets`` as ``(fqn, dimension)`` and the modules it must skip."""

    targets: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    gate_specs: dict[str, Any] = field(default_factory=dict)


def _parse_spec(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(f"sparsify spec must be a non-empty mapping of dimension -> options, got {spec!r}")
    out = {}
    for dim, opts in spec.items():
        if dim not in DIMENSIONS + DYNAMIC_DIMENSIONS + COUPLED_DIMENSIONS:
            known = DIMENSIONS + DYNAMIC_DIMENSIONS + COUPLED_DIMENSIONS
            raise ConfigError(
                f"unknown dimension {dim!r} in sparsify spec.{suggest(dim, known)} Known: {', '.join(known)}"
            )
        if opts is None:
            opts = {}
        elif isinstance(opts, str):
            opts = {"gate": opts}
        elif not isinstance(opts, Mapping):
            raise ConfigError(
                f"sparsify spec field {dim!r} must be a mapping like {{'gate': 'hard_concrete'}}, "
                f"got {type(opts).__name__}"
            )
        out[dim] = dict(opts)
    return out


def _patterns(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{where} must be a glob pattern or a list of them, got {value!r}")


def _selected(fqn: str, include: list[str], exclude: list[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(fqn, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(fqn, p) for p in exclude)


def plan_sparsify(
    model: nn.Module,
    spec: Mapping[str, Any],
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> SparsifyPlan:
    """Work out where ``sparsify_`` would put gates, without changing ``model``.

    Args:
        model: The model.
        spec: ``{dimension: {"gate": name, "include": globs, "exclude": globs, **gate_kwargs}}``.
        include: fqn glob patterns; only matching modules get gates (all dimensions; see `sparsify_` for ``tokens``).
        exclude: fqn glob patterns; matching modules get no gates (all dimensions).

    Returns:
        A `SparsifyPlan` listing targets and the modules that cannot be gated.
    """
    from .integrations import tables as table
    from .layers.base import GatedLayer
    from .layers.dynamic import dynamic_part_of
    from .layers.slot import GateSlot

    dims = _parse_spec(spec)
    if "tokens" in dims and "depth" in dims:  # checked before any module changes
        from .layers.routing import check_with_tokens

        check_with_tokens(dims["tokens"], dims["depth"])
    g_inc, g_exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    if getattr(model, "feature_hooks", None) is not None and dims:
        raise UnsupportedModuleError(  # the hooks read tensors inside blocks: a gate would change a feature map
            "",
            type(model).__name__,
            next(iter(dims)),
            "a features_only model that reads its feature maps with forward hooks (feature_location='expansion' or "
            "a FeatureHookNet); build it with the default feature_location",
        )
    plan = SparsifyPlan()
    aliases = _aliases(model)
    for dim, opts in dims.items():
        part = dynamic_part_of(dim, opts)
        if part is not None:
            part.check(opts)
            _dynamic_options(dim, part, opts, g_inc, g_exc)  # its globs are checked before any module changes
            continue
        inc = g_inc + _patterns(opts.pop("include", None), f"{dim}.include")
        exc = g_exc + _patterns(opts.pop("exclude", None), f"{dim}.exclude")
        opts.setdefault("gate", "hard_concrete")
        _check_gate_options(dim, opts)
        plan.gate_specs[dim] = opts
        if dim in COUPLED_DIMENSIONS:  # one gate for the whole model, checked before any module changes
            if inc != g_inc or exc != g_exc:
                raise ConfigError(f"sparsify spec field {dim!r}: one gate covers the whole model (no include/exclude)")
            _check_gate_sizes(dim, opts, {table.check_width(model): "width"})  # a fixed mask of the stream's width
            plan.targets.append(("", dim))
            continue
        found = 0
        sizes: dict[int, str] = {}  # units of each gate the plan puts in -> the first module getting one
        for fqn, module in model.named_modules():
            if isinstance(module, (Gate, InputDependentGate, GateSlot)) or not _selected(fqn, inc, exc):
                continue
            mtype = type(module).__name__
            if dim == "layers":
                branches = table.branches_of(module)
                if branches is None:  # a block class may say why it takes no layer gates (a token-selecting block)
                    reason = table.unknown_block_reason(module) or getattr(type(module), "unsupported_layers", None)
                    if reason is not None:
                        plan.skipped.append(Skipped(fqn, mtype, dim, reason))
                    continue
                gated = [b.slot for b in branches if isinstance(_child(module, b.slot), GateSlot)]
                if gated:
                    plan.skipped.append(Skipped(fqn, mtype, dim, f"{gated} already hold layer gates"))
                    continue
                shared = _shared_reason(fqn, module, aliases)
                if shared is not None:
                    plan.skipped.append(Skipped(fqn, mtype, dim, shared))
                    continue
                plan.targets.append((fqn, dim))
                sizes.setdefault(1, fqn)
                found += 1
                continue
            if isinstance(module, GatedLayer) and module.dimension == dim:
                plan.skipped.append(Skipped(fqn, mtype, dim, f"it is already gated for {dim!r}"))
                continue
            host = table.host_type(module)
            gated_cls = table.gated_class(dim, module)
            unsupported = table.unsupported_reason(dim, module)
            if gated_cls is not None and type(module) is host:
                reason = gated_cls.unsupported_reason(module) or _shared_reason(fqn, module, aliases)
                if reason is None:
                    plan.targets.append((fqn, dim))
                    for slot in gated_cls._slot_specs(module):
                        sizes.setdefault(slot.num_units, fqn)
                    found += 1
                else:
                    plan.skipped.append(Skipped(fqn, mtype, dim, reason))
            elif unsupported is not None:
                plan.skipped.append(Skipped(fqn, mtype, dim, unsupported))
            elif gated_cls is not None:  # a twin of a gatable host with other gates (per-input neuron gates)
                reason = f"it is already gated (a {host.__name__} with other gates)"
                plan.skipped.append(Skipped(fqn, mtype, dim, reason))
            elif (
                gated_cls is None
                and not table.covered(dim, module)
                and dim in _LOOKALIKE
                and _LOOKALIKE[dim].search(host.__name__)
                and not isinstance(module, GatedLayer)
                and _owns_weights(module)
            ):
                plan.skipped.append(
                    Skipped(fqn, mtype, dim, f"no gated layer is known for {host.__module__}.{host.__name__}")
                )
        _check_gate_sizes(dim, opts, sizes)
        if not found and not any(s.dimension == dim for s in plan.skipped):
            raise UnsupportedModuleError(
                "",
                type(model).__name__,
                dim,
                "no module of the model can be gated for this dimension "
                "(check the model family and the include/exclude patterns)",
            )
    return plan


def _check_gate_sizes(dim: str, opts: dict[str, Any], sizes: Mapping[int, str]) -> None:
    """Build a throw-away gate of each size in ``sizes`` (``{num_units: fqn}``), so a gate spec that some layer
    cannot take (``topk`` with ``k`` above its units, a ``fixed`` mask of another length) fails before any module
    is changed. Without sizes, one gate of 4096 units checks the spec alone."""
    for n, fqn in (sizes or {4096: ""}).items():
        try:
            make_gate(opts, n)
        except (ConfigError, GateError) as e:
            at = f" (the {n}-unit gate of {fqn!r})" if fqn else ""
            raise ConfigError(f"sparsify spec field {dim!r}{at}: {e}{_per_input_hint(dim, opts)}") from None


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


_GATE_ARGS = ("num_units", "device", "dtype")  # set by the layer that builds the gate, never by a spec


def _check_gate_options(dim: str, opts: dict[str, Any]) -> None:
    """Refuse an option a registered gate does not take, or a scalar of the wrong type, naming ``dim.option``.

    Only gates given by a registered name whose constructor has no ``**kwargs`` are checked; the types checked are
    those of the constructor's scalar defaults (a float or int default needs a number, a bool default a bool).
    """
    name = opts["gate"]
    if not isinstance(name, str) or name not in GATES:
        return
    try:
        params = inspect.signature(GATES.get(name)).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    options = [n for n in params if n not in _GATE_ARGS]
    for key, value in opts.items():
        if key == "gate":
            continue
        if key not in options:
            raise ConfigError(
                f"sparsify spec field '{dim}.{key}': gate {name!r} has no option {key!r}."
                f"{suggest(key, [*options, 'include', 'exclude'])} Options: {', '.join(options)}, include, exclude"
            )
        _check_option_type(dim, name, key, value, params[key].default)


def _check_option_type(dim: str, gate: str, key: str, value: Any, default: Any) -> None:
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "a bool"
    elif isinstance(default, (int, float)):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        return
    if not ok:
        raise ConfigError(
            f"sparsify spec field '{dim}.{key}' of gate {gate!r} must be {want}, got {type(value).__name__} {value!r}"
        )


def _per_input_hint(dim: str, opts: dict[str, Any]) -> str:
    """For a dimension that also takes per-input gates, when the gate is no static one: the per-input names."""
    from .layers.dynamic import DYNAMIC_PARTS

    part = DYNAMIC_PARTS.get(dim)
    if part is None or part.always or not isinstance(opts.get("gate"), str) or opts["gate"] in GATES:
        return ""
    try:
        names = part.gates().names()
    except (ImportError, AttributeError):
        return ""
    return f". Per-input {dim} gates: {', '.join(names)}.{suggest(opts['gate'], names)}"


def _is_weight_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))


def _owns_weights(module: nn.Module) -> bool:
    """Whether ``module`` holds a Linear / Conv itself: as a child, or inside a child that only wraps one (a timm
    ``ConvNormAct``, an ``nn.Sequential``), as MobileNetV4's ``UniversalInvertedResidual`` holds its convs. A child
    that is a candidate itself (an ``Mlp`` or ``Attention`` inside a block) is no wrapper."""
    for child in module.children():
        if _is_weight_layer(child):
            return True
        name = type(child).__name__
        wrapper = (
            type(child).__module__.startswith("timm.layers.")
            or isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
        ) and not any(p.search(name) for p in _LOOKALIKE.values())
        if wrapper and any(_is_weight_layer(m) for m in child.children()):
            return True
    return False


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """``id(module) -> every fqn it is reachable under`` (a module object assigned to two attributes has two)."""
    names: dict[int, list[str]] = {}
    for fqn, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(fqn)
    return names


def _shared_reason(fqn: str, module: nn.Module, aliases: Mapping[int, list[str]]) -> str | None:
    """Why ``module`` at ``fqn`` cannot take gates because it, or a module inside it, is also called elsewhere in
    the model (CoaT's ``mlp2 = mlp3 = mlp4``): its gates would act at every call, but ``convert`` replaces and slices
    it under one name only. None when every name of it and its submodules lies below ``fqn``."""
    for m in module.modules():
        for other in aliases.get(id(m), ()):
            if not (other == fqn or other.startswith(f"{fqn}.") or not fqn):
                where = "it" if m is module else f"its submodule {type(m).__name__}"
                return (
                    f"{where} is also called as {other!r} (one module object at two places of the model), and a gate "
                    "can only be converted at one place; give each place its own module (copy.deepcopy)"
                )
    return None


def sparsify_(
    model: nn.Module,
    spec: Mapping[str, Any],
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    on_unsupported: Literal["raise", "skip"] = "raise",
) -> nn.Module:
    """Put gates into ``model`` in place and return it.

    Layers are swapped for their gated twins (same parameters, same child names, same ``forward``) and
    residual branches get ``layers`` gates; every gate starts open, so the output is unchanged.

    Args:
        model: A timm model (ViT/DeiT, ResNet, ConvNeXt, EfficientNet, MobileNetV3, Swin, ...) or a Hugging Face
            transformers model (BERT, RoBERTa, ViT, GPT-2, Llama, Qwen2, Mistral; see ``docs/huggingface.md``).
        spec: ``{dimension: {"gate": name, **gate_kwargs}}`` with dimensions ``neurons``, ``heads``,
            ``channels``, ``layers``, the input-dependent ``tokens`` and ``depth`` of timm ViTs (see
            ``docs/dynamic.md``), and ``width`` for Hugging Face models (one gate over the residual stream); a
            dimension may also carry ``include`` / ``exclude`` fqn globs, joined to the top-level ones (not
            ``tokens``, placed by ``blocks`` indices, nor ``width``). ``depth`` globs match block fqns (``blocks.3``).
        include: fqn glob patterns limiting where gates go (all dimensions; every block of ``tokens.blocks``, as
            ``blocks.i``, must match).
        exclude: fqn glob patterns where no gates go (all dimensions; no block of ``tokens.blocks`` may match).
        on_unsupported: ``"raise"`` (default) raises on the first module that looks gatable but is not;
            ``"skip"`` leaves such modules as they are and logs them (see `plan_sparsify`).

    Returns:
        ``model``, gated.

    Raises:
        ConfigError: a bad spec (unknown dimension or gate, bad gate arguments).
        UnsupportedModuleError: a module cannot be gated (names its fqn and type), or nothing can.

    A refused call leaves ``model`` as it was: specs and gate sizes are checked before any module changes, and
    a call refused after it started (an input-dependent part's option) puts every module back before raising.

    Examples:
        >>> import timm, dynsparse as ds
        >>> m = timm.create_model("test_vit")
        >>> _ = ds.sparsify_(m, {"neurons": {"gate": "hard_concrete"}, "heads": "sigmoid"})
        >>> len(list(ds.named_gates(m)))  # one heads and one neurons gate per block
        12
    """
    from .integrations import tables as table
    from .modules import all_or_nothing, replace_module_

    if on_unsupported not in ("raise", "skip"):
        raise ConfigError(f"on_unsupported must be 'raise' or 'skip', got {on_unsupported!r}")
    plan = plan_sparsify(model, spec, include=include, exclude=exclude)
    call = {"spec": _plain(spec), "include": include, "exclude": exclude, "on_unsupported": on_unsupported}
    if plan.skipped:
        if on_unsupported == "raise":
            s = plan.skipped[0]
            more = f" ({len(plan.skipped) - 1} more; on_unsupported='skip' skips them)" if len(plan.skipped) > 1 else ""
            raise UnsupportedModuleError(s.fqn, s.module_type, s.dimension, s.reason + more)
        log.warning(
            "sparsify_: skipped %d module(s):\n%s",
            len(plan.skipped),
            "\n".join(f"  {s.fqn} ({s.module_type}) for {s.dimension!r}: {s.reason}" for s in plan.skipped),
        )
    with all_or_nothing(model):  # a part refused half-way (a dynamic part's option) leaves the model as it was
        # Class swaps first (neurons / heads / channels), then branch gates, which only replace drop_path children.
        for fqn, dim in sorted(plan.targets, key=lambda t: (t[1] == "layers", t[1] == "width")):
            module = model.get_submodule(fqn)
            gate = plan.gate_specs[dim]
            if dim == "width":
                table.gate_width_(model, gate)
                continue
            if dim == "layers":
                table.gate_branches_(module, gate, fqn=fqn)
                continue
            cls = table.gated_class(dim, module)
            try:
                new = cls.from_module(module, gate=gate, fqn=fqn)
            except (ConfigError, GateError) as e:
                raise ConfigError(f"while gating {dim!r} of {fqn!r} ({type(module).__name__}): {e}") from e
            if fqn:
                replace_module_(model, fqn, new)
            else:
                raise UnsupportedModuleError(
                    fqn, type(module).__name__, dim, "the root module itself cannot be swapped"
                )
        # input-dependent parts last, inner modules before whole blocks (the order of DYNAMIC_PARTS)
        from .layers.dynamic import DYNAMIC_PARTS, dynamic_part_of

        dims = _parse_spec(spec)
        g_inc, g_exc = _patterns(include, "include"), _patterns(exclude, "exclude")
        for key, part in DYNAMIC_PARTS.items():
            if key in dims and dynamic_part_of(key, dims[key]) is part:
                part.apply_(model, **_dynamic_options(key, part, dims[key], g_inc, g_exc))
    # the calls made, so a gated checkpoint can be rebuilt without pickle (see dynsparse.convert.io)
    model.__dict__.setdefault("_dynsparse_history", []).append(call)
    return model


def _dynamic_options(
    dim: str, part: Any, opts: Mapping[str, Any], include: list[str], exclude: list[str]
) -> dict[str, Any]:
    """The ``apply`` arguments of the input-dependent ``part`` for its spec entry ``opts`` (a `DynamicPart`).

    A part that takes fqn globs gets the top-level ``include`` / ``exclude`` joined to its own, as a static
    dimension does. A part placed by block indices (``tokens``) takes no globs of its own, and the top-level ones
    must select every block it names (fqn ``blocks.i``).

    Raises:
        ConfigError: globs of such a part, or a block of it that the top-level globs leave out (names it).
    """
    opts = dict(opts)
    if part.always:
        opts.setdefault("gate", part.default_gate)
    if part.globs:
        inc = include + _patterns(opts.pop("include", None), f"{dim}.include")
        exc = exclude + _patterns(opts.pop("exclude", None), f"{dim}.exclude")
        opts.update({k: v for k, v in (("include", inc), ("exclude", exc)) if v})
        return opts
    for key in ("include", "exclude"):
        if key in opts:
            raise ConfigError(
                f"sparsify spec field '{dim}.{key}': {part.what}s are placed by block indices ('{dim}.blocks'), "
                "not by fqn globs"
            )
    blocks = opts.get("blocks", part.default("blocks"))
    idx = [blocks] if isinstance(blocks, int) else blocks if isinstance(blocks, (list, tuple)) else []
    left = [f"blocks.{i}" for i in idx if isinstance(i, int) and not _selected(f"blocks.{i}", include, exclude)]
    if left:
        raise ConfigError(
            f"sparsify spec field {dim!r}: {left[0]} ('{dim}.blocks') is left out by the top-level include / exclude; "
            f"{part.what}s are placed by block indices: name only blocks the globs select in '{dim}.blocks'"
        )
    return opts


def _plain(spec: Mapping[str, Any]) -> Any:
    """A deep plain-data copy of a spec (mappings to dicts, tuples to lists); callables stay as they are."""
    if isinstance(spec, Mapping):
        return {k: _plain(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [_plain(v) for v in spec]
    return spec
