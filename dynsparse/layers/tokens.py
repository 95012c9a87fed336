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

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..convert.zero import ZeroBranch
from ..errors import ConfigError
from ..gates.tokens import TokenGate, mean_over_heads, threshold_keep
from ..modules import adopt, capturing, module_device, place_like
from .slot import GateSlot
from .token_pack import (
    Packing,
    check_packed_mlps,
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
    "calibrate_tokens_",
    "gate_tokens_",
    "masked_attention",
    "token_spec",
]


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
    if torch._C._current_graph_task_id() != -1:  # inside a backward pass
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
    return model


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
    calibrated budget). Runs in eval mode and restores the training flag.

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
    budgets, training, device = [g.keep for g in gates], model.training, module_device(model)
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
        model.train(training)
    return model
