"""Save and load models as safetensors: weights plus JSON metadata (architecture spec, slice plan). No pickle.

One file holds everything: the tensors, and in the safetensors header the host's architecture spec (e.g.
``{"library": "timm", "name": "vit_small_patch16_224", "kwargs": {"num_classes": 10}}``, or for a Hugging Face
model ``{"library": "transformers", "name": "LlamaForCausalLM", "config": {...}}``), the slice plan,
and for a gated checkpoint the ``sparsify_`` calls and gate classes. Writes are atomic: a temporary file in
the same directory is fsynced and renamed over the target, so a crash leaves the last good file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import ConfigError, DynsparseError, UnsupportedModuleError
from .metadata import DATA_FIELDS, TEXT_DATA_FIELDS, check_data, gate_settings, restore_gate_settings_
from .plan import SlicePlan

__all__ = [
    "DATA_FIELDS",
    "HISTORY_ATTR",
    "TEXT_DATA_FIELDS",
    "atomic_save_tensors",
    "load",
    "load_gated",
    "read_info",
    "save",
    "save_gated",
]

HISTORY_ATTR = "_dynsparse_history"
_FORMAT = "dynsparse.model"


def _arch_of(model: nn.Module | None, arch: Mapping[str, Any] | None) -> dict[str, Any]:
    if arch is not None:
        arch = dict(arch)
        if not isinstance(arch.get("name"), str):
            raise ConfigError(
                "arch: field 'name' (the timm model name) is required, e.g. "
                "{'name': 'vit_small_patch16_224', 'kwargs': {'num_classes': 10}}"
            )
        unknown = set(arch) - {"library", "name", "kwargs", "config"}
        if unknown:
            raise ConfigError(f"arch: unknown field(s) {sorted(unknown)} (known: library, name, kwargs, config)")
        arch.setdefault("library", "timm")
        if arch["library"] not in ("timm", "dynsparse", "transformers"):
            raise ConfigError(
                f"arch: field 'library' must be 'timm', 'dynsparse' or 'transformers', got {arch['library']!r}"
            )
        if arch["library"] == "transformers" and not isinstance(arch.get("config"), Mapping):
            raise ConfigError("arch: a transformers arch needs field 'config' (the model config as a dict)")
        arch.setdefault("kwargs", {})
        for key, value in arch.items():
            _json_text(value, f"arch: {key}", "layer classes and functions by their timm name, e.g. act_layer='gelu'")
        return arch
    from ..integrations.tables import arch_of

    spec = arch_of(model)  # a Hugging Face model: its class name and the dense host's config
    if spec is not None:
        return spec
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    if not name:
        raise ConfigError(
            f"cannot tell the architecture of {type(model).__name__}: pass arch={{'name': ..., 'kwargs': {{...}}}}}}"
        )
    return {"library": "timm", "name": name, "kwargs": {}}


def _json_text(value: Any, name: str, hint: str) -> str:
    """``value`` as JSON text; a part that is not JSON data raises `ConfigError` naming its path from ``name``
    (``arch: kwargs['act_layer']``) and its type; ``hint`` says what to pass instead."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:
        found = _not_json(value, [])
        if found is None:  # e.g. a circular reference
            raise ConfigError(f"{name} must be JSON data ({e}); pass {hint}") from None
        path, bad = found
        at = name + "".join(f"[{k!r}]" for k in path)
        got = f"{type(bad).__name__} {bad!r}"
        raise ConfigError(f"{at} must be JSON data (files hold no code), got {got}; pass {hint}") from None


