"""Per-input layer skipping in timm ViTs: a router per block decides, per input, whether the block runs.

`RoutedBlock` is a timm ``Block`` with one more child, ``router`` (a `dynsparse.gates.BlockRouter`). At
inference the block runs only on the inputs the router sends through: at batch 1 a skipped block costs only
the router; in a batch the inputs that run it are gathered along the batch dimension (``index_select``, no
weight copies), run as one smaller batch, and written back, so every input gets exactly what it would get
alone. Under ``torch.export`` / ``torch.jit.trace`` every input runs the block and the decisions select its
output (a graph cannot hold a data-dependent split). In training every input runs the block and its update is
multiplied by the router's straight-through hard decision, so the router learns from the task loss and its
`penalty`.

**With token gates** (`dynsparse.layers.tokens`): a block after the first token gate is a `PolicyBlock`; routed, it
becomes a `RoutedPolicyBlock`, which routes the inputs in whatever layout the token gates left them:

* gathered tokens (``cls_attention`` / ``predictor`` at inference, ``cls_attention`` in training): ``(B, n, C)``,
  every input the same count, so the inputs are grouped exactly as above;
* packed tokens (``threshold`` at inference, `dynsparse.layers.token_pack`): ``(1, T, C)``, input ``b`` owns one
  segment of rows; the router reads each segment (its mean, or its first row), the segments of the inputs
  that run the block are gathered into a smaller packed batch with its own `Packing`, run, and written back;
* masked tokens (trained gates in training, ``mask_inference``): every input runs the block on all its tokens
  under the shared keep policy; the router pools over the kept tokens only (the same summary as on the gathered
  or packed path) and its decision multiplies the block's update (training) or selects it (inference).

A block that selects tokens (`TokenGatedBlock`) is never routed: ``blocks="all"`` leaves it out, naming it
is an error.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..errors import ConfigError
from ..gates.routers import ROUTERS, BlockRouter
from ..modules import adopt, capturing, place_like
from ..sparsify import _patterns, _selected
from .tokens import PolicyBlock, TokenGatedBlock

__all__ = ["RoutedBlock", "RoutedPolicyBlock", "check_with_tokens", "depth_spec", "route_blocks_"]


class RoutedBlock(Block):
    """A timm ``Block`` that runs only for the inputs its router sends through (see the module doc)."""

    #: The class the integration tables know it as (`dynsparse.integrations.tables.host_type`): a routed block keeps
    #: the ``Block``'s children and forward, so its residual branches are gated and closed (``layers``) as a Block's.
    host_class: ClassVar[type[nn.Module]] = Block

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
        if capturing():  # a graph cannot hold a data-dependent split: every input runs, the decisions select
            y = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            return torch.where(g.unsqueeze(-1) > 0, y, x)
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


class RoutedPolicyBlock(RoutedBlock, PolicyBlock):
    """A block after a token gate (`PolicyBlock`) that runs only for the inputs its router sends through.

    Routes gathered, packed and masked tokens (see the module doc); on gathered tokens it is `RoutedBlock`.
    """

    host_class: ClassVar[type[nn.Module]] = Block  # as PolicyBlock's: its branches are gated and removed as a Block's

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        state = self._token_state
        if state.packing is not None:
            return self._finish(self._route_packed(x))
        if state.policy is None:  # gathered tokens: every input has the same count
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        g = self.router(x, state.policy).unsqueeze(-1)  # (B, 1, 1), pooled over the kept tokens
        y = PolicyBlock.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        return x + g * (y - x) if self.training else self._finish(torch.where(g > 0, y, x))

    def _route_packed(self, x: Tensor) -> Tensor:
        """Packed tokens (1, T, C): run the block on the segments of the inputs the router sends through."""
        state = self._token_state
        pk = state.packing
        rows = x.reshape(pk.total, -1)
        z = rows.index_select(0, pk.starts) if self.router.pool == "token" else pk.mean(rows)
        run = self.router.decide(self.router.logits_pooled(z))[:, 0] > 0
        n = int(run.sum())
        if n == 0:
            return x
        if n == pk.batch:
            return self._mlp(self._attend(x, None, False)[0])
        sub, idx = pk.subset(run)
        state.packing = sub
        try:
            y = self._mlp(self._attend(sub.shape(rows.index_select(0, idx)), None, False)[0])
        finally:
            state.packing = pk
        return pk.shape(rows.index_copy(0, idx, y.reshape(sub.total, -1)))


def route_blocks_(
    model: nn.Module,
    gate: str = "router",
    blocks: list[int] | str = "all",
    keep: float = 0.5,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    **router_kwargs: Any,
) -> nn.Module:
    """Give blocks of a timm ViT a per-input router (in place); returns ``model``.

    Token gates go in first (`dynsparse.layers.gate_tokens_`; ``sparsify_`` with both ``tokens`` and ``depth``
    does it in that order): blocks after a token gate become `RoutedPolicyBlock`, the others `RoutedBlock`.

    Args:
        model: A timm ``VisionTransformer``, possibly with token gates.
        gate: A name of `dynsparse.gates.ROUTERS` (``router``).
        blocks: Block indices, or ``"all"`` (every block that does not select tokens and was not removed).
        keep: Run-time knob of every router (inputs with ``p ≥ 1 − keep`` run the block).
        include: fqn globs over the blocks (``blocks.3``); only matching blocks of ``blocks`` get a router.
        exclude: fqn globs over the blocks; matching blocks get no router.
        **router_kwargs: ``target``, ``weight``, ``tau``, ``pool`` of `BlockRouter`.

    Raises:
        ConfigError: a bad index, a block that selects tokens, a block that has a router already, or no block left.
    """
    inc, exc = _patterns(include, "depth.include"), _patterns(exclude, "depth.exclude")
    seq = getattr(model, "blocks", None)
    if not isinstance(seq, nn.Sequential) or not len(seq):
        raise ConfigError(f"depth: {type(model).__name__} has no `blocks` sequence of timm ViT blocks")
    if blocks == "all":  # a block that a conversion removed (nn.Identity) has nothing to skip
        idx = [i for i, b in enumerate(seq) if not isinstance(b, (TokenGatedBlock, nn.Identity))]
    else:
        idx = list(blocks) if isinstance(blocks, Sequence) and not isinstance(blocks, str) else [blocks]
    if not idx or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(seq) for i in idx):
        raise ConfigError(f"depth.blocks: 'all' or block indices in [0, {len(seq)}) expected, got {blocks!r}")
    if len(set(idx)) < len(idx):
        raise ConfigError(f"depth.blocks: each block at most once (a block has one router), got {blocks!r}")
    idx = [i for i in idx if _selected(f"blocks.{i}", inc, exc)]
    if not idx:
        raise ConfigError(f"depth: the blocks / include / exclude options leave no block to route (blocks={blocks!r})")
    cls = ROUTERS.get(gate)
    for i in idx:
        if isinstance(seq[i], TokenGatedBlock):
            raise _selects_tokens(i)
        if type(seq[i]) not in (Block, PolicyBlock):
            raise ConfigError(
                f"depth: blocks.{i} is a {type(seq[i]).__name__}, not a plain timm Block or a block after a token "
                "gate (a block has at most one router)"
            )
    for i in idx:
        try:
            router = cls(_width(seq[i], i), keep=keep, **router_kwargs)
        except TypeError as e:
            raise ConfigError(f"depth router {gate!r}: {e}") from None
        routed = RoutedPolicyBlock if isinstance(seq[i], PolicyBlock) else RoutedBlock
        seq[i] = routed.from_module(seq[i], place_like(router, seq[i]))
    return model


def _width(block: nn.Module, i: int) -> int:
    """The token width of ``blocks.i``, read from its norms (a converted block with a closed branch lacks one)."""
    for name in ("norm1", "norm2"):
        shape = getattr(getattr(block, name, None), "normalized_shape", None)
        if shape:
            return int(shape[0])
    raise ConfigError(f"depth: blocks.{i} ({type(block).__name__}) has no norm1 / norm2 to read its token width from")


def _selects_tokens(i: int) -> ConfigError:
    return ConfigError(
        f"depth.blocks: blocks.{i} selects tokens ('tokens' gate at block {i}); a 'depth' router cannot skip a "
        "block that selects tokens: route the blocks before or after it (blocks='all' does)"
    )


def check_with_tokens(tokens: dict[str, Any], depth: dict[str, Any]) -> None:
    """Raise `ConfigError` when a ``sparsify_`` spec routes a block that its ``tokens`` entry makes select tokens.

    ``sparsify_`` calls it before changing any module.
    """
    from .token_setup import gate_tokens_

    selecting = tokens.get("blocks", inspect.signature(gate_tokens_).parameters["blocks"].default)
    selecting = {selecting} if isinstance(selecting, int) else set(selecting)
    routed = depth.get("blocks", "all")
    routed = [] if routed == "all" else [routed] if isinstance(routed, int) else list(routed)
    for i in routed:
        if i in selecting:
            raise _selects_tokens(i)


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
