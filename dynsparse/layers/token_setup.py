"""Setting up token gates on a timm ViT: `gate_tokens_` (swap the chosen blocks for `TokenGatedBlock` and the later
ones for `PolicyBlock`), `token_spec` (what a saved plan records of them) and `calibrate_tokens_` (the score tables
of threshold gates). The blocks themselves live in `dynsparse.layers.tokens`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..errors import ConfigError
from ..modules import modes_kept, module_device, place_like
from .slot import GateSlot
from .token_pack import check_packed_mlps
from .tokens import PolicyBlock, TokenGatedBlock, TokenSelect, TokenState

__all__ = ["calibrate_tokens_", "gate_tokens_", "token_spec"]


def _removed(block: nn.Module) -> bool:
    """True for a block a conversion removed (both branches closed: ``nn.Identity``)."""
    return type(block) is nn.Identity


def _token_host(model: nn.Module) -> tuple[nn.Sequential, int, int]:
    """``(blocks, num_prefix_tokens, num_patches)`` of a timm VisionTransformer-like model, or a clear error."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not len(blocks):
        raise ConfigError(
            f"tokens: {type(model).__name__} has no `blocks` sequence of timm ViT blocks "
            "(token gates support timm VisionTransformer / DeiT models)"
        )
    bad = [
        f"blocks.{i} ({type(b).__name__})" for i, b in enumerate(blocks) if not isinstance(b, Block) and not _removed(b)
    ]
    if bad:
        raise ConfigError(f"tokens: only timm `Block`s can drop tokens; found {', '.join(bad[:3])}")
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    patches = int(getattr(getattr(model, "patch_embed", None), "num_patches", 0) or 0)
    return blocks, prefix, patches


