"""Token-dropping timm ViT blocks: keep, per input, the best tokens after a block's attention and gather them.

`TokenGatedBlock` is a timm ``Block`` with one more child, ``tokens`` (a `TokenSelect` holding the token gate):
between the attention branch and the MLP branch (EViT's place) it scores the non-prefix tokens and
**gathers** the ``ceil(keep · n)`` best of each input, in their original order, so this block's MLP and every
later block run on fewer tokens. Every input of a batch keeps the same number of tokens (its own ones), so a
batch stays one dense tensor: no masks, no per-input loops. Prefix tokens are always kept. With ``fuse``, the
dropped tokens are summed into one extra token weighted by the class token's attention (EViT).

Trainable gates (DynamicViT's predictor) are trained on the *masked* path instead: in training mode no token
is removed; the block samples hard keep decisions and every later block (`PolicyBlock`) masks the attention
to dropped tokens (DynamicViT's ``softmax_with_policy``), so the gradient reaches the predictor. With the
same decisions, masked and gathered inference give the same class-token output (a tested identity).

A ``threshold`` gate (LTP) keeps a *variable* number of tokens per input: at inference the kept tokens of the
whole batch are packed into one tensor and every later block runs on it (`dynsparse.layers.token_pack`); the
last block hands ``(B, n_max, C)`` to the head. In training its soft masks multiply the shared policy.

State dicts keep the host's keys; a learned gate adds ``blocks.i.tokens.gate.*``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..convert.zero import ZeroBranch
from ..errors import ConfigError
from ..gates.tokens import TokenGate, mean_over_heads, threshold_keep
from ..modules import adopt, capturing
from .token_pack import (
    Packing,
    fill_dropped,
    packed_attention,
    select_tokens,
    unpack,
)

__all__ = [
    "PolicyBlock",
    "TokenGatedBlock",
    "TokenSelect",
    "TokenState",
    "masked_attention",
]

_SETUP = ("calibrate_tokens_", "gate_tokens_", "token_spec")  # in `dynsparse.layers.token_setup`


class TokenState:
    """Keep decisions shared by the token-aware blocks of one model during a masked (training) forward.

    ``policy`` is (B, N) with 1 for kept tokens (prefix included); the first gated block resets it. ``packing``
    describes the packed batch of a variable-count (threshold) gate at inference; ``attention`` is the
    `dynsparse.layers.token_pack.packed_attention` mode; ``num_prefix`` / ``pool_prefix`` / ``pool`` describe the
    model's head (for the last block, which unpacks).
    """

    def __init__(self, num_prefix: int = 0, pool_prefix: bool = False, pool: str = "token") -> None:
        self.policy: Tensor | None = None
        self.packing: Packing | None = None
        self.attention = "auto"
        self.num_prefix, self.pool_prefix, self.pool = num_prefix, pool_prefix, pool

    def __deepcopy__(self, memo: dict) -> TokenState:
        new = TokenState(self.num_prefix, self.pool_prefix, self.pool)  # no decisions (and no autograd graph)
        new.attention = self.attention
        return new


class TokenSelect(nn.Module):
    """Holds a token gate and gathers the tokens it keeps (prefix tokens always kept).

    Args:
        gate: The token gate.
        num_prefix: Prefix tokens at the front of the sequence (class, distillation, registers).
        fuse: Append one token, the attention-weighted sum of the dropped tokens (EViT; needs a fusable gate).
    """

    def __init__(self, gate: TokenGate, num_prefix: int, fuse: bool = False) -> None:
        super().__init__()
        if not isinstance(fuse, bool):
            raise ConfigError(f"tokens: fuse must be true or false, got {fuse!r}")
        if fuse and not gate.fusable:
            raise ConfigError(f"tokens: fuse=True needs a gate with attention-like scores, not {type(gate).__name__}")
        self.gate = gate
        self.num_prefix = num_prefix
        self.fuse = fuse
        #: Inference by masking instead of gathering (same decisions, no speed-up): to check the fast path. Set it
        #: on every token-gated block of the model (a forward refuses a mix).
        self.mask_inference = False

    def keep_index(self, scores: Tensor) -> Tensor:
        """(B, k) indices of the kept non-prefix tokens, in their original order."""
        return scores.topk(self.gate.kept(scores.shape[1]), dim=1, sorted=False).indices.sort(dim=1).values

    def forward(self, x: Tensor, h: Tensor, attn: nn.Module) -> Tensor:
        """Tokens (B, N, C) -> (B, P + k [+ 1], C): prefix, kept tokens, optionally the fused token."""
        P = self.num_prefix
        s = self.gate.scores(x, h, attn, P)
        idx = self.keep_index(s)
        B, _, C = x.shape
        kept = torch.gather(x[:, P:], 1, idx.unsqueeze(-1).expand(B, idx.shape[1], C))
        parts = [x[:, :P], kept]
        if self.fuse and idx.shape[1] < s.shape[1]:
            w = s.scatter(1, idx, 0.0)  # attention of the dropped tokens (kept ones zeroed)
            parts.append(torch.einsum("bn,bnc->bc", w, x[:, P:]).unsqueeze(1))
        return torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        return f"num_prefix={self.num_prefix}, fuse={self.fuse}"


def masked_attention(
    attn: nn.Module, x: Tensor, policy: Tensor, eps: float = 1e-6, scores: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """timm ``Attention`` forward with DynamicViT's policy: token i attends to j only if j is kept (or j = i).

    ``softmax_with_policy``: ``(exp(A_ij − max_i) · G_ij + eps/N) / (Σ_k exp(A_ik − max_i) · G_ik + eps)`` with
    ``G_ij = policy_j`` for ``j ≠ i`` and 1 on the diagonal, computed in at least float32. Uses the module's own
    children (qkv, q/k norms, head gate in ``norm``, proj), so gated heads are respected. ``policy`` may be soft
    (a threshold gate's training masks). With ``scores``, also returns the (B, N) attention each token receives,
    queries weighted by the policy (see `dynsparse.gates.tokens.received_attention`).
    """
    B, N = x.shape[:2]
    H, d = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    a = (q * attn.scale) @ k.transpose(-2, -1)
    acc = torch.promote_types(q.dtype, torch.float32)  # at least float32 (DynamicViT computes it in float32)
    g = policy.reshape(B, 1, 1, N).to(acc)
    eye = torch.eye(N, device=x.device, dtype=acc).view(1, 1, N, N)
    g = g + (1.0 - g) * eye
    a = a.to(acc)
    a = (a - a.max(dim=-1, keepdim=True).values).exp() * g
    a = ((a + eps / N) / (a.sum(dim=-1, keepdim=True) + eps)).to(q.dtype)
    out = (attn.attn_drop(a) @ v).transpose(1, 2).reshape(B, N, H * d)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    if not scores:
        return out
    return out, mean_over_heads((a * policy.reshape(B, 1, N, 1).to(a.dtype)).sum(-2), attn)


def _check_not_recomputed() -> None:
    """Refuse a block recomputed in the backward pass (gradient checkpointing) on the masked or packed path.

    Those paths share the keep policy / packing of one forward between the blocks; a block recomputed during
    ``backward`` would read the state of the end of the forward, not the one it saw, and give wrong gradients.
    """
    task = getattr(torch._C, "_current_graph_task_id", None)  # private: where PyTorch lacks it, no check
    if task is not None and task() != -1:  # inside a backward pass
        raise ConfigError(
            "token gates: gradient checkpointing cannot recompute the masked (training) or packed token path: the "
            "blocks share one forward's keep decisions; turn it off (model.set_grad_checkpointing(False))"
        )


class _TokenAware(Block):
    """Shared parts of the token-aware blocks: attention with the shared policy, the MLP branch."""

    _token_state: TokenState

    def _attend(
        self, x: Tensor, attn_mask: Tensor | None, is_causal: bool, scores: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x + attention branch, norm1(x), received-attention scores or None)``.

        A converted block whose attention branch was removed (a closed ``layers`` gate: ``attn`` is a `ZeroBranch`)
        adds nothing, on every path (a block that selects tokens keeps its attention: see `TokenGatedBlock`).
        """
        h = self.norm1(x)
        state = self._token_state
        s = None
        if isinstance(self.attn, ZeroBranch) and not scores:
            return x, h, None
        if state.policy is not None or state.packing is not None:
            _check_not_recomputed()
        if (state.policy is not None or state.packing is not None) and (attn_mask is not None or is_causal):
            raise ConfigError("token gates: an attention mask cannot be combined with masked or packed tokens")
        if state.policy is not None:
            eps = 1e-6 if self.training else 0.0
            a = masked_attention(self.attn, h, state.policy, eps=eps, scores=scores)
            a, s = a if scores else (a, None)
        elif state.packing is not None:
            a, s = packed_attention(self.attn, h, state.packing, scores, state.attention)
        else:
            a = self.attn(h, attn_mask=attn_mask, is_causal=is_causal)
        return x + self.drop_path1(self.ls1(a)), h, s

    def _finish(self, x: Tensor) -> Tensor:
        """The last block of the model hands its tokens to the head as the gathered path would.

        A packed batch becomes (B, n_max, C) (see `token_pack.unpack`); on the masked inference path the dropped
        tokens become the mean of the pooled kept ones (`token_pack.fill_dropped`), so mean / max pooling see
        only the kept tokens, as on the gathered path.
        """
        state = self._token_state
        if not getattr(self, "_last", False):
            return x
        if state.packing is not None:
            x = unpack(x, state.packing, state.num_prefix, state.pool_prefix)
            state.packing = None
        elif state.policy is not None and not self.training and state.pool != "token":
            x = fill_dropped(x, state.policy, state.num_prefix, state.pool_prefix)
        return x

    def _mlp(self, x: Tensor) -> Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PolicyBlock(_TokenAware):
    """A timm ``Block`` after a trainable token gate: while training, its attention skips dropped tokens."""

    #: The class the integration tables know it as (`dynsparse.integrations.tables.host_type`): it keeps the
    #: ``Block``'s children, so its residual branches are gated, folded and removed (``layers``) as a Block's; a
    #: removed attention branch adds nothing on the masked and packed paths too (`_TokenAware._attend`).
    host_class: ClassVar[type[nn.Module]] = Block

    @classmethod
    def from_module(cls, block: Block, state: TokenState) -> PolicyBlock:
        """A `PolicyBlock` sharing ``block``'s children and parameters."""
        new = adopt(block, cls)
        new._token_state = state
        return new

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        state = self._token_state
        if state.policy is None and state.packing is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x, _, _ = self._attend(x, attn_mask, is_causal)
        return self._finish(self._mlp(x))


class TokenGatedBlock(_TokenAware):
    """A timm ``Block`` that keeps, per input, the best tokens after its attention (see the module doc)."""

    #: Why ``sparsify_`` gives it no ``layers`` gates (`dynsparse.sparsify.plan_sparsify` reads it): the tables do
    #: not know it, so it is refused by name rather than skipped.
    unsupported_layers: ClassVar[str] = (
        "it selects tokens, scored by its attention, so its residual branches cannot be removed (no 'layers' "
        "gates); exclude it from 'layers'"
    )

    @classmethod
    def from_module(cls, block: Block, select: TokenSelect, state: TokenState, first: bool) -> TokenGatedBlock:
        """A `TokenGatedBlock` sharing ``block``'s children and parameters, with ``select`` as child ``tokens``.

        ``first``: this is the first token-gated block of the model (it resets the shared policy).
        """
        new = adopt(block, cls)
        new._modules = dict(new._modules)
        new.tokens = select
        new._token_state = state
        new._first = first
        return new

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        sel: TokenSelect = self.tokens
        if attn_mask is not None or is_causal:  # made for all tokens: the later blocks see fewer (or masked) ones
            raise ConfigError("token gates: an attention mask cannot be combined with token selection")
        if sel.gate.variable:
            return self._variable(x, attn_mask, is_causal)
        train = self.training and sel.gate.trainable
        masked = train or (sel.mask_inference and not self.training)
        state = self._token_state
        self._check_same_path(masked)
        if masked and self._first:
            state.policy = x.new_ones(x.shape[:2])
        elif not masked:
            state.policy = None
        x, h, _ = self._attend(x, attn_mask, is_causal)
        if not masked:
            return self._mlp(sel(x, h, self.attn))
        if sel.fuse:
            raise ConfigError("tokens: fused tokens exist only on the gathered path (no masked training or inference)")
        if train:
            state.policy = sel.gate.sample(x, sel.num_prefix, state.policy)
        else:
            state.policy = sel.gate.topk_policy(x, h, self.attn, sel.num_prefix, state.policy)
        return self._finish(self._mlp(x))

    def _check_same_path(self, masked: bool) -> None:
        """A later gated block takes the first one's path: masked and gathered tokens do not mix in one forward."""
        if not self._first and masked != (self._token_state.policy is not None):
            raise ConfigError(
                "tokens: set mask_inference on every token-gated block or on none (a gathered block after a masked "
                "one would bring dropped tokens back; a masked one after a gathered one has no policy)"
            )

    def _variable(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        """A threshold gate: soft masks in training, a packed batch at inference (hard masks if ``mask_inference``)."""
        sel: TokenSelect = self.tokens
        gate, P, state = sel.gate, sel.num_prefix, self._token_state
        if x.shape[0] == 0:  # an empty batch: nothing to score, select or observe
            gate.record(None)  # and no penalty (the last batch's graph is freed)
            if self._first:
                state.policy = state.packing = None
            return Block.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        # a graph capture cannot hold data-dependent token counts: it records the masked path (same decisions)
        masked = self.training or sel.mask_inference or capturing()
        self._check_same_path(masked)
        if self._first:
            state.policy = x.new_ones(x.shape[:2]) if masked else None
            state.packing = None
        if not masked:
            if state.packing is None:
                state.packing = Packing([x.shape[1]] * x.shape[0], device=x.device)
            x, _, s = self._attend(x, attn_mask, is_causal, scores=True)
            if getattr(gate, "collect", None) is not None:  # calibrate_tokens_
                gate.collect.append(s[:, P:][state.packing.valid[:, P:]])
            x, state.packing = select_tokens(x, s, state.packing, gate.theta(), P)
            return self._finish(self._mlp(x))
        if self.training and state.pool != "token":
            raise ConfigError(
                f"tokens: training a threshold gate needs class-token pooling (global_pool='token'), the model "
                f"pools with {state.pool!r}"
            )
        x, _, s = self._attend(x, attn_mask, is_causal, scores=True)
        prev, s = state.policy[:, P:], s[:, P:]
        if self.training:
            gate.observe(s[prev > 0.5])
            m = gate.soft_mask(s) * prev
            gate.record(m.sum() / prev.sum().clamp_min(1e-6))
        else:  # hard decisions on the masked path: the same as the packed path
            if getattr(gate, "collect", None) is not None:  # calibrate_tokens_, on the masked reference path
                gate.collect.append(s[prev > 0])
            m = threshold_keep(s.masked_fill(prev == 0, float("-inf")), gate.theta()).to(prev.dtype) * prev
        state.policy = torch.cat([state.policy[:, :P], m], dim=1)
        return self._finish(self._mlp(x))


def __getattr__(name: str) -> Any:
    """`gate_tokens_`, `token_spec` and `calibrate_tokens_` live in `dynsparse.layers.token_setup` (imported on
    first use: it imports the blocks from here)."""
    if name in _SETUP:
        from . import token_setup

        return getattr(token_setup, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
