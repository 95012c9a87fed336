"""Per-input layer skipping in timm ViTs: a router per block decides, per input, whether the block runs.

`RoutedBlock` is a timm ``Block`` with one more child, ``router`` (a `dynsparse.gates.BlockRouter`). At
inference the block runs only on the inputs the router sends through: at batch 1 a skipped block costs only
the router; in a batch the inputs that run it are gathered along the batch dimension (``index_select``, no
weight copies), run as one smaller batch, and written back, so every input gets exactly what it would get
alone. In training every input runs the block and its update is multiplied by the router's straight-through
hard decision, so the router learns from the task loss and its `penalty`.
"""

from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..errors import ConfigError
from ..gates.routers import ROUTERS, BlockRouter
from ..modules import adopt, place_like

__all__ = ["RoutedBlock", "depth_spec", "route_blocks_"]


class RoutedBlock(Block):
    """A timm ``Block`` that runs only for the inputs its router sends through (see the module doc)."""

    @classmethod
    def from_module(cls, block: Block, router: BlockRouter) -> RoutedBlock:
        """A `RoutedBlock` sharing ``block``'s children and parameters, with ``router`` as child ``router``."""
        new = adopt(block, cls)
        new._modules = dict(new._modules)
        new.router = router
        return new

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        g = self.router(x)  # (B, 1)
        if self.training:
            y = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            return x + g.unsqueeze(-1) * (y - x)
        run = g[:, 0] > 0
        n = int(run.sum())
        if n == len(run):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if n == 0:
            return x
        idx = run.nonzero().squeeze(1)
        if attn_mask is not None and attn_mask.dim() > 2 and attn_mask.shape[0] == len(run):
            attn_mask = attn_mask.index_select(0, idx)
        y = super().forward(x.index_select(0, idx), attn_mask=attn_mask, is_causal=is_causal)
        return x.index_copy(0, idx, y)


def route_blocks_(
    model: nn.Module, gate: str = "router", blocks: list[int] | str = "all", keep: float = 0.5, **router_kwargs: Any
) -> nn.Module:
    """Give blocks of a timm ViT a per-input router (in place); returns ``model``.

    Args:
        model: A timm ``VisionTransformer``.
        gate: A name of `dynsparse.gates.ROUTERS` (``router``).
        blocks: Block indices, or ``"all"``.
        keep: Run-time knob of every router (inputs with ``p ≥ 1 − keep`` run the block).
        **router_kwargs: ``target``, ``weight``, ``tau``, ``pool`` of `BlockRouter`.
    """
    seq = getattr(model, "blocks", None)
    if not isinstance(seq, nn.Sequential) or not len(seq):
        raise ConfigError(f"depth: {type(model).__name__} has no `blocks` sequence of timm ViT blocks")
    idx = list(range(len(seq))) if blocks == "all" else ([blocks] if isinstance(blocks, int) else list(blocks))
    if not idx or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(seq) for i in idx):
        raise ConfigError(f"depth.blocks: 'all' or block indices in [0, {len(seq)}) expected, got {blocks!r}")
    cls = ROUTERS.get(gate)
    for i in idx:
        if type(seq[i]) is not Block:
            raise ConfigError(
                f"depth: blocks.{i} is a {type(seq[i]).__name__}, not a plain timm Block (block routers do not "
                "combine with token gates or another router)"
            )
    for i in idx:
        try:
            router = cls(seq[i].norm1.normalized_shape[0], keep=keep, **router_kwargs)
        except TypeError as e:
            raise ConfigError(f"depth router {gate!r}: {e}") from None
        seq[i] = RoutedBlock.from_module(seq[i], place_like(router, seq[i]))
    return model


def depth_spec(model: nn.Module) -> dict | None:
    """The `route_blocks_` arguments that rebuild ``model``'s routers, or None (one router kind and settings)."""
    seq = getattr(model, "blocks", None) or ()
    found = [(i, b.router) for i, b in enumerate(seq) if isinstance(b, RoutedBlock)]
    if not found:
        return None
    r = found[0][1]
    settings = {(x.keep, x.target, x.weight, x.tau, x.pool) for _, x in found}
    if len(settings) > 1:
        raise ConfigError("depth: routers with different settings cannot be saved in one plan yet")
    name = next(n for n in ROUTERS.names() if ROUTERS.get(n) is type(r))
    return {
        "gate": name,
        "blocks": [i for i, _ in found],
        "keep": r.keep,
        "target": r.target,
        "weight": r.weight,
        "tau": r.tau,
        "pool": r.pool,
    }