def gate_tokens_(
    model: nn.Module,
    gate: str | dict = "cls_attention",
    blocks: list[int] | tuple[int, ...] = (3, 6, 9),
    keep: float | list[float | None] | None = None,
    fuse: bool = False,
    final_threshold: float = 1.0,
    **gate_kwargs: Any,
) -> nn.Module:
    """Make the given blocks of a timm ViT keep only part of the tokens, per input (in place).

    Args:
        model: A timm ``VisionTransformer`` (ViT, DeiT, with register / distillation tokens).
        gate: A name of `dynsparse.gates.TOKEN_GATES` (``cls_attention``, ``predictor``, ``threshold``), or a dict
            ``{"gate": name, **gate arguments}``.
        blocks: Indices of the blocks that select tokens (after their attention).
        keep: Fraction of the arriving non-prefix tokens kept at each of them (one value or one per block).
            None: 0.7 for the top-k gates, the learned threshold for ``threshold``.
        fuse: Fuse the dropped tokens into one token (EViT; ``cls_attention`` only).
        final_threshold: ``threshold`` gate: LTP's ``θ_final``; block ``l`` of ``L`` starts at
            ``θ_final · l / L`` (unless ``threshold=`` is given).
        **gate_kwargs: Extra arguments of the gate (e.g. ``weight``, ``tau`` of ``predictor``; ``temperature``,
            ``weight``, ``target`` of ``threshold``).

    Returns:
        ``model``.
    """
    from ..gates.tokens import TOKEN_GATES, make_token_gate

    for key in ("include", "exclude"):
        if key in gate_kwargs:
            raise ConfigError(f"tokens.{key}: token gates are placed by block indices (blocks=...), not by fqn globs")
    seq, prefix, patches = _token_host(model)
    spec = {"gate": gate} if isinstance(gate, str) else dict(gate)
    variable = TOKEN_GATES.get(spec.get("gate", "cls_attention")).variable
    if variable:
        _check_variable_head(model, final_threshold)
    idx = [blocks] if isinstance(blocks, int) else list(blocks)
    if not idx or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(seq) for i in idx):
        raise ConfigError(f"tokens.blocks: block indices in [0, {len(seq)}) expected, got {blocks!r}")
    if variable:
        check_packed_mlps(seq, idx[0])
    if sorted(set(idx)) != idx:
        raise ConfigError(f"tokens.blocks: indices must be increasing and distinct, got {blocks!r}")
    for i in idx:
        slots = [n for n, c in seq[i].named_children() if isinstance(c, GateSlot) and c.dimension == "layers"]
        if slots:
            raise ConfigError(
                f"tokens.blocks: blocks.{i} holds 'layers' gates ({', '.join(slots)}), but a block that selects "
                "tokens takes none (its attention scores the tokens, so its branches cannot be removed): exclude "
                f'it from \'layers\' ("exclude": "blocks.{i}") or select tokens at another block'
            )
    keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep] * len(idx)
    if len(keeps) != len(idx):
        raise ConfigError(f"tokens.keep: {len(keeps)} values for {len(idx)} blocks")
    if any(isinstance(b, TokenGatedBlock) for b in seq):
        raise ConfigError("tokens: the model already has token gates")
    from .head_gating import HeadGatedAttention

    heads = [f"blocks.{i}.attn" for i, b in enumerate(seq) if isinstance(getattr(b, "attn", None), HeadGatedAttention)]
    if heads:
        raise ConfigError(f"tokens: token gates cannot be combined with per-input head gates yet (found {heads[0]})")
    odd = [
        f"blocks.{i} ({type(b).__name__})"
        for i, b in enumerate(seq)
        if i >= idx[0] and type(b) is not Block and not (_removed(b) and i not in idx and i < len(seq) - 1)
    ]
    if odd:
        hint = ""
        if any(hasattr(b, "router") for b in seq):
            hint = " (add token gates before routers: a sparsify_ spec with both 'tokens' and 'depth' does)"
        raise ConfigError(f"tokens: token gates need plain timm Blocks from the first gate on; found {odd[0]}{hint}")
    pool = getattr(model, "global_pool", "token")
    state = TokenState(prefix, bool(getattr(model, "pool_include_prefix", False)), pool)
    n, target, sels = patches, 1.0, []
    for i, k in zip(idx, keeps, strict=True):
        if k is None:  # a keep in the gate dict, else the default
            k = spec.get("keep", None if variable else 0.7)
        opts = {**spec, **gate_kwargs, "keep": k}
        if variable:
            opts.setdefault("threshold", final_threshold * i / len(seq))
        g = make_token_gate(opts, max(n, 1), seq[i].norm1.normalized_shape[0])
        if not variable:
            target *= g.keep
            if hasattr(g, "target"):
                g.target = target
        if g.trainable and not variable and pool != "token":
            raise ConfigError(
                f"tokens: a trained token gate needs class-token pooling (global_pool='token'), the model pools "
                f"with {model.global_pool!r}"
            )
        if spec.get("gate", "cls_attention") == "cls_attention" and not getattr(model, "has_class_token", prefix >= 1):
            raise ConfigError(  # without one, the first prefix token is a register: its attention is no EViT score
                f"tokens: the cls_attention gate needs a class token; this model has {prefix} prefix token(s) and no "
                "class token (use the threshold gate)"
            )
        if hasattr(g, "locations"):  # the ratio loss is averaged over the predictor locations (DynamicViT)
            g.locations = len(idx)
        sels.append(place_like(TokenSelect(g, prefix, fuse), seq[i]))
        n = g.kept(n) + (1 if fuse else 0)
    for j, (i, sel) in enumerate(zip(idx, sels, strict=True)):  # every gate built: now change the model
        seq[i] = TokenGatedBlock.from_module(seq[i], sel, state, first=j == 0)
    for i in range(idx[0] + 1, len(seq)):  # blocks after the first gate mask attention on the masked path
        if not isinstance(seq[i], TokenGatedBlock) and not _removed(seq[i]):
            seq[i] = PolicyBlock.from_module(seq[i], state)
    seq[-1]._last = True  # hands a packed batch back to the head
    # the blocks hand the head tokens laid out for this pooling: a later `reset_classifier(global_pool=...)` would
    # pool padding or dropped tokens silently (a partial of plain values: it follows the model through deepcopy)
    model.register_forward_pre_hook(functools.partial(_same_pooling, pool=pool))
    return model


def _same_pooling(model: nn.Module, args: Any, *, pool: str) -> None:
    """Forward pre-hook: refuse a model whose pooling changed since its token gates were set."""
    now = getattr(model, "global_pool", "token")
    if now != pool:
        raise ConfigError(
            f"tokens: {type(model).__name__} pools with global_pool={now!r}, but its token gates were set for "
            f"{pool!r} (reset_classifier after sparsify_?); set the token gates after changing the pooling"
        )


def _check_variable_head(model: nn.Module, final_threshold: float) -> None:
    """A variable-count gate needs a head that `token_pack.unpack` serves exactly."""
    if isinstance(final_threshold, bool) or not isinstance(final_threshold, (int, float)):
        raise ConfigError(f"tokens.final_threshold: a number expected, got {final_threshold!r}")
    pool = getattr(model, "global_pool", "token")
    if getattr(model, "attn_pool", None) is not None:
        raise ConfigError("tokens: the threshold gate does not support attention pooling (global_pool='map')")
    if pool not in ("token", "avg", "max", "avgmax", ""):
        raise ConfigError(f"tokens: the threshold gate does not support global_pool={pool!r}")
    if pool in ("avg", "max", "avgmax") and not isinstance(getattr(model, "norm", nn.Identity()), nn.Identity):
        raise ConfigError(
            f"tokens: the threshold gate with global_pool={pool!r} needs fc_norm (model.norm = Identity), since "
            "inputs keep different token counts and the pooled tokens are normalised after pooling"
        )


