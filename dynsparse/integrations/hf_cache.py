"""Removed attention branches of Hugging Face decoders, and the KV-cache slots of the attention layers that stay.

A transformers cache is a list of per-layer entries built from the config (``config.layer_types``: a full-attention
entry, a sliding-window entry, ...) and indexed by each attention module's ``layer_idx``. Three things read it besides
the attention layers themselves: ``cache.get_seq_length()`` (the number of tokens seen, from entry 0) gives the
position ids of the next tokens, and the causal masks take their sizes from the first full-attention entry and the
first sliding-window entry. The model gives each layer the mask of its own type, ``config.layer_types[i]``.

When attention branches are removed, `assign_cache_slots_` keeps all of that true without touching transformers:

- every remaining attention layer keeps its own entry, except that the first one moves to entry 0 when layer 0's
  attention was removed;
- the removed layers' items of ``config.layer_types`` take the type of that first layer, so entry 0 is of its kind and
  the first entry of every other kind belongs to a remaining layer of that kind (the remaining layers' items, which
  pick their masks, do not change);
- when no attention layer is left, the first removed one counts the tokens in entry 0 (a ``(batch, 1, tokens, 1)``
  tensor of zeros per step): GPT-2's position embeddings still need the cache's length.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from ..errors import UnsupportedModuleError

__all__ = ["ZeroAttention", "assign_cache_slots_"]


def _count_tokens(layer_idx: int, hidden_states: Tensor, inputs: tuple[Any, ...]) -> None:
    """Record ``hidden_states``' tokens in entry ``layer_idx`` of the cache among ``inputs`` (if any)."""
    cache = next((a for a in inputs if isinstance(a, Cache)), None)
    if cache is None:
        return
    cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache: its self-attention part
    b, t = hidden_states.shape[:2]
    zeros = hidden_states.new_zeros(b, 1, t, 1)  # a cache entry's length is its size along dim -2
    cache.update(zeros, zeros, layer_idx)


class _RemovedPart(nn.Module):
    """A removed part's KV-cache entry, and the token count for a cache with no attention layer left."""

    def __init__(self, layer_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.counts_tokens = False

    def _count(self, hidden_states: Tensor, args: tuple, kwargs: dict) -> None:
        if self.counts_tokens:
            _count_tokens(self.layer_idx, hidden_states, (*args, *kwargs.values()))

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, counts_tokens={self.counts_tokens}"


class ZeroAttention(_RemovedPart):
    """A removed attention branch: returns ``(zeros like the input, None)`` like an HF attention module.

    Args:
        layer_idx: The KV-cache entry of the attention it replaces; None when that attention used no cache.

    Attributes:
        counts_tokens: Set by `assign_cache_slots_` when no attention layer is left: the module then records each
            call's tokens in cache entry ``layer_idx`` (zeros of shape ``(B, 1, T, 1)``) so the cache keeps its length.
    """

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        """``hidden_states: (B, T, C)`` -> zeros of the same shape; a cache among the inputs is only counted."""
        self._count(hidden_states, args, kwargs)
        return hidden_states.new_zeros(hidden_states.shape), None


def assign_cache_slots_(model: nn.Module, attention: tuple[type[nn.Module], ...], config: Any) -> nn.Module:
    """Give the attention layers left after removed branches valid KV-cache entries (in place; see the module doc).

    Args:
        model: A converted model. Its self-attention modules (instances of ``attention`` with an integer
            ``layer_idx``, not ``is_cross_attention``) and its `ZeroAttention` modules with a
            ``layer_idx`` are taken, in module order, as the attention branches of layers 0, 1, ...
        attention: The self-attention classes that read and write a KV cache by ``layer_idx``.
        config: The model's config; its ``layer_types`` (if any) is edited for the removed layers.

    Raises:
        UnsupportedModuleError: the config's ``layer_types`` mixes kinds but does not have one item per layer.

    Example:
        >>> assign_cache_slots_(converted, (LlamaAttention,), converted.config)  # doctest: +SKIP
    """
    removed_types = (ZeroAttention,)

    def is_layer(m: nn.Module) -> bool:
        self_attention = isinstance(m, attention) and not getattr(m, "is_cross_attention", False)
        return (self_attention or isinstance(m, removed_types)) and isinstance(m.layer_idx, int)

    layers = [m for m in model.modules() if is_layer(m)]
    live = [i for i, m in enumerate(layers) if not isinstance(m, removed_types)]
    if len(live) == len(layers):
        return model
    for i, m in enumerate(layers):
        if isinstance(m, removed_types):
            m.counts_tokens = False
        else:
            m.layer_idx = i
    if not live:  # nothing left that writes the cache: the first removed layer counts the tokens in entry 0
        layers[0].layer_idx, layers[0].counts_tokens = 0, True
        return model
    first = live[0]
    layers[first].layer_idx = 0
    types = getattr(config, "layer_types", None) if isinstance(config, PretrainedConfig) else None
    if types is None or len(set(types)) == 1:
        return model
    if len(types) != len(layers):
        raise UnsupportedModuleError(
            "",
            type(model).__name__,
            "layers",
            f"config.layer_types has {len(types)} items for {len(layers)} attention layers",
            action="convert",
        )
    kept = set(live)
    config.layer_types = [t if i in kept else types[first] for i, t in enumerate(types)]
    return model
