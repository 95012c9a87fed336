"""Save and load models as safetensors: weights plus JSON metadata (architecture spec, slice plan). No pickle.

One file holds everything: the tensors, and in the safetensors header the host's architecture spec (e.g.
``{"library": "timm", "name": "vit_small_patch16_224", "kwargs": {"num_classes": 10}}``, or for a Hugging Face
model ``{"library": "transformers", "name": "LlamaForCausalLM", "config": {...}}``), the slice plan,
and for a gated checkpoint the ``sparsify_`` calls and gate classes. Writes are atomic: a temporary file in
the same directory is fsynced and renamed over the target, so a crash leaves the last good file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import ConfigError, DynsparseError
from .plan import SlicePlan

__all__ = ["HISTORY_ATTR", "atomic_save_tensors", "load", "load_gated", "save", "save_gated"]

HISTORY_ATTR = "_dynsparse_history"
_FORMAT = "dynsparse.model"


def _arch_of(model: nn.Module, arch: Mapping[str, Any] | None) -> dict[str, Any]:
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
        try:
            json.dumps(arch)
        except TypeError as e:
            raise ConfigError(f"arch: kwargs must be JSON data ({e})") from None
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


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DynsparseError(f"{path}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DynsparseError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != _FORMAT:
        raise DynsparseError(f"{path}: not a dynsparse model file (metadata 'format' is {meta.get('format')!r})")
    return tensors, meta


def _json(meta: Mapping[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(meta[key])
    except KeyError:
        raise DynsparseError(f"{path}: metadata field {key!r} is missing") from None
    except json.JSONDecodeError as e:
        raise DynsparseError(f"{path}: metadata field {key!r} is not valid JSON ({e})") from None


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
    model.load_state_dict(tensors, strict=True)


def save(
    model: nn.Module, path: str | os.PathLike, *, arch: Mapping[str, Any] | None = None, plan: SlicePlan | None = None
) -> Path:
    """Save a converted model: architecture spec + slice plan + safetensors weights, in one file.

    Args:
        model: A model returned by `dynsparse.convert` (its plan is ``model.slice_plan``).
        path: Target file (``.safetensors``); written atomically.
        arch: ``{"name": timm name, "kwargs": {...}}``; default: the model's ``pretrained_cfg`` architecture,
            which is only right when the model was created without extra kwargs.
        plan: The slice plan; default ``model.slice_plan``.

    Returns:
        The path written.
    """
    from ..layers.slot import GateSlot

    if any(isinstance(m, GateSlot) for m in model.modules()):
        raise ConfigError("save: the model still has gates; convert it first, or use save_gated for a checkpoint")
    plan = plan if plan is not None else getattr(model, "slice_plan", None)
    if plan is None:
        raise ConfigError("save: no slice plan; pass plan= (the converted model carries it as model.slice_plan)")
    spec = _arch_of(model, arch)
    # check now that the spec + plan rebuild this model, rather than writing a file that will not load
    rebuilt = apply_plan_to_spec(spec, plan)
    shapes = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != mine:
        bad = sorted(k for k in set(shapes) | set(mine) if shapes.get(k) != mine.get(k))
        raise ConfigError(
            f"save: arch {spec['name']!r} with kwargs {spec.get('kwargs')} and the plan do not rebuild this "
            f"model (first mismatch: {bad[0]!r}); pass the arch kwargs the model was created with"
        )
    meta = {"format": _FORMAT, "kind": "converted", "arch": json.dumps(spec), "plan": plan.to_json()}
    return atomic_save_tensors(model.state_dict(), path, meta)


def apply_plan_to_spec(arch: Mapping[str, Any], plan: SlicePlan) -> nn.Module:
    from .convert import apply_plan

    return apply_plan(build_host(arch), plan)


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
    arch = _json(meta, "arch", path)
    plan = SlicePlan.from_json(meta.get("plan", ""), source=f"{path}: plan")
    model = apply_plan_to_spec(arch, plan)
    _load_into(model, tensors, path)
    model.slice_plan = plan
    return model.to(map_location).eval()


def save_gated(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save a gated (training) model as a checkpoint that `load_gated` rebuilds without pickle.

    The checkpoint records the architecture, the ``sparsify_`` calls made on the model, the class of each gate
    (so fixed gates come back fixed) and the state dict.
    """
    from ..sparsify import named_gates

    history = getattr(model, HISTORY_ATTR, None)
    if not history:
        raise ConfigError("save_gated: the model was not gated with dynsparse.sparsify_ (no sparsify history)")
    spec = _arch_of(model, arch)
    gates = {fqn: type(g).__name__ for fqn, g in named_gates(model)}
    try:
        meta = {
            "format": _FORMAT,
            "kind": "gated",
            "arch": json.dumps(spec),
            "history": json.dumps(history),
            "gates": json.dumps(gates),
            "extra": json.dumps(dict(extra or {})),
        }
    except TypeError as e:
        raise ConfigError(f"save_gated: the sparsify spec must be JSON data (gate names, not callables): {e}") from None
    return atomic_save_tensors(model.state_dict(), path, meta)


def load_gated(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint written by `save_gated`; returns ``(model, {"arch": ..., "extra": ...})``."""
    from ..gates import FixedGate
    from ..sparsify import fix_gates_, named_gates, sparsify_

    path = Path(path)
    tensors, meta = _read(path)
    if meta.get("kind") != "gated":
        raise DynsparseError(f"{path}: holds a {meta.get('kind')!r} model, not a gated checkpoint")
    arch = _json(meta, "arch", path)
    model = build_host(arch, source=f"{path}: arch")
    for call in _json(meta, "history", path):
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
    return model, {"arch": arch, "extra": _json(meta, "extra", path)}
