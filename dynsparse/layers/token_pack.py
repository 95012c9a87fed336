"""Variable token counts per input in one batch: the packed layout, its attention and the way back to the head.

After a ``threshold`` token gate (`dynsparse.gates.ThresholdTokenGate`) the inputs of a batch keep different
numbers of tokens. Between blocks they travel as one **packed** tensor ``(1, T, C)`` with ``T = Σ_b n_b``:
input ``b`` owns rows ``offsets[b] : offsets[b] + n_b`` (its prefix tokens, then its kept tokens in their
original order). A `Packing` (the lengths) rides along in the model's shared ``TokenState``. When every input
has the same count the tensor is the usual ``(B, n, C)``.

Token-wise layers (norms, qkv, proj, MLP, LayerScale) run on the packed tensor as it is: no padding, no loop,
no mask. Only attention mixes tokens, and only within an input; `packed_attention` runs it

* ``"pad"``: q, k, v scattered into ``(B, n_max)`` with a key-padding mask, one batched attention call; or
* ``"loop"``: one attention call per input on its own rows.

``"auto"`` picks one by `attention_mode` (the rule comes from measurements, see docs/dynamic_thresholds.md).
At the end of the blocks `unpack` returns ``(B, n_max, C)`` to the model's final norm and head: padding rows
are copies of the mean of the input's pooled rows, so class-token, mean, max and mean+max pooling all give
exactly what each input gives alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..gates.tokens import mean_over_heads, threshold_keep

__all__ = ["Packing", "attention_mode", "fill_dropped", "packed_attention", "select_tokens", "unpack"]


class Packing:
    """Token counts of the inputs of a packed batch (prefix tokens included).

    Args:
        lengths: Tokens of each input, in batch order.
        device: Device of the index tensors.
    """

    def __init__(self, lengths: list[int], device: torch.device | str | None = None) -> None:
        self.lengths = [int(n) for n in lengths]
        self.batch, self.total, self.nmax = len(self.lengths), sum(self.lengths), max(self.lengths)
        self.uniform = min(self.lengths) == self.nmax
        self.offsets = [0]
        for n in self.lengths[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.device = device
        self._valid: Tensor | None = None
        self._index: Tensor | None = None
        self._segment: Tensor | None = None
        self._counts: Tensor | None = None
        self._starts: Tensor | None = None

    @property
    def counts(self) -> Tensor:
        """(B,) int64: the number of tokens of each input (``lengths`` as a tensor, built once)."""
        if self._counts is None:
            self._counts = torch.tensor(self.lengths, device=self.device)
        return self._counts

    @property
    def starts(self) -> Tensor:
        """(B,) int64: the packed row of each input's first token (``offsets`` as a tensor, built once)."""
        if self._starts is None:
            self._starts = torch.tensor(self.offsets, device=self.device)
        return self._starts

    @property
    def valid(self) -> Tensor:
        """(B, n_max) bool: which padded positions hold a token."""
        if self._valid is None:
            self._valid = torch.arange(self.nmax, device=self.device) < self.counts[:, None]
        return self._valid

    @property
    def index(self) -> Tensor:
        """(T,) positions of the packed rows in the flattened ``(B · n_max)`` padded layout."""
        if self._index is None:
            self._index = self.valid.flatten().nonzero().squeeze(1)
        return self._index

    def shape(self, rows: Tensor) -> Tensor:
        """Packed rows ``(T, F)`` as the layout tensor: ``(B, n, F)`` when uniform, else ``(1, T, F)``."""
        return rows.view(self.batch, self.nmax, -1) if self.uniform else rows.unsqueeze(0)

    def pad(self, rows: Tensor) -> Tensor:
        """Packed rows ``(T, F)`` -> ``(B, n_max, F)``, zeros at the padding."""
        if self.uniform:
            return rows.view(self.batch, self.nmax, -1)
        out = rows.new_zeros(self.batch * self.nmax, rows.shape[-1])
        return out.index_copy_(0, self.index, rows).view(self.batch, self.nmax, -1)

    def unpad(self, padded: Tensor) -> Tensor:
        """``(B, n_max, F)`` -> packed rows ``(T, F)``."""
        rows = padded.reshape(self.batch * self.nmax, -1)
        return rows if self.uniform else rows.index_select(0, self.index)

    @property
    def segment(self) -> Tensor:
        """(T,) the input each packed row belongs to."""
        if self._segment is None:
            self._segment = torch.repeat_interleave(torch.arange(self.batch, device=self.device), self.counts)
        return self._segment

    def subset(self, keep: Tensor) -> tuple[Packing, Tensor]:
        """The packing of some inputs only, and their rows.

        Args:
            keep: (B,) bool, the inputs kept.

        Returns:
            Their `Packing` (in input order) and the (T',) indices of their packed rows.
        """
        sub = Packing([n for n, k in zip(self.lengths, keep.tolist(), strict=True) if k], device=self.device)
        return sub, keep[self.segment].nonzero().squeeze(1)

    def mean(self, rows: Tensor) -> Tensor:
        """Packed rows ``(T, F)`` -> ``(B, F)``: the mean of each input's rows."""
        if self.uniform:
            return rows.view(self.batch, self.nmax, -1).mean(1)
        n = self.counts.to(rows.dtype)
        return rows.new_zeros(self.batch, rows.shape[-1]).index_add_(0, self.segment, rows) / n[:, None]

    def __repr__(self) -> str:
        return f"Packing(batch={self.batch}, total={self.total}, nmax={self.nmax})"


