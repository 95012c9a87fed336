"""``CostModel``: the FLOPs (or parameters) a gated model keeps, exactly or as a differentiable expectation.

The model runs once under ``torch.utils.flop_counter`` to get every module's own FLOPs. Each gate slot
declares a scope (the modules whose cost scales with its kept fraction); a module's kept cost is its cost
times the product of the kept fractions of the gates that cover it (so a conv between two gated channel sets
scales with both). A table may exempt a module's own cost from a gate whose scope covers it: the ``width`` gate
of a Hugging Face model (scope: the whole model) scales every module except the attention kernels (q·k and
attention·v run over the heads' channels; `dynsparse.integrations.tables.unscaled`). ``fraction()`` uses the
gates' keep masks; ``expected_fraction()`` uses their ``expected_keep()`` probabilities and is differentiable,
for budget regularizers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .modules import inputs_to_device_of, modes_kept

__all__ = ["CostModel", "count_flops", "default_input", "mean_flops", "module_flops"]


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _custom_mapping() -> dict:
    """Formulas ``FlopCounterMode`` lacks: the CPU kernel of fused attention counts like the GPU kernels."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_cpu_flops} if op is not None else {}


@contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """Run ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` on their composite path while counting.

    In eval mode without grad they call fused kernels (``aten._native_multi_head_attention``,
    ``aten._transformer_encoder_layer_fwd``) that ``FlopCounterMode`` has no formula for, so their FLOPs would
    count as 0. The composite path runs the same math through ``addmm`` and attention ops that it counts.
    """
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    old = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(old)


def count_flops(model: nn.Module, *inputs) -> int:
    """FLOPs of one forward pass (eval mode, 2 per multiply-add; matmuls, convs and attention, not element-wise)."""
    return module_flops(model, inputs if len(inputs) != 1 else inputs[0]).get("", 0)


def mean_flops(model: nn.Module, images: Tensor) -> float:
    """FLOPs of ``model`` on each of ``images`` alone (batch 1), averaged.

    Exact for a static model; for one with per-input gates (routers, thresholds, per-input channels or neurons),
    which spends different FLOPs on each input, the mean over ``images``.

    Raises:
        ConfigError: ``images`` is not a tensor with a batch dimension, or holds no input.
    """
    if not isinstance(images, Tensor) or images.dim() == 0 or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ConfigError(
            f"mean_flops: images must be a non-empty batch (a tensor of shape (B, ...), B >= 1), got {shape}"
        )
    return sum(count_flops(model, images[i : i + 1]) for i in range(len(images))) / len(images)


def default_input(model: nn.Module) -> Tensor | None:
    """A zero batch of one for a timm model's ``pretrained_cfg['input_size']`` (None when unknown)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if not size:
        return None
    size = list(size)
    pe = getattr(model, "patch_embed", None)  # a ViT built with another img_size keeps the default cfg
    img = getattr(pe, "img_size", None)
    if img is not None and getattr(getattr(pe, "proj", None), "in_channels", None):
        size = [pe.proj.in_channels, *img]
    else:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None:
            size[0] = first.in_channels
    ref = next(model.parameters(), None)
    return torch.zeros(
        1, *size, device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None
    )


def module_flops(model: nn.Module, example: Tensor | tuple) -> dict[str, int]:
    """Total FLOPs of each module (by fqn relative to ``model``, ``""`` = root) for one forward pass in eval mode.

    Tensors of ``example`` are moved to the model's device first (a CPU example counts the same on a GPU model).
    Every module's training flag is restored afterwards (a BatchNorm frozen in a training model stays frozen).
    """
    from torch.utils.flop_counter import FlopCounterMode

    example = inputs_to_device_of(model, example)  # FLOPs do not depend on the device; the model's ops need it

    def count(grad_off: AbstractContextManager) -> FlopCounterMode:
        with (
            grad_off,
            _mha_fastpath_off(),
            FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter,
        ):
            model(*example) if isinstance(example, tuple) else model(example)
        return counter

    try:
        with modes_kept(model):
            model.eval()
            try:
                # under inference mode no graph is recorded either, and the tracker fails on any parameter it is passed
                inference = torch.is_inference_mode_enabled()
                counter = count(_frozen_parameters(model) if inference else torch.no_grad())
            except (RuntimeError, AssertionError) as e:
                # the counter's module tracker fails under no_grad on a parameter expanded into a submodule's input (a
                # class token or pooling latent: PiT, CaiT, attention pooling); without autograd on the parameters the
                # forward records no graph either
                if "gradient function" not in str(e):
                    raise
                counter = count(_frozen_parameters(model))
    except Exception as e:  # the example input does not fit the model
        raise ConfigError(f"the example input does not run through {type(model).__name__}: {e}") from e
    root = type(model).__name__
    out = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        rel = "" if name == root else name[len(root) + 1 :] if name.startswith(root + ".") else None
        if rel is not None:
            out[rel] = int(sum(ops.values()))
    return out


@contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` with ``requires_grad=False`` for the block (grad mode on), then as before."""
    trained = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trained:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p in trained:
            p.requires_grad_(True)


def _exclusive(totals: dict[str, int]) -> dict[str, int]:
    """FLOPs of each module minus those of its nearest counted descendants.

    A container that is never called (an ``nn.ModuleList`` such as Hugging Face's ``encoder.layer``) has no count
    of its own, so a module's FLOPs are taken off its nearest *counted* ancestor, not only its direct parent.
    """
    excl = dict(totals)
    for name, flops in totals.items():
        parent = name
        while parent:
            parent = parent.rpartition(".")[0]
            if parent in excl:
                excl[parent] -= flops
                break
    return excl


