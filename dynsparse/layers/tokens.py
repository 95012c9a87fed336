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

State dicts keep the host's keys; a learned gate adds ``blocks.i.tokens.gate.*``.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..errors import ConfigError
from ..gates.tokens import TokenGate
from ..modules import adopt, place_like

__all__ = [
    "PolicyBlock",
    "TokenGatedBlock",
    "TokenSelect",
    "TokenState",
    "gate_tokens_",
    "masked_attention",
    "token_spec",
]


class TokenState:
    """Keep decisions shared by the token-aware blocks of one model during a masked (training) forward.

    ``policy`` is (B, N) with 1 for kept tokens (prefix included); the first gated block resets it.
    """

    def __init__(self) -> None:
        self.policy: Tensor | None = None

    def __deepcopy__(self, memo: dict) -> TokenState:
        return TokenState()  # a copy of the model starts with no decisions (and no autograd graph)


class TokenSelect(nn.Module):
    """Holds a token gate and gathers the tokens it keeps (prefix tokens always kept).

    Args:
        gate: The token gate.
        num_prefix: Prefix tokens at the front of the sequence (class, distillation, registers).
        fuse: Append one token, the attention-weighted sum of the dropped tokens (EViT; needs a fusable gate).
    """

    def __init__(self, gate: TokenGate, num_prefix: int, fuse: bool = False) -> None:
        super().__init__()
        if fuse and not gate.fusable:
            raise ConfigError(f"tokens: fuse=True needs a gate with attention-like scores, not {type(gate).__name__}")
        self.gate = gate
        self.num_prefix = num_prefix
        self.fuse = fuse
        #: Inference by masking instead of gathering (same decisions, no speed-up): to check the fast path.
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