def _not_json(value: Any, path: list) -> tuple[list, Any] | None:
    """The path of keys / indices to the first part of ``value`` that ``json.dumps`` refuses, and that part."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return [*path, k], k
            found = _not_json(v, [*path, k])
            if found is not None:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _not_json(v, [*path, i])
            if found is not None:
                return found
        return None
    return None if value is None or isinstance(value, (str, int, float, bool)) else (path, value)


def build_host(arch: Mapping[str, Any], source: str = "arch") -> nn.Module:
    """Create the (ungated, dense) host model an architecture spec describes, with random weights."""
    try:
        if arch.get("library") == "transformers":
            from ..integrations.hf import build_host as build_hf

            return build_hf(arch)
        if arch.get("library", "timm") == "dynsparse":
            from ..models import create_model

            return create_model(arch["name"], **arch.get("kwargs", {}))
        import timm

        return timm.create_model(arch["name"], pretrained=False, **arch.get("kwargs", {}))
    except Exception as e:  # timm raises many kinds of errors for a bad name or kwargs
        what = f"{arch.get('library', 'timm')} model {arch.get('name')!r}"
        raise ConfigError(f"{source}: cannot build {what} with kwargs {arch.get('kwargs')}: {e}") from e


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (temp file + fsync + rename)."""
    import safetensors.torch

    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if key in seen else v  # tied weights (an LM head sharing the embedding) saved twice
        seen.add(key)
    tensors = out
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def _read(path: str | os.PathLike, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (none with ``tensors=False``: the header alone is read) and the metadata of a dynsparse file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        inside = [n for n in ("model.safetensors", "gated.safetensors") if (path / n).is_file()]
        hint = f" (it holds {' and '.join(str(path / n) for n in inside)})" if inside else ""
        raise DynsparseError(f"{path}: is a directory, not a model file{hint}")
    if not path.is_file():
        raise DynsparseError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        out = load_file(str(path)) if tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DynsparseError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != _FORMAT:
        raise DynsparseError(f"{path}: not a dynsparse model file (metadata 'format' is {meta.get('format')!r})")
    return out, meta


def _json(meta: Mapping[str, str], key: str, path: Path, kind: type = dict) -> Any:
    """Metadata field ``key`` parsed as JSON, which must be a ``kind`` (``dict``: an object, ``list``: an array)."""
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise DynsparseError(f"{path}: metadata field {key!r} is missing") from None
    except json.JSONDecodeError as e:
        raise DynsparseError(f"{path}: metadata field {key!r} is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        what = "object" if kind is dict else "array"
        raise DynsparseError(f"{path}: metadata field {key!r} must be a JSON {what}, got {type(value).__name__}")
    return value


def _arch_field(meta: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The ``arch`` metadata field, checked as `save` checks an ``arch`` argument; errors name the file."""
    try:
        return _arch_of(None, _json(meta, "arch", path))
    except ConfigError as e:
        raise ConfigError(f"{path}: metadata field 'arch': {e}") from None


def _history_field(meta: Mapping[str, str], path: Path) -> list[dict[str, Any]]:
    """The ``history`` metadata field: the ``sparsify_`` calls, each an object with a ``spec``."""
    history = _json(meta, "history", path, kind=list)
    for i, call in enumerate(history):
        if not isinstance(call, dict) or not isinstance(call.get("spec"), (dict, str)):
            raise DynsparseError(f"{path}: metadata field 'history' entry {i} must be an object with a 'spec'")
    return history


def _data_field(meta: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    """The optional ``data`` metadata field (None in files written without it); errors name the file."""
    if "data" not in meta:
        return None
    try:
        return check_data(_json(meta, "data", path), where=f"{path}: metadata field 'data'")
    except ConfigError as e:
        raise DynsparseError(str(e)) from None


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a model file holds, from its header alone (no tensor is read): kind, architecture, data, gates.

    Returns:
        ``{"kind": "converted" | "gated", "arch": {...}, "data": {...} or None, "gates": {fqn: class} (gated
        files; ``{}`` otherwise)}``.

    Raises:
        DynsparseError: not a readable dynsparse file, or a damaged field (the message names the file).
    """
    path = Path(path)
    _, meta = _read(path, tensors=False)
    kind = meta.get("kind")
    if kind not in ("converted", "gated"):
        raise DynsparseError(f"{path}: metadata 'kind' must be 'converted' or 'gated', got {kind!r}")
    gates = _json(meta, "gates", path) if kind == "gated" else {}
    return {"kind": kind, "arch": _arch_field(meta, path), "data": _data_field(meta, path), "gates": gates}


def _load_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing:
        raise DynsparseError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise DynsparseError(f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for k, t in tensors.items():
        if t.shape != own[k].shape:
            raise DynsparseError(
                f"{path}: tensor {k!r} has shape {tuple(t.shape)}, the model expects {tuple(own[k].shape)}"
            )
        if t.dtype != own[k].dtype and own[k].is_floating_point() != t.is_floating_point():
            raise DynsparseError(f"{path}: tensor {k!r} has dtype {t.dtype}, the model expects {own[k].dtype}")
    _match_dtypes_(model, tensors)
    model.load_state_dict(tensors, strict=True)


def _match_dtypes_(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Give ``model``'s floating parameters and buffers the dtypes of the saved ``tensors`` (in place).

    The host is built in float32; without this, a bf16, fp16 or fp64 model would be copied into float32 weights.
    A file with one floating dtype casts the whole model (non-persistent buffers too, as ``model.to`` did before
    the save); a file with several sets each tensor's own dtype. Tied parameters stay tied.
    """
    floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(floats) == 1:
        model.to(floats.pop())
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = tensors.get(name)
            if t is not None and t.is_floating_point() and p.dtype != t.dtype:
                p.data = p.data.to(t.dtype)
        for name, b in model.named_buffers():
            t = tensors.get(name)
            if t is not None and t.is_floating_point() and b.is_floating_point() and b.dtype != t.dtype:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, leaf, b.to(t.dtype))


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: Mapping[str, Any] | None = None,
    plan: SlicePlan | None = None,
    data: Mapping[str, Any] | None = None,
) -> Path:
    """Save a converted model: architecture spec + slice plan + safetensors weights, in one file.

    Args:
        model: A model returned by `dynsparse.convert` (its plan is ``model.slice_plan``).
        path: Target file (``.safetensors``); written atomically.
        arch: ``{"name": timm name, "kwargs": {...}}``; default: the model's ``pretrained_cfg`` architecture,
            which is only right when the model was created without extra kwargs.
        data: What the model's input is, for the tools that read the file (``dynsparse eval`` / ``bench`` /
            ``analyse``): ``{"dataset": "digits", "image_size": 16, "channels": 1, "input_shape": [1, 16, 16],
            "mean": [0.31], "std": [0.38]}``, any subset of these fields (`DATA_FIELDS`); for a text encoder
            ``{"distill": ["english-sentences"], "max_length": 64, "tokenizer": "all-minilm-l6-v2"}``
            (`TEXT_DATA_FIELDS`); default: none recorded.
        plan: The slice plan; default ``model.slice_plan``. Its ``dynamic`` field (run-time parts, e.g. token
            gates) is read from ``model`` at save time, so a budget changed with ``set_budget_`` is saved.

    Returns:
        The path written.
    """
    from ..layers.slot import GateSlot

    if any(isinstance(m, GateSlot) for m in model.modules()):
        raise ConfigError("save: the model still has gates; convert it first, or use save_gated for a checkpoint")
    plan = plan if plan is not None else getattr(model, "slice_plan", None)
    if plan is None:
        raise ConfigError("save: no slice plan; pass plan= (the converted model carries it as model.slice_plan)")
    plan = _with_current_dynamic(model, plan)
    spec = _arch_of(model, arch)
    data = check_data(data) if data is not None else None
    # check now that the spec + plan rebuild this model, rather than writing a file that will not load
    what = f"save: arch {spec['name']!r} with kwargs {spec.get('kwargs')} and the plan do not rebuild this model"
    hint = (
        "pass the arch kwargs the model was created with, and the plan that describes it (the model must not "
        "be changed after convert; to prune a converted model again, gate it and convert it again)"
    )
    try:
        rebuilt = apply_plan_to_spec(spec, plan)
    except ConfigError as e:
        raise ConfigError(f"{what} ({e}); {hint}") from None
    shapes = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != mine:
        bad = sorted(k for k in set(shapes) | set(mine) if shapes.get(k) != mine.get(k))
        first = f"first mismatch: {bad[0]!r}, rebuilt {_shape(shapes, bad[0])}, model {_shape(mine, bad[0])}"
        raise ConfigError(f"{what} ({first}); {hint}")
    layers, mine = _layers(rebuilt), _layers(model)  # same shapes, other layers: an activation, a stride
    bad = [k for k in mine if k in layers and layers[k] != mine[k]]
    if bad:
        first = f"first mismatch: module {bad[0]!r}, rebuilt {layers[bad[0]]}, model {mine[bad[0]]}"
        raise ConfigError(f"{what} ({first}); {hint}")
    meta = {"format": _FORMAT, "kind": "converted", "arch": json.dumps(spec), "plan": plan.to_json()}
    if data is not None:
        meta["data"] = json.dumps(data)
    return atomic_save_tensors(model.state_dict(), path, meta)


def _layers(model: nn.Module) -> dict[str, str]:
    """``{fqn: "Class(extra_repr)"}`` of the leaf modules (no children): what decides their output beyond their
    tensors (an activation's class, a conv's stride). Only torch.nn modules show their ``extra_repr`` (another
    library's may show tensor values, e.g. a calibrated threshold, that the file's tensors restore). Modules that do
    nothing in eval mode (dropout, drop path, identity) read the same, so a rate the arch left out is no mismatch.
    Callers compare the fqns both models have: a block whose branches were removed in two rounds of conversion has
    ``ZeroBranch`` children in the model and is an ``Identity`` rebuilt, and computes the same."""
    out = {}
    for fqn, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue
        no_op = isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)) or type(m).__name__ == "DropPath"
        settings = m.extra_repr() if type(m).__module__.startswith("torch.nn") else "..."  # others may show state
        settings = re.sub(r"momentum=[^,]*, ", "", settings)  # a norm's training setting: no effect on outputs
        out[fqn] = "a no-op in eval mode" if no_op else f"{type(m).__name__}({settings})"
    return out


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> str:
    return str(shapes[key]) if key in shapes else "absent"


def _with_current_dynamic(model: nn.Module, plan: SlicePlan) -> SlicePlan:
    """``plan`` with its ``dynamic`` field read from ``model`` now, so a budget set after convert is what is saved."""
    from .convert import dynamic_specs

    return dataclasses.replace(plan, dynamic=dynamic_specs(model))


def apply_plan_to_spec(arch: Mapping[str, Any], plan: SlicePlan, source: str = "arch") -> nn.Module:
    """Build the host ``arch`` describes and replay ``plan`` on it (``source`` names the spec in errors)."""
    from .convert import apply_plan

    return apply_plan(build_host(arch, source=source), plan)


def _replay(model: nn.Module, plan: SlicePlan, path: Path) -> nn.Module:
    """`apply_plan` of a file's plan on the host its ``arch`` built; a plan that does not fit names the file."""
    from .convert import apply_plan

    try:
        return apply_plan(model, plan)
    except (ConfigError, UnsupportedModuleError) as e:
        raise ConfigError(f"{path}: metadata field 'plan' does not fit the model its 'arch' builds: {e}") from None


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by `save`: build the host from its spec, replay the plan, load the weights.

    Never unpickles; needs no dynsparse gated class. The model is returned in eval mode.

    Raises:
        DynsparseError: the file is damaged, not a dynsparse file, or a tensor is missing or has the wrong
            shape (the message names the file and the tensor).
    """
    path = Path(path)
    tensors, meta = _read(path)
    if meta.get("kind") != "converted":
        raise DynsparseError(f"{path}: holds a {meta.get('kind')!r} model; use load_gated for gated checkpoints")
    arch = _arch_field(meta, path)
    if "plan" not in meta:
        raise DynsparseError(f"{path}: metadata field 'plan' is missing")
    plan = SlicePlan.from_json(meta["plan"], source=f"{path}: plan")
    model = _replay(build_host(arch, source=f"{path}: arch"), plan, path)
    _load_into(model, tensors, path)
    model.slice_plan = plan
    return model.to(map_location).eval()


def save_gated(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> Path:
    """Save a gated (training) model as a checkpoint that `load_gated` rebuilds without pickle.

    The checkpoint records the architecture, the ``sparsify_`` calls made on the model, the class of each gate
    (so fixed gates come back fixed), the gate settings that live outside the state dict (a `TopKGate`'s ``k``
    set by ``set_k_``, an input-dependent gate's budget set by ``set_budget_``) and the state dict; ``data``
    describes the input as in `save` (``dynsparse convert`` carries it over to the converted file). A converted
    model gated again (a round of iterative pruning) also records its ``slice_plan``, replayed before the calls.
    """
    from ..gate_ops import named_gates

    history = getattr(model, HISTORY_ATTR, None)
    if not history:
        raise ConfigError("save_gated: the model was not gated with dynsparse.sparsify_ (no sparsify history)")
    spec = _arch_of(model, arch)
    data = check_data(data) if data is not None else None
    gates = {fqn: type(g).__name__ for fqn, g in named_gates(model)}
    meta = {
        "format": _FORMAT,
        "kind": "gated",
        "arch": json.dumps(spec),
        "history": _json_text(history, "save_gated: history", "a sparsify spec of gate names, not callables"),
        "gates": json.dumps(gates),
        "settings": json.dumps(gate_settings(model)),
        "extra": _json_text(dict(extra or {}), "save_gated: extra", "numbers, strings, lists and dicts of them"),
    }
    plan = getattr(model, "slice_plan", None)
    if plan is not None:  # a converted model gated again: its gates are on the sliced host
        meta["plan"] = plan.to_json()
    if data is not None:
        meta["data"] = json.dumps(data)
    return atomic_save_tensors(model.state_dict(), path, meta)


def load_gated(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint written by `save_gated`; returns ``(model, {"arch": ..., "extra": ..., "data": ...})``.

    ``data`` is the checkpoint's input description (see `save`), None in files written without one.
    """
    from ..gate_ops import fix_gates_, named_gates
    from ..gates import FixedGate
    from ..sparsify import sparsify_

    path = Path(path)
    tensors, meta = _read(path)
    if meta.get("kind") != "gated":
        hint = "; it is converted already: load it with load (`dynsparse eval` evaluates it)"
        raise DynsparseError(
            f"{path}: holds a {meta.get('kind')!r} model, not a gated checkpoint"
            + (hint if meta.get("kind") == "converted" else "")
        )
    arch = _arch_field(meta, path)
    model = build_host(arch, source=f"{path}: arch")
    plan = SlicePlan.from_json(meta["plan"], source=f"{path}: plan") if "plan" in meta else None
    if plan is not None:  # a converted model gated again
        model = _replay(model, plan, path)
        model.slice_plan = plan
    for call in _history_field(meta, path):
        sparsify_(
            model,
            call["spec"],
            include=call.get("include"),
            exclude=call.get("exclude"),
            on_unsupported=call.get("on_unsupported", "raise"),
        )
    classes = _json(meta, "gates", path)
    have = dict(named_gates(model))
    if set(have) != set(classes):
        raise DynsparseError(f"{path}: gates differ from the rebuilt model ({sorted(set(have) ^ set(classes))[:3]})")
    to_fix = {
        f: torch.ones(have[f].num_units, dtype=torch.bool)
        for f, c in classes.items()
        if c == FixedGate.__name__ and type(have[f]) is not FixedGate
    }
    if to_fix:
        fix_gates_(model, to_fix)
    _load_into(model, tensors, path)
    if "settings" in meta:  # absent in checkpoints written before it was recorded
        restore_gate_settings_(model, _json(meta, "settings", path), f"{path}: metadata field 'settings'")
    return model, {"arch": arch, "extra": _json(meta, "extra", path), "data": _data_field(meta, path)}