def _own_params(model: nn.Module) -> dict[str, int]:
    """Parameters each module owns directly, by fqn; the gates' own parameters are not part of the cost.

    Gates are recognised by type, not by name: a host layer may well be called ``gate_proj`` (Llama's MLP). A
    parameter shared by several modules (tied embedding and output weights) counts once, for the first of them.
    """
    from .gates import Gate, InputDependentGate

    gate_fqns = [f for f, m in model.named_modules() if isinstance(m, (Gate, InputDependentGate))]
    out = {}
    seen: set[int] = set()
    for fqn, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        n = sum(p.numel() for p in own)
        if n and not any(_covers(g, fqn) for g in gate_fqns if g):
            out[fqn] = n
    return out


def _covers(path: str, name: str) -> bool:
    return path == "" or name == path or name.startswith(path + ".")


def _producers_or_none(model: nn.Module, fqn: str, dimension: str) -> list[str]:
    from .convert.producer import slot_producers
    from .errors import UnsupportedModuleError

    try:
        return slot_producers(model, fqn, dimension) or []
    except UnsupportedModuleError:  # conversion refuses such a gate when it closes units; nothing to credit
        return []


class CostModel:
    """Kept cost of a gated model as a function of its (static) gates.

    Input-dependent gates (tokens, per-input channels or neurons, routers) are not variables of the cost: the model
    runs once on ``example_input`` with them deciding, so their choices on that input are part of every module's
    cost (``total`` included). `dynsparse.sparsity_report` measures them against ``keep = 1``.

    Args:
        model: A gated model. Gates may be replaced later (``fix_gates_``): the cost model reads each slot's
            current gate.
        example_input: Input of one forward pass (``kind="flops"``); default: a zero image of the timm
            model's ``input_size``.
        kind: ``"flops"`` or ``"params"``. Parameters are counted per module and scaled like its FLOPs, so a
            bias on the consuming side of a gated dimension (``fc2.bias``, ``proj.bias``) is scaled too although
            conversion keeps it whole: a close estimate (measured 0.4–0.8 % off the converted model's count on BERT,
            under 0.02 % on timm models); count the converted model's parameters for the exact figure.
    """

    def __init__(
        self, model: nn.Module, example_input: Tensor | tuple | None = None, kind: Literal["flops", "params"] = "flops"
    ) -> None:
        from .layers.slot import GateSlot

        if kind not in ("flops", "params"):
            raise ConfigError(f"CostModel: kind must be 'flops' or 'params', got {kind!r}")
        self.kind = kind
        self.slots: list[tuple[str, GateSlot]] = [(f, m) for f, m in model.named_modules() if isinstance(m, GateSlot)]
        scopes: list[tuple[int, str]] = []
        unscaled: dict[str, set[int]] = defaultdict(set)  # module -> slots whose scope covers it but not its own cost
        from .integrations.tables import slot_owner
        from .integrations.tables import unscaled as unscaled_by

        for i, (fqn, slot) in enumerate(self.slots):
            # a slot's scope names children of its owner: the direct parent for timm, the attention / MLP / block
            # above the carrier layer for Hugging Face (e.g. ``self_attn`` for ``self_attn.o_proj.gate_in``)
            parent = slot_owner(model, fqn, slot.dimension)[0]
            for s in slot.scope:
                scopes.append((i, f"{parent}.{s}".strip(".") if s else parent))
            # a gate on a layer's input channels also removes output channels of the modules producing them
            scopes.extend((i, p) for p in _producers_or_none(model, fqn, slot.dimension))
            # the width gate (scope: the whole model) does not scale the attention kernels
            for name in unscaled_by(model, slot.dimension):
                unscaled[name].add(i)
        if kind == "flops":
            example = example_input if example_input is not None else default_input(model)
            if example is None:
                raise ConfigError(f"CostModel: pass example_input; {type(model).__name__} has no default input size")
            costs = _exclusive(module_flops(model, example))
        else:
            costs = _own_params(model)
        terms: dict[tuple[int, ...], float] = defaultdict(float)
        for name, cost in costs.items():
            if cost:
                key = tuple(sorted({i for i, path in scopes if _covers(path, name)} - unscaled.get(name, set())))
                terms[key] += cost
        self.total = float(sum(costs.values()))
        if not self.total:  # a kept fraction of nothing: fraction() would silently say 0 (all removed)
            what = "FLOPs on example_input (an empty batch?)" if kind == "flops" else "parameters outside its gates"
            raise ConfigError(
                f"CostModel: {type(model).__name__} counts 0 {what}; there is no cost to take a fraction of"
            )
        self.terms = sorted(terms.items())

    def _combine(self, fractions: list[Tensor]) -> Tensor:
        # float32 whatever the gates' dtype: a float16 sum of costs in the millions overflows to inf
        kept = fractions[0].new_zeros((), dtype=torch.float32) if fractions else torch.zeros(())
        for key, cost in self.terms:
            f = torch.ones((), dtype=kept.dtype, device=kept.device)
            for i in key:
                f = f * fractions[i].float()
            kept = kept + cost * f
        return kept / self.total if self.total else kept

    def expected_fraction(self) -> Tensor:
        """Differentiable expected kept fraction from the gates' ``expected_keep()`` (a float32 scalar)."""
        return self._combine([slot.gate.expected_keep().float().mean() for _, slot in self.slots])

    @torch.no_grad()
    def fraction(self) -> float:
        """Kept fraction once the closed units are removed (from the gates' keep masks)."""
        return float(self._combine([slot.gate.keep_mask().float().mean() for _, slot in self.slots]))