def masked_attention(attn: nn.Module, x: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """timm ``Attention`` forward with DynamicViT's policy: token i attends to j only if j is kept (or j = i).

    ``softmax_with_policy``: ``exp(A_ij − max_i) · G_ij / (Σ_k exp(A_ik − max_i) · G_ik + eps)`` with
    ``G_ij = policy_j`` for ``j ≠ i`` and 1 on the diagonal, computed in at least float32. Uses the module's own
    children (qkv, q/k norms, head gate in ``norm``, proj), so gated heads are respected.
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
    return attn.proj_drop(attn.proj(out))


class _TokenAware(Block):
    """Shared parts of the token-aware blocks: attention with the shared policy, the MLP branch."""

    _token_state: TokenState

    def _attend(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> tuple[Tensor, Tensor]:
        h = self.norm1(x)
        policy = self._token_state.policy
        if policy is not None:
            if attn_mask is not None or is_causal:
                raise ConfigError("token gates: an attention mask cannot be combined with masked token training")
            a = masked_attention(self.attn, h, policy, eps=1e-6 if self.training else 0.0)
        else:
            a = self.attn(h, attn_mask=attn_mask, is_causal=is_causal)
        return x + self.drop_path1(self.ls1(a)), h

    def _mlp(self, x: Tensor) -> Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PolicyBlock(_TokenAware):
    """A timm ``Block`` after a trainable token gate: while training, its attention skips dropped tokens."""

    @classmethod
    def from_module(cls, block: Block, state: TokenState) -> PolicyBlock:
        """A `PolicyBlock` sharing ``block``'s children and parameters."""
        new = adopt(block, cls)
        new._token_state = state
        return new

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if self._token_state.policy is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x, _ = self._attend(x, attn_mask, is_causal)
        return self._mlp(x)


class TokenGatedBlock(_TokenAware):
    """A timm ``Block`` that keeps, per input, the best tokens after its attention (see the module doc)."""

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
        train = self.training and sel.gate.trainable
        masked = train or (sel.mask_inference and not self.training)
        state = self._token_state
        if masked and self._first:
            state.policy = x.new_ones(x.shape[:2])
        elif not masked:
            state.policy = None
        x, h = self._attend(x, attn_mask, is_causal)
        if not masked:
            return self._mlp(sel(x, h, self.attn))
        if sel.fuse:
            raise ConfigError("tokens: fused tokens exist only on the gathered path (no masked training or inference)")
        if train:
            state.policy = sel.gate.sample(x, sel.num_prefix, state.policy)
        else:
            state.policy = sel.gate.topk_policy(x, h, self.attn, sel.num_prefix, state.policy)
        return self._mlp(x)


def _token_host(model: nn.Module) -> tuple[nn.Sequential, int, int]:
    """``(blocks, num_prefix_tokens, num_patches)`` of a timm VisionTransformer-like model, or a clear error."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not len(blocks):
        raise ConfigError(
            f"tokens: {type(model).__name__} has no `blocks` sequence of timm ViT blocks "
            "(token gates support timm VisionTransformer / DeiT models)"
        )
    bad = [f"blocks.{i} ({type(b).__name__})" for i, b in enumerate(blocks) if not isinstance(b, Block)]
    if bad:
        raise ConfigError(f"tokens: only timm `Block`s can drop tokens; found {', '.join(bad[:3])}")
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    patches = int(getattr(getattr(model, "patch_embed", None), "num_patches", 0) or 0)
    return blocks, prefix, patches


def gate_tokens_(
    model: nn.Module,
    gate: str | dict = "cls_attention",
    blocks: list[int] | tuple[int, ...] = (3, 6, 9),
    keep: float | list[float] = 0.7,
    fuse: bool = False,
    **gate_kwargs,
) -> nn.Module:
    """Make the given blocks of a timm ViT keep only part of the tokens, per input (in place).

    Args:
        model: A timm ``VisionTransformer`` (ViT, DeiT, with register / distillation tokens).
        gate: A name of `dynsparse.gates.TOKEN_GATES` (``cls_attention``, ``predictor``).
        blocks: Indices of the blocks that select tokens (after their attention).
        keep: Fraction of the arriving non-prefix tokens kept at each of them (one value or one per block).
        fuse: Fuse the dropped tokens into one token (EViT; ``cls_attention`` only).
        **gate_kwargs: Extra arguments of the gate (e.g. ``weight``, ``tau`` of ``predictor``).

    Returns:
        ``model``.
    """
    from ..gates.tokens import make_token_gate

    seq, prefix, patches = _token_host(model)
    idx = [blocks] if isinstance(blocks, int) else list(blocks)
    if not idx or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(seq) for i in idx):
        raise ConfigError(f"tokens.blocks: block indices in [0, {len(seq)}) expected, got {blocks!r}")
    if sorted(set(idx)) != idx:
        raise ConfigError(f"tokens.blocks: indices must be increasing and distinct, got {blocks!r}")
    keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep] * len(idx)
    if len(keeps) != len(idx):
        raise ConfigError(f"tokens.keep: {len(keeps)} values for {len(idx)} blocks")
    if any(isinstance(b, TokenGatedBlock) for b in seq):
        raise ConfigError("tokens: the model already has token gates")
    odd = [f"blocks.{i} ({type(b).__name__})" for i, b in enumerate(seq) if i >= idx[0] and type(b) is not Block]
    if odd:
        raise ConfigError(f"tokens: token gates need plain timm Blocks from the first gate on; found {odd[0]}")
    state, n, target = TokenState(), patches, 1.0
    for j, (i, k) in enumerate(zip(idx, keeps, strict=True)):
        spec = {"gate": gate} if isinstance(gate, str) else dict(gate)
        g = make_token_gate({**spec, **gate_kwargs, "keep": k}, max(n, 1), seq[i].norm1.normalized_shape[0])
        target *= g.keep
        if hasattr(g, "target"):
            g.target = target
        if g.trainable and getattr(model, "global_pool", "token") != "token":
            raise ConfigError(
                f"tokens: a trained token gate needs class-token pooling (global_pool='token'), the model pools "
                f"with {model.global_pool!r}"
            )
        if prefix < 1 and isinstance(gate, str) and gate == "cls_attention":
            raise ConfigError("tokens: the cls_attention gate needs a class token; this model has no prefix token")
        sel = place_like(TokenSelect(g, prefix, fuse), seq[i])
        seq[i] = TokenGatedBlock.from_module(seq[i], sel, state, first=j == 0)
        n = g.kept(n) + (1 if fuse else 0)
    for i in range(idx[0] + 1, len(seq)):  # blocks after the first gate mask attention on the masked path
        if not isinstance(seq[i], TokenGatedBlock):
            seq[i] = PolicyBlock.from_module(seq[i], state)
    return model


def token_spec(model: nn.Module) -> dict | None:
    """The `gate_tokens_` arguments that rebuild ``model``'s token gates (current budgets included), or None."""
    from ..gates.tokens import TOKEN_GATES

    blocks = getattr(model, "blocks", None)
    found = [(i, b.tokens) for i, b in enumerate(blocks or ()) if isinstance(b, TokenGatedBlock)]
    if not found:
        return None
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
    for key in ("weight", "tau"):
        if hasattr(gate, key):
            spec[key] = getattr(gate, key)
    return spec