#: ``"auto"`` pads when the longest input has at most this many tokens and the batch has at least
#: `PAD_FROM_BATCH` inputs; otherwise it loops (see `attention_mode`).
PAD_UP_TO_TOKENS = 32
PAD_FROM_BATCH = 8


def attention_mode(pk: Packing) -> str:
    """The attention strategy ``"auto"`` uses for ``pk``.

    Measured on one core (``python benchmarks/token_layouts.py --attention``, vit_small's attention, counts
    uniform in [n/2, n]): the loop is 10-20 % faster from 64 tokens on at every batch size (the padded call
    computes the padding and copies q, k, v), padding is about 5 % faster for 8 or more inputs of at most
    16 tokens (per-call overhead dominates). So: ``"pad"`` for many short inputs, else ``"loop"``.
    """
    return "pad" if pk.nmax <= PAD_UP_TO_TOKENS and pk.batch >= PAD_FROM_BATCH else "loop"


def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scores: bool):
    """Attention of (M, H, n, d) q/k/v with an optional (M, n) key mask; scores (M, n) if asked (-inf at padding)."""
    q, k = attn.q_norm(q), attn.k_norm(k)
    if not scores:
        mask = None if valid is None else valid[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale), None
    a = (q * attn.scale) @ k.transpose(-2, -1)
    if valid is not None:
        a = a.masked_fill(~valid[:, None, None, :], float("-inf"))
    a = a.softmax(-1)
    o = a @ v
    if valid is not None:
        a = a * valid[:, None, :, None].to(a.dtype)  # padded queries receive nothing
    s = mean_over_heads(a.sum(-2), attn)
    return o, s if valid is None else s.masked_fill(~valid, float("-inf"))