def token_spec(model: nn.Module) -> dict | None:
    """The `gate_tokens_` arguments that rebuild ``model``'s token gates (current budgets included), or None."""
    from ..gates.tokens import TOKEN_GATES

    blocks = getattr(model, "blocks", None)
    found = [(i, b.tokens) for i, b in enumerate(blocks or ()) if isinstance(b, TokenGatedBlock)]
    if not found:
        return None
    if _removed(blocks[-1]):
        raise ConfigError(
            f"tokens: blocks.{len(blocks) - 1}, the last block, lost both its branches (closed 'layers' gates) and "
            "with them the hand-off of the kept tokens to the head; keep one of its branches open"
        )
    names = {TOKEN_GATES.get(n): n for n in TOKEN_GATES.names()}
    first = found[0][1]
    kinds = {type(sel.gate) for _, sel in found}
    if len(kinds) > 1 or len({sel.fuse for _, sel in found}) > 1:
        raise ConfigError("tokens: one gate kind and one fuse setting per model can be saved")
    gate = first.gate
    if type(gate) not in names:
        raise ConfigError(f"tokens: the gate {type(gate).__name__} is not registered in TOKEN_GATES")
    spec: dict = {
        "gate": names[type(gate)],
        "blocks": [i for i, _ in found],
        "keep": [sel.gate.keep for _, sel in found],
        "fuse": first.fuse,
    }
    for key in ("weight", "tau", "temperature", "target", "momentum"):
        if hasattr(gate, key) and (key != "target" or gate.variable):
            spec[key] = getattr(gate, key)
    return spec


@torch.no_grad()
def calibrate_tokens_(model: nn.Module, inputs: Tensor | Iterable[Tensor | tuple]) -> nn.Module:
    """Record the score table of every ``threshold`` gate on ``inputs`` (in place), for ``keep=`` budgets.

    The gates are calibrated in order, one pass over ``inputs`` each: gate ``j``'s table holds the exact score
    quantiles of the tokens that reach it when the gates before it run at their current budgets (set them with
    `dynsparse.set_budget_` first to calibrate for a budget). Afterwards ``set_budget_(model, keep=k)`` makes
    each gate keep about a fraction ``k`` of the tokens that reach it (exactly, on these inputs, at the
    calibrated budget). Runs in eval mode and restores every module's training flag.

    Args:
        model: A model with ``threshold`` token gates.
        inputs: One batch or an iterable of batches (images, as the model takes them, or ``(inputs, labels)``
            pairs of a DataLoader); moved to the model's device.

    Returns:
        ``model``.

    Examples:
        >>> import timm, torch, dynsparse as ds
        >>> m = ds.sparsify_(timm.create_model("test_vit"), {"tokens": {"gate": "threshold", "blocks": [1]}})
        >>> ds.get_budget(ds.set_budget_(calibrate_tokens_(m, torch.randn(4, 3, 160, 160)), keep=0.5))
        {'blocks.1.tokens.gate': 0.5}
    """
    gates = [b.tokens.gate for b in getattr(model, "blocks", ()) if isinstance(b, TokenGatedBlock)]
    gates = [g for g in gates if g.variable]
    if not gates:
        raise ConfigError(f"calibrate_tokens_: {type(model).__name__} has no threshold token gate")
    batches = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if not batches:
        raise ConfigError("calibrate_tokens_: no inputs")
    budgets, device = [g.keep for g in gates], module_device(model)
    with modes_kept(model):
        model.eval()
        try:
            for j, g in enumerate(gates):
                for later in gates[j:]:
                    later.keep = 1.0  # gate j's scores do not depend on its own decisions or the later ones
                g.collect = []
                for x in batches:
                    x = x[0] if isinstance(x, (tuple, list)) else x  # an (inputs, labels) pair of a DataLoader
                    model(x.to(device))  # a CPU batch for a model on the GPU; moved per pass, not all held there
                g.observe(torch.cat(g.collect), exact=True)
                g.collect = None
                g.set_budget_(budgets[j])
        finally:
            for g, k in zip(gates, budgets, strict=True):
                g.collect = None
                g.set_budget_(k)
    return model
