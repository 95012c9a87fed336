"""Find, adopt and replace modules, keeping parameters, hooks, device, dtype and the training flag."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import DynsparseError

__all__ = [
    "adopt",
    "all_or_nothing",
    "capturing",
    "first_param",
    "inputs_to_device_of",
    "is_stateless",
    "join_fqn",
    "modes_kept",
    "module_device",
    "place_like",
    "replace_module_",
    "submodule_or_none",
    "successor_state",
]

M = TypeVar("M", bound=nn.Module)


def adopt(host: nn.Module, cls: type[M], *, share_hooks: bool = True) -> M:
    """Return a new ``cls`` instance that shares ``host``'s children, parameters, buffers and hooks.

    ``cls`` must be a subclass of ``type(host)`` that adds no required state of its own. The new module takes
    the host's place: its child, parameter and buffer dicts are copies (adding a buffer to it leaves the host
    as it was), but its hook dicts are the host's own (`successor_state`), so a ``RemovableHandle`` of a hook
    registered on the host before the swap still removes it. ``share_hooks=False`` copies them too, for a copy
    that lives next to the host. This is how a gated layer is made from a host layer without copying its
    ``forward``.
    """
    if not issubclass(cls, type(host)):
        raise DynsparseError(f"{cls.__name__} is not a subclass of {type(host).__name__}")
    new = cls.__new__(cls)
    new.__dict__.update(successor_state(host, share_hooks=share_hooks))
    return new


def successor_state(module: nn.Module, *, share_hooks: bool = True) -> dict[str, Any]:
    """``module.__dict__`` for a module that replaces it: dicts and sets copied, hook dicts shared.

    A ``RemovableHandle`` removes its hook from the dicts it was registered in (weak references to the old
    module's ``_forward_hooks``, ``_forward_hooks_with_kwargs``, ...), so the successor must hold those very
    dicts for the handle to keep working. Every other dict (``_modules``, ``_parameters``, ``_buffers``) and set
    is a shallow copy, so the successor may add or drop entries without changing ``module``.
    """
    state = {}
    for key, value in module.__dict__.items():
        if isinstance(value, (dict, set)) and not (share_hooks and _is_hook_dict(key)):
            value = value.copy()
        state[key] = value
    return state


def _is_hook_dict(key: str) -> bool:
    """``_forward_hooks``, ``_forward_pre_hooks_with_kwargs``, ``_state_dict_hooks``, ...: torch's hook dicts."""
    return key.startswith("_") and "_hooks" in key


def replace_module_(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``fqn`` inside ``model`` (in place) and return ``model``.

    Raises:
        DynsparseError: ``fqn`` is empty (the root) or names no existing child module (a new attribute would be
            added that nothing calls, leaving the model as it was).
    """
    if fqn == "":
        raise DynsparseError("cannot replace the root module in place; gate its children instead")
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child not in parent._modules:
        raise DynsparseError(
            f"cannot replace {fqn!r}: {type(parent).__name__} {parent_name or '<root>'!r} has no child {child!r}"
        )
    setattr(parent, child, new)
    return model


@contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block that edits ``model``'s modules in place; when it raises, put every module back as it was.

    Each module's attributes and the contents of its dicts and sets (children, parameters, buffers, hooks) are
    restored, so a swap, an installed slot or a registered hook of the failed block is undone. Tensor values and
    objects outside the modules (a config) are not.
    """
    saved = [
        (m, dict(m.__dict__), {k: v.copy() for k, v in m.__dict__.items() if isinstance(v, (dict, set))})
        for m in model.modules()
    ]
    try:
        yield model
    except BaseException:
        for m, attrs, containers in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for key, content in containers.items():
                attrs[key].clear()
                attrs[key].update(content)
        raise


def join_fqn(*parts: str) -> str:
    """Qualified module name from its parts, empty parts skipped: ``join_fqn("", "blocks.0", "mlp")``."""
    return ".".join(p for p in parts if p)


def submodule_or_none(model: nn.Module, fqn: str) -> nn.Module | None:
    """``model``'s submodule at ``fqn`` (``""``: the model), or None when there is none."""
    try:
        return model.get_submodule(fqn) if fqn else model
    except AttributeError:
        return None


def first_param(module: nn.Module) -> torch.Tensor | None:
    """The first floating parameter or buffer of ``module`` (for its device and dtype), or None."""
    for t in module.parameters():
        if t.is_floating_point():
            return t
    for t in module.buffers():
        if t.is_floating_point():
            return t
    return None


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first floating parameter or buffer (the CPU when it has none)."""
    p = first_param(module)
    return p.device if p is not None else torch.device("cpu")


def inputs_to_device_of(model: nn.Module, x: Any) -> Any:
    """``x`` (a tensor, or tuples / lists / dicts of them) on ``model``'s device (`module_device`): a DataLoader's CPU
    batch for a model on the GPU. As it is for a model without a floating parameter or buffer."""
    p = first_param(model)
    if p is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(p.device)
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple takes its fields as arguments
        return type(x)(*(inputs_to_device_of(model, v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(inputs_to_device_of(model, v) for v in x)
    if isinstance(x, dict):
        return {k: inputs_to_device_of(model, v) for k, v in x.items()}
    return x


def is_stateless(module: nn.Module | None) -> bool:
    """True when ``module`` holds no parameters and no persistent buffers (so wrapping it keeps state-dict keys)."""
    if module is None:
        return True
    return len(module.state_dict()) == 0


def place_like(new: M, ref: nn.Module) -> M:
    """``new`` moved to ``ref``'s device and floating dtype and set to its training mode (for modules added to it)."""
    p = first_param(ref)
    if p is not None:
        new = new.to(device=p.device, dtype=p.dtype)
    return new.train(ref.training)


def capturing() -> bool:
    """True while ``torch.export`` or ``torch.jit.trace`` records a forward.

    Input-dependent modules then take their masked path: a graph cannot hold a data-dependent number of kept
    units, and tensor values (a calibration check, a weight cache keyed by data pointers) cannot be read.
    """
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


@contextmanager
def modes_kept(*models: nn.Module) -> Iterator[None]:
    """On exit, give every module of ``models`` back the training flag it had on entry (whatever the body set).

    Each root's own ``train(flag)`` runs first (gated layers drop their weight caches there), then every submodule
    gets its own flag back: a BatchNorm frozen in a training model stays frozen.
    """
    saved = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        yield
    finally:
        for flags in saved:
            root, was = flags[0]
            root.train(was)
            for m, flag in flags:
                m.training = flag