def packed_attention(
    attn: nn.Module, h: Tensor, pk: Packing, scores: bool = False, mode: str = "auto"
) -> tuple[Tensor, Tensor | None]:
    """A timm ``Attention`` on a packed batch: every input attends only to its own tokens.

    Args:
        attn: The block's timm ``Attention`` (its qkv, q/k norms, scale, norm, gate and proj are used).
        h: The layout tensor, ``(1, T, C)`` packed or ``(B, n, C)`` when ``pk.uniform``.
        pk: The packing of ``h``.
        scores: Also return the attention each token receives (explicit softmax instead of fused attention).
        mode: ``"pad"``, ``"loop"`` or ``"auto"`` (see the module doc).

    Returns:
        The attention output in the layout of ``h``, and ``(B, n_max)`` scores (``-inf`` at the padding; see
        `dynsparse.gates.tokens.received_attention`) or None.
    """
    H, d = attn.num_heads, attn.head_dim
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(h).reshape(pk.total, 3 * H * d)
    B, n = pk.batch, pk.nmax
    mode = attention_mode(pk) if mode == "auto" else mode
    if mode not in ("pad", "loop"):
        raise ConfigError(
            f"packed_attention: mode (a model's blocks[i]._token_state.attention) must be 'pad', 'loop' or 'auto', "
            f"got {mode!r}"
        )
    if pk.uniform or mode == "pad":
        q, k, v = pk.pad(qkv).view(B, n, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        o, s = _attend(attn, q, k, v, None if pk.uniform else pk.valid, scores)
        o = pk.unpad(o.transpose(1, 2).reshape(B, n, H * d))
    else:
        outs, rows = [], []
        for start, length in zip(pk.offsets, pk.lengths, strict=True):
            q, k, v = qkv[start : start + length].view(1, length, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
            o, s = _attend(attn, q, k, v, None, scores)
            outs.append(o[0].transpose(0, 1).reshape(length, H * d))
            rows.append(s)
        o = torch.cat(outs)
        s = pk.pad(torch.cat(rows, 1).reshape(-1, 1)).squeeze(-1) if scores else None
        if s is not None:
            s = s.masked_fill(~pk.valid, float("-inf"))
    o = attn.norm(pk.shape(o))
    if gate is not None:
        o = o * gate
    return attn.proj_drop(attn.proj(o)), s


def select_tokens(x: Tensor, s: Tensor, pk: Packing, theta: Tensor, num_prefix: int) -> tuple[Tensor, Packing]:
    """Keep, per input, the prefix and the non-prefix tokens scoring above ``theta`` (at least the best one).

    Args:
        x: The layout tensor of ``pk``.
        s: (B, n_max) scores (``-inf`` at the padding).
        pk: The packing of ``x``.
        theta: 0-dim threshold.
        num_prefix: Prefix tokens at the front of every input (always kept, not ranked).

    Returns:
        The kept tokens in the new layout, and their packing.
    """
    P = num_prefix
    keep = torch.cat([s.new_ones(s.shape[0], P, dtype=torch.bool), threshold_keep(s[:, P:], theta)], dim=1)
    keep &= pk.valid
    flat = keep.flatten() if pk.uniform else keep.flatten()[pk.index]
    new = Packing(keep.sum(1).tolist(), device=x.device)
    rows = x.reshape(pk.total, -1).index_select(0, flat.nonzero().squeeze(1))
    return new.shape(rows), new


def unpack(x: Tensor, pk: Packing, num_prefix: int, include_prefix: bool = False) -> Tensor:
    """The layout tensor as ``(B, n_max, C)`` for the model's final norm and head.

    Padding rows are copies of the mean of the input's pooled rows (its non-prefix tokens, or all of them with
    ``include_prefix``): the mean over the padded rows is then that mean, and the max is unchanged, so
    ``global_pool`` ``'token'``, ``'avg'``, ``'max'`` and ``'avgmax'`` give what the input gives alone (the
    final norm must be the identity for the reductions, as timm builds it with ``fc_norm``).
    """
    if pk.uniform:
        return x
    padded = pk.pad(x.reshape(pk.total, -1))
    lo = 0 if include_prefix else num_prefix
    count = (torch.tensor(pk.lengths, device=x.device) - lo).clamp_min(1).to(x.dtype)
    mean = padded[:, lo:].sum(1) / count[:, None]
    return torch.where(pk.valid[..., None], padded, mean[:, None, :])


def fill_dropped(x: Tensor, policy: Tensor, num_prefix: int, include_prefix: bool = False) -> Tensor:
    """The masked layout ``(B, N, C)`` for the head: dropped tokens replaced by the mean of the pooled kept ones.

    The masked twin of `unpack` (``policy`` (B, N) > 0 marks the kept tokens): mean, max and mean+max pooling
    then give what the gathered or packed path gives (with the final norm the identity, as for `unpack`).
    """
    keep = policy > 0
    lo = 0 if include_prefix else num_prefix
    w = keep[:, lo:, None].to(x.dtype)
    mean = (x[:, lo:] * w).sum(1) / w.sum(1).clamp_min(1)
    return torch.where(keep[..., None], x, mean[:, None, :])


#: Per-input neuron gates (``per="input"``) and the packed batches of a threshold token gate do not mix.
PACKED_PER_INPUT = (
    "tokens: {fqn} has a per-input neuron gate (per='input'), but after a threshold token gate the inputs of a "
    "batch travel packed as one sequence, so it would choose one neuron set for the whole batch; use "
    "per='token' or a top-k token gate (cls_attention, predictor)"
)


def check_packed_mlps(seq: nn.Sequential, first: int) -> None:
    """No per-input neuron gate where a threshold gate packs the batch: it would see the batch as one input."""
    for i in range(first, len(seq)):
        if getattr(getattr(getattr(seq[i], "mlp", None), "neurons", None), "per", None) == "input":
            raise ConfigError(PACKED_PER_INPUT.format(fqn=f"blocks.{i}.mlp"))


def _variable_gate(block: nn.Module) -> bool:
    """True for a token-gated block whose gate keeps a variable number of tokens (a threshold gate)."""
    return bool(getattr(getattr(getattr(block, "tokens", None), "gate", None), "variable", False))


def check_not_packed(model: nn.Module, found: list[tuple[str, nn.Module]]) -> None:
    """Refuse per-input decisions in the blocks where a threshold token gate packs the batch into one sequence."""
    blocks = getattr(model, "blocks", None)
    gated = [
        i
        for i, b in enumerate(blocks or ())
        if getattr(getattr(getattr(b, "tokens", None), "gate", None), "variable", False)
    ]
    if not gated:
        return
    packed = {id(m) for b in list(blocks)[gated[0] :] for m in b.modules()}
    for fqn, host in found:
        if id(host) in packed:
            raise ConfigError(PACKED_PER_INPUT.format(fqn=fqn).replace("tokens: ", "neurons: ", 1))
