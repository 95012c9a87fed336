"""The models ``convert_speed.py`` times against the dense one: the dynsparse variant and the Torch-Pruning ones.

* `build_dynsparse`: ``sparsify_`` with fixed gates, ``fix_gates_`` with `half_masks` (exactly half of every gate's
  units, those whose producer weights have the largest L1 norm) and ``convert``, checked on a verification batch;
  DeiT loses the residual branches of `DEIT_CLOSED_BLOCKS` instead.
* `build_torch_pruning`: ``MetaPruner`` with ``MagnitudeImportance(p=1)`` at the same ratio, the residual writers
  ignored (`TP_SAME`) or not (`TP_DEFAULT`); a model that fails to prune or to run is a `Variant` without a model
  and a reason, not a crash.

Not part of the package: a helper of the benchmark scripts (``convert_speed.py``, which documents the method, and
``convert_layers.py``).
"""

from __future__ import annotations

import copy
import sys
import traceback
from dataclasses import dataclass, field

import timm
import torch
from torch import Tensor, nn

import dynsparse as ds

try:
    import torch_pruning as tp
except ImportError:  # the benchmark's optional extra
    tp = None

KEEP_RATIO = 0.5
DEIT_CLOSED_BLOCKS = (2, 5, 8, 11)
FIXED = {"gate": "fixed"}
TP_SAME = "torch-pruning"
TP_DEFAULT = "torch-pruning (default)"


@dataclass
class Variant:
    """A model to time against the dense one; ``model`` is None when it could not be built or does not run."""

    name: str
    model: nn.Module | None
    flops: int | None = None  # per forward at batch 1
    runs: str = "yes"
    notes: list[str] = field(default_factory=list)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


# ----------------------------------------------------------------------------------------------------- dynsparse


def _producer_scores(model: nn.Module, gate_fqn: str) -> Tensor:
    """One L1 score per unit of the gate at ``gate_fqn``: the norm of the weights that produce that unit."""
    slot_fqn = gate_fqn.removesuffix(".gate")
    owner_fqn, _, child = slot_fqn.rpartition(".")
    owner = model.get_submodule(owner_fqn)
    w: Tensor
    if child == "norm" and hasattr(owner, "qkv"):  # heads: q, k and v rows of each head
        w = owner.qkv.weight.detach().view(3, owner.num_heads, owner.head_dim, -1)
        return w.abs().sum(dim=(0, 2, 3))
    if child == "norm" and hasattr(owner, "fc1"):  # MLP neurons: rows of fc1
        return owner.fc1.weight.detach().abs().sum(dim=1)
    if child in ("act1", "act2"):  # bottleneck channels: filters of conv1 / conv2
        conv = owner.conv1 if child == "act1" else owner.conv2
        return conv.weight.detach().abs().flatten(1).sum(dim=1)
    raise ValueError(f"no producer rule for gate {gate_fqn!r}")


def half_masks(model: nn.Module) -> dict[str, Tensor]:
    """Keep masks with exactly half of the units of every gate: the largest L1 producer norms."""
    masks = {}
    for fqn, gate in ds.named_gates(model):
        scores = _producer_scores(model, fqn)
        assert scores.numel() == gate.num_units, (fqn, scores.numel(), gate.num_units)
        keep = torch.zeros(gate.num_units, dtype=torch.bool)
        keep[scores.topk(round(gate.num_units * KEEP_RATIO)).indices] = True
        masks[fqn] = keep
    return masks


def build_dynsparse(case: str, dense: nn.Module, x_verify: Tensor) -> Variant:
    gated = copy.deepcopy(dense)
    if case == "vit":
        ds.sparsify_(gated, {"heads": FIXED, "neurons": FIXED})
        masks = half_masks(gated)
    elif case == "resnet":
        ds.sparsify_(gated, {"channels": FIXED})
        masks = half_masks(gated)
    else:
        ds.sparsify_(gated, {"layers": FIXED})
        closed = torch.zeros(1, dtype=torch.bool)
        masks = {f"blocks.{i}.drop_path{j}.gate": closed for i in DEIT_CLOSED_BLOCKS for j in (1, 2)}
    ds.fix_gates_(gated, masks)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    converted = ds.convert(gated.eval(), verify_inputs=x_verify)
    libraries = sorted({type(m).__module__.split(".")[0] for m in converted.modules()})
    notes = [f"{len(masks)} gates, {kept} of {total} units kept; classes of the converted model from {libraries}"]
    return Variant("dynsparse", converted, notes=notes)


# ------------------------------------------------------------------------------------------------- Torch-Pruning


def _residual_writers(case: str, model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs are the residual stream: ignoring them leaves only internal widths to prune."""
    if case == "vit":
        layers = [model.patch_embed.proj]
        for blk in model.blocks:
            layers += [blk.attn.proj, blk.mlp.fc2]
        return layers
    layers = [model.conv1]
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for blk in stage:
            layers.append(blk.conv3)
            if blk.downsample is not None:
                layers += [m for m in blk.downsample.modules() if isinstance(m, nn.Conv2d)]
    return layers


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, timm.layers.Attention)]


def build_torch_pruning(case: str, dense: nn.Module, name: str, x1: Tensor) -> Variant:
    if tp is None:
        return Variant(name, None, runs="not installed (pip install torch-pruning)")
    model = copy.deepcopy(dense).eval()
    ignored: list[nn.Module] = [model.get_classifier()]
    if name == TP_SAME:
        ignored += _residual_writers(case, model)
    kwargs = {}
    if case == "vit":
        kwargs = {
            "unwrapped_parameters": [(model.cls_token, 2), (model.pos_embed, 2)],  # (1, 1, C), (1, N, C): prune C
            "num_heads": {attn.qkv: attn.num_heads for attn in _attention_modules(model)},
            "prune_num_heads": True,
            "prune_head_dims": False,
            "head_pruning_ratio": KEEP_RATIO,
        }
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            x1,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=1 - KEEP_RATIO,
            ignored_layers=ignored,
            **kwargs,
        )
        pruner.step()
    except Exception as e:  # a peer failing to prune is a result, not a crash of the benchmark
        log(traceback.format_exc())
        return Variant(name, None, runs=f"no: pruning failed ({short_error(e)})")
    variant = Variant(name, model)
    try:
        with torch.inference_mode():
            model(x1)
        as_is = "runs"
    except Exception as e:  # any tracing failure: time the model unfused, say so
        as_is = f"fails ({short_error(e)})"
    if case == "vit":
        # Torch-Pruning leaves timm's attributes stale; write them back as its ViT example does.
        for attn in _attention_modules(model):
            attn.num_heads = pruner.num_heads[attn.qkv]
            attn.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
            attn.attn_dim = attn.num_heads * attn.head_dim
        variant.notes.append(f"as pruned: {as_is}; then num_heads/head_dim/attn_dim of each Attention set by hand")
    else:
        variant.notes.append(f"as pruned: {as_is}")
    try:
        with torch.inference_mode():
            out = model(x1)
        if out.shape != (x1.shape[0], dense.num_classes):
            raise RuntimeError(f"output shape {tuple(out.shape)}")
    except Exception as e:  # any tracing failure: time the model unfused, say so
        variant.model = None
        variant.runs = f"no ({short_error(e)})"
        return variant
    if as_is != "runs":
        variant.runs = "only after hand fix"
    return variant
