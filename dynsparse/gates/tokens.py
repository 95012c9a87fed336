"""Token gates: per input, which tokens of a vision transformer go on through the later blocks.

A token gate scores the non-prefix tokens at one block (`dynsparse.layers.tokens.TokenGatedBlock`); the
block keeps the ``ceil(keep · n)`` best of the ``n`` tokens that reach it (at least one) and **gathers**
them, so every later block really runs on fewer tokens. Prefix tokens (class, distillation, registers) are
always kept. Two gates are registered in `TOKEN_GATES`:

* ``cls_attention`` (EViT, Liang et al. 2022): the class token's attention to each token in this block,
  averaged over heads. No parameters and no training: try it on any pretrained ViT at once; optionally the
  dropped tokens are fused into one token weighted by that attention.
* ``predictor`` (DynamicViT, Rao et al. 2021): a small MLP on each token and a policy-weighted global
  feature gives keep / drop log-probabilities. Trained with hard Gumbel-softmax decisions and attention
  masking (the dropped tokens stay in the tensor but no other token attends to them), a ratio loss towards
  the cumulative keep target, optionally distillation from the dense model.

* ``threshold`` (LTP, Kim et al. 2022): keeps the tokens whose received attention exceeds a learned
  per-block threshold, so each input keeps a **variable** number of tokens (`ThresholdTokenGate`; the batched
  variable-count path is `dynsparse.layers.token_pack`).

``keep`` is the run-time knob (`InputDependentGate.set_budget_`): it changes how many tokens are gathered
without retraining.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..modules import capturing
from ..registry import Registry
from .base import InputDependentGate, _check_keep

__all__ = [
    "TOKEN_GATES",
    "ClsAttentionTokenGate",
    "PredictorTokenGate",
    "ThresholdTokenGate",
    "TokenGate",
    "make_token_gate",
]

#: Registered token gates: name -> class (constructor ``(num_units, keep=..., dim=..., **kwargs)``).
TOKEN_GATES: Registry[type[TokenGate]] = Registry("token gate")


class TokenGate(InputDependentGate):
    """Base of token gates: ``scores(x, h, attn) -> (B, n)``, higher = keep.

    Args:
        num_units: Non-prefix tokens reaching the gate at the model's native input size (for reports; the
            gate works for any token count).
        keep: Fraction of the arriving non-prefix tokens kept, in (0, 1].
        dim: Token width (embedding dimension).
    """

    #: The gate learns its decisions (trained through the masked-attention path of the block).
    trainable: bool = False
    #: The gate's scores are weights that can fuse the dropped tokens into one (EViT).
    fusable: bool = False
    #: Inputs of a batch keep different numbers of tokens (a threshold, not a top-k): the block packs them.
    variable: bool = False

    def __init__(self, num_units: int, keep: float = 0.5, dim: int = 0) -> None:
        super().__init__(num_units, keep)
        self.dim = dim

    def kept(self, n: int) -> int:
        """Tokens kept of ``n`` arriving non-prefix tokens: ``ceil(keep · n)``, at least one."""
        return max(1, min(n, math.ceil(self.keep * n - 1e-9)))

    def num_kept(self) -> int:
        return self.kept(self.num_units)

    def scores(self, x: Tensor, h: Tensor, attn: nn.Module, num_prefix: int, policy: Tensor | None = None) -> Tensor:
        """``(B, n)`` scores of the non-prefix tokens.

        Args:
            x: Tokens after this block's attention branch, (B, N, C).
            h: The attention's input (``norm1`` of the block input), (B, N, C).
            attn: The block's timm ``Attention``.
            num_prefix: Prefix tokens at the front of the sequence.
            policy: (B, N) keep decisions so far (training of trainable gates), else None.
        """
        raise NotImplementedError

    def topk_policy(self, x: Tensor, h: Tensor, attn: nn.Module, num_prefix: int, policy: Tensor) -> Tensor:
        """Masked inference: the (B, N) policy keeping the ``kept(n)`` best of the ``n`` tokens still alive.

        The same decisions as gathering (every input has the same number of alive tokens).
        """
        alive = policy[:, num_prefix:] > 0
        n = int(alive[0].sum())
        s = self.scores(x, h, attn, num_prefix, policy).masked_fill(~alive, float("-inf"))
        idx = s.topk(self.kept(n), dim=1).indices
        keep = torch.zeros_like(s).scatter_(1, idx, 1.0)
        return torch.cat([policy[:, :num_prefix], keep.to(policy.dtype)], dim=1)

    def forward(self, x: Tensor, h: Tensor | None = None, attn: nn.Module | None = None, num_prefix: int = 1) -> Tensor:
        """``(B, n)`` 0/1 multiplier of the non-prefix tokens kept under the current budget."""
        s = self.scores(x, x if h is None else h, attn, num_prefix)
        idx = s.topk(self.kept(s.shape[1]), dim=1).indices
        return torch.zeros_like(s).scatter_(1, idx, 1.0)

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}, keep={self.keep}, dim={self.dim}"


@TOKEN_GATES.register("cls_attention")
class ClsAttentionTokenGate(TokenGate):
    """EViT's score: the class token's attention to each token in this block, averaged over the heads.

    It recomputes only the class token's row of the block's attention: ``q_cls · K`` (a ``(B, H, C)`` vector
    times the tokens when the keys are not normalised, ``O(N·C·H)``; with ``qk_norm`` the keys are projected,
    ``O(N·C²)``), the same probabilities the block's softmax produced. No parameters.
    """

    fusable = True

    def scores(self, x: Tensor, h: Tensor, attn: nn.Module, num_prefix: int, policy: Tensor | None = None) -> Tensor:
        return cls_attention(h, attn, num_prefix, policy)


def cls_attention(h: Tensor, attn: nn.Module, num_prefix: int, policy: Tensor | None = None) -> Tensor:
    """Mean over heads (the kept ones, see `mean_over_heads`) of softmax(q_cls·kᵀ·scale) restricted to the non-prefix
    tokens: (B, N - num_prefix).

    With a (B, N) ``policy``, dropped tokens take no part in the softmax (and score 0), as in masked attention.
    """
    if attn is None or not hasattr(attn, "qkv"):
        raise ConfigError("cls_attention token gate: needs the block's timm Attention (with a fused qkv Linear)")
    if num_prefix < 1:
        raise ConfigError("cls_attention token gate: the model has no class token to score the tokens with")
    B, N, C = h.shape
    H, d = attn.num_heads, attn.head_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, 0], w[: H * d], None if b is None else b[: H * d]).view(B, H, d)
    wk = w[H * d : 2 * H * d]
    if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity):
        # q·(W_k h + b_k) = (W_kᵀ q)·h + q·b_k; the second term is the same for every key: softmax ignores it
        u = torch.einsum("bhd,hdc->bhc", q * attn.scale, wk.view(H, d, C))
        logits = torch.einsum("bnc,bhc->bhn", h, u)
    else:
        k = F.linear(h, wk, None if b is None else b[H * d : 2 * H * d]).view(B, N, H, d).transpose(1, 2)
        q, k = attn.q_norm(q.unsqueeze(2)), attn.k_norm(k)
        logits = (q * attn.scale @ k.transpose(-2, -1)).squeeze(2)
    if policy is not None:
        logits = logits.masked_fill(policy[:, None, :] == 0, float("-inf"))
    return mean_over_heads(logits.softmax(-1)[..., num_prefix:], attn)


def mean_over_heads(a: Tensor, attn: nn.Module) -> Tensor:
    """``(B, H, n) -> (B, n)``: the mean over the heads of ``attn`` that a ``heads`` gate keeps (all without one).

    A closed head still computes attention probabilities, but conversion removes it: leaving it out of the
    token scores gives the gated model and its converted twin the same token decisions.
    """
    slot = getattr(attn, "norm", None)
    if getattr(slot, "dimension", None) != "heads" or getattr(slot, "gate", None) is None:
        return a.mean(1)
    w = slot.gate.keep_mask().to(device=a.device, dtype=a.dtype)
    return torch.einsum("bhn,h->bn", a, w) / w.sum().clamp_min(1)


@TOKEN_GATES.register("predictor")
class PredictorTokenGate(TokenGate):
    """DynamicViT's keep predictor (``PredictorLG``): local and policy-weighted global features -> keep/drop.

    ``z = GELU(Linear(LN(x)))``; the first half of ``z`` is per token, the second half is averaged over the
    kept tokens; an MLP ``C -> C/2 -> C/4 -> 2`` gives log-probabilities of (keep, drop). The score is the
    keep log-probability. Its `penalty` is this location's share of the ratio loss of the last training forward,
    DynamicViT's ``λ_ratio/S · mean_b (ρ_b − target)²``: ``ρ_b`` is the fraction of the original patch tokens input
    ``b`` keeps, ``target`` the cumulative keep target set by the block, ``S`` (``locations``) the number of predictor
    locations of the model, so the model's summed penalty is ``λ_ratio · (1/S) Σ_s mean_b (ρ_b^(s) − target^(s))²``
    (Rao et al. 2021, Eq. 11 and the reference ``losses.py``).

    Args:
        num_units: See `TokenGate`.
        keep: See `TokenGate`.
        dim: Token width C (required).
        weight: ``λ_ratio``, the weight of the model's whole ratio loss (DynamicViT: 2.0); each of the ``S``
            locations contributes ``weight / S`` times its term (`dynsparse.layers.gate_tokens_` sets ``locations``).
        tau: Gumbel-softmax temperature in training.
    """

    trainable = True

    def __init__(self, num_units: int, keep: float = 0.5, dim: int = 0, weight: float = 2.0, tau: float = 1.0) -> None:
        super().__init__(num_units, keep, dim)
        if not isinstance(dim, int) or dim < 4:
            raise ConfigError(f"predictor token gate: dim must be the token width (>= 4), got {dim!r}")
        for name, v, ok, rule in (
            ("weight", weight, _real(weight) and weight >= 0, ">= 0"),
            ("tau", tau, _real(tau) and tau > 0, "> 0"),
        ):
            if not ok or not math.isfinite(v):
                raise ConfigError(f"predictor token gate: {name} must be a finite number {rule}, got {v!r}")
        self.weight, self.tau = float(weight), float(tau)
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )
        #: Cumulative keep target of this location (set by the block from the keeps before it).
        self.target = keep
        #: Predictor locations of the model (S of the ratio loss; set by `dynsparse.layers.gate_tokens_`).
        self.locations = 1
        self._ratio: Tensor | None = None

    def log_probs(self, t: Tensor, policy: Tensor | None) -> Tensor:
        """(B, n, 2) log-probabilities of (keep, drop) for tokens ``t`` (B, n, C) given their policy (B, n)."""
        z = self.in_conv(t)
        half = z.shape[-1] // 2
        local, glob = z[..., :half], z[..., half:]
        if policy is None:
            g = glob.mean(1, keepdim=True)
        else:
            p = policy.unsqueeze(-1).to(z.dtype)
            g = (glob * p).sum(1, keepdim=True) / p.sum(1, keepdim=True).clamp_min(1e-6)
        return self.out_conv(torch.cat([local, g.expand_as(glob)], dim=-1))

    def scores(self, x: Tensor, h: Tensor, attn: nn.Module, num_prefix: int, policy: Tensor | None = None) -> Tensor:
        return self.log_probs(x[:, num_prefix:], None if policy is None else policy[:, num_prefix:])[..., 0]

    def sample(self, x: Tensor, num_prefix: int, policy: Tensor) -> Tensor:
        """Training: hard Gumbel-softmax keep decisions (straight-through) times the previous ``policy`` (B, N)."""
        lp = self.log_probs(x[:, num_prefix:], policy[:, num_prefix:])
        keep = F.gumbel_softmax(lp, tau=self.tau, hard=True)[..., 0] * policy[:, num_prefix:]
        self._ratio = keep.mean(1)  # (B,) kept fraction of the original patch tokens at this location
        return torch.cat([policy[:, :num_prefix], keep], dim=1)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ratio"] = None  # the last forward's kept fraction carries an autograd graph: not copied
        return state

    def penalty(self) -> Tensor:
        if self._ratio is None or not self.training or not self._ratio.numel():  # numel 0: an empty batch
            return self.out_conv[-2].bias.new_zeros(())
        # per input, then the batch mean (not the square of the batch mean: that lets some inputs keep every token
        # and others none); averaged over the locations like the reference code's ``pred_loss / len(pruning_loc)``
        return self.weight / getattr(self, "locations", 1) * ((self._ratio - self.target) ** 2).mean()


#: Points of the calibration table: the thresholds that keep 0, 1/100, ..., 1 of the arriving tokens.
TABLE_POINTS = 101


@TOKEN_GATES.register("threshold")
class ThresholdTokenGate(TokenGate):
    """LTP's learned threshold (Kim et al. 2022): keep the tokens that receive more attention than ``θ``.

    **Score.** Token ``i`` scores ``s_i = (1/H) Σ_h Σ_q A_h[q, i]``: the attention probability it receives in
    this block, summed over the ``n`` queries alive and averaged over the heads. That is LTP's mean over heads
    and queries times ``n``: the mean score over all ``n`` keys is exactly 1 (a token's "fair share") whatever
    the resolution, so ``θ`` is in units of the fair share (LTP's absolute threshold equals ``θ / n``).

    **Training** (LTP's soft stage): ``m_i = σ((s_i − θ) / T)`` with the learned ``θ``; the block multiplies
    ``m`` into the keep policy that every later block's attention uses, so nothing is gathered, shapes hold and
    the gradient reaches ``θ`` through the later attention weights and the penalty. ``penalty()`` of the last
    training forward: ``weight · f`` (LTP's L1 on the masks, as a mean) or, with ``target``,
    ``weight · (f − target)²``, where ``f`` is the soft fraction of the arriving tokens kept.

    **Inference**: keep ``s_i > θ`` (and always the best token of each input), so inputs of a batch keep
    different numbers of tokens; prefix tokens are always kept and not ranked.

    **Knob**: ``keep=None`` (default) uses the learned ``θ``; ``keep=k`` uses the threshold that keeps a fraction
    ``k`` of the arriving tokens on the calibration data: a table of score quantiles (``table``, a buffer), kept
    as a running average in training (``momentum``) or recorded exactly by
    `dynsparse.layers.calibrate_tokens_`. ``keep=1`` keeps every token.

    Args:
        num_units: See `TokenGate`.
        keep: None (learned threshold) or a fraction in (0, 1] (calibrated threshold).
        dim: Token width (unused; for the common constructor).
        threshold: Initial ``θ``; `dynsparse.layers.gate_tokens_` sets it to LTP's ``final_threshold · l / L``
            for block ``l`` (0-based) of ``L``.
        temperature: ``T`` of the soft mask, in units of the fair share (LTP's ``1e-3`` on absolute scores of
            about 100 tokens is 0.1).
        weight: Weight of the penalty (LTP's ``lambda_threshold``).
        target: None for the L1 penalty, or the kept fraction of the arriving tokens to pull toward.
        momentum: Weight of a new training batch in the running score table.
    """

    trainable = True
    variable = True

    def __init__(
        self,
        num_units: int,
        keep: float | None = None,
        dim: int = 0,
        threshold: float = 0.0,
        temperature: float = 0.1,
        weight: float = 0.01,
        target: float | None = None,
        momentum: float = 0.1,
    ) -> None:
        super().__init__(num_units, 1.0, dim)
        self.set_budget_(keep)
        for name, v, ok in (
            ("threshold", threshold, True),
            ("temperature", temperature, temperature > 0 if _real(temperature) else False),
            ("weight", weight, weight >= 0 if _real(weight) else False),
            ("momentum", momentum, 0 < momentum <= 1 if _real(momentum) else False),
        ):
            if not _real(v) or not math.isfinite(v) or not ok:
                raise ConfigError(f"threshold token gate: {name} must be a finite number (see the doc), got {v!r}")
        if target is not None and (not _real(target) or not 0 < target <= 1):
            raise ConfigError(f"threshold token gate: target must be None or a fraction in (0, 1], got {target!r}")
        self.temperature, self.weight, self.momentum = float(temperature), float(weight), float(momentum)
        self.target = None if target is None else float(target)
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))
        self.register_buffer("table", torch.zeros(TABLE_POINTS))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.long))
        self._has_table = False  # `calibrated` > 0, for export / jit.trace, where buffer values cannot be read
        self._fraction: Tensor | None = None
        #: Scores gathered by `dynsparse.layers.calibrate_tokens_` (a list while it runs, else None).
        self.collect: list[Tensor] | None = None

    def set_budget_(self, keep: float | None) -> ThresholdTokenGate:
        """``None``: the learned threshold; a fraction in (0, 1]: the calibrated one. Returns self."""
        self.keep = None if keep is None else _check_keep(type(self).__name__, keep)
        return self

    def kept(self, n: int) -> int:
        """Expected tokens kept of ``n`` (``n`` with the learned threshold: the count depends on the input)."""
        return n if self.keep is None else super().kept(n)

    def theta(self) -> Tensor:
        """The inference threshold under the current budget (a 0-dim tensor; ``-inf`` for ``keep=1``)."""
        if self.keep is None:
            return self.threshold.detach()
        if self.keep >= 1.0:
            return self.threshold.detach().new_tensor(float("-inf"))
        if not (getattr(self, "_has_table", False) if capturing() else int(self.calibrated) > 0):
            raise ConfigError(
                f"threshold token gate: keep={self.keep} needs a score table; run "
                "dynsparse.layers.calibrate_tokens_(model, inputs) (or train the model) first, or use keep=None"
            )
        pos = self.keep * (TABLE_POINTS - 1)
        lo = min(int(pos), TABLE_POINTS - 2)
        return torch.lerp(self.table[lo], self.table[lo + 1], pos - lo)

    def soft_mask(self, s: Tensor) -> Tensor:
        """Training: ``σ((s − θ) / T)`` with the learned ``θ`` (any shape)."""
        return torch.sigmoid((s - self.threshold) / self.temperature)

    @torch.no_grad()
    def observe(self, s: Tensor, exact: bool = False) -> None:
        """Add scores (any shape, of arriving non-prefix tokens) to the table: a running average, or ``exact``."""
        if s.numel() == 0:  # no token arrived (a training batch whose soft policy keeps none above 0.5)
            return
        probs = torch.linspace(1.0, 0.0, TABLE_POINTS, dtype=torch.float64, device=s.device)
        q = torch.quantile(s.detach().flatten()[: 1 << 24].double(), probs).to(self.table.dtype)
        if exact or int(self.calibrated) == 0:
            self.table.copy_(q)
        else:
            self.table.lerp_(q, self.momentum)
        self.calibrated += 1
        self._has_table = True

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._has_table = int(self.calibrated) > 0

    def record(self, fraction: Tensor | None) -> None:
        """Training: the soft fraction of the arriving tokens kept (for `penalty`; None: no penalty)."""
        self._fraction = fraction

    def penalty(self) -> Tensor:
        if self._fraction is None or not self.training:
            return self.threshold.new_zeros(())
        f = self._fraction
        return self.weight * (f if self.target is None else (f - self.target) ** 2)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fraction"], state["collect"] = None, None  # an autograd graph / calibration scores: not copied
        return state

    def scores(self, x: Tensor, h: Tensor, attn: nn.Module, num_prefix: int, policy: Tensor | None = None) -> Tensor:
        return received_attention(h, attn, policy)[:, num_prefix:]

    def forward(self, x: Tensor, h: Tensor | None = None, attn: nn.Module | None = None, num_prefix: int = 1) -> Tensor:
        """``(B, n)`` 0/1 multiplier: ``s > θ`` under the current budget, at least the best token per input."""
        s = self.scores(x, x if h is None else h, attn, num_prefix)
        return threshold_keep(s, self.theta()).to(s.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_units={self.num_units}, keep={self.keep}, threshold={float(self.threshold.detach()):.4g}, "
            f"temperature={self.temperature}, weight={self.weight}, target={self.target}"
        )


def _real(v: object) -> bool:
    """Any real number (numpy scalars too), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def threshold_keep(s: Tensor, theta: Tensor) -> Tensor:
    """``(B, n)`` bool: the tokens scoring above ``theta``, and always each input's best one.

    The one decision rule of the ``threshold`` gate, shared by its gathered, packed and masked paths.
    """
    keep = s > theta
    best = s.argmax(1, keepdim=True)
    # a bool tensor as the source, not the scalar True: torch.jit.trace cannot record scatter_ with a bool scalar
    return keep.scatter_(1, best, torch.ones_like(best, dtype=torch.bool))


def received_attention(h: Tensor, attn: nn.Module, policy: Tensor | None = None) -> Tensor:
    """``(B, N)``: attention each token receives in ``attn`` on input ``h`` (B, N, C), summed over the queries, mean
    over the kept heads (`mean_over_heads`; LTP's score times N: the scores of the ``n`` alive tokens average to 1).

    With a (B, N) keep ``policy``, dropped keys take no part in the softmax and queries are weighted by it.
    Recomputes q and k (``O(N·C² + N²·C)``); the token-gated block gets the same scores from its own attention.
    """
    if attn is None or not hasattr(attn, "qkv"):
        raise ConfigError("threshold token gate: needs the block's timm Attention (with a fused qkv Linear)")
    B, N, _ = h.shape
    H, d = attn.num_heads, attn.head_dim
    q, k = attn.qkv(h)[..., : 2 * H * d].reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)
    if policy is not None:
        logits = logits.masked_fill(policy[:, None, None, :] == 0, float("-inf"))
    a = logits.softmax(-1)
    if policy is not None:
        a = a * policy[:, None, :, None].to(a.dtype)
    return mean_over_heads(a.sum(-2), attn)


def make_token_gate(spec: str | dict[str, Any], num_units: int, dim: int) -> TokenGate:
    """A token gate from a name or ``{"gate": name, "keep": ..., **kwargs}``."""
    opts = {"gate": spec} if isinstance(spec, str) else dict(spec)
    name = opts.pop("gate", "cls_attention")
    cls = TOKEN_GATES.get(name)
    try:
        return cls(num_units, dim=dim, **opts)
    except TypeError as e:
        raise ConfigError(f"token gate {name!r}: {e}") from None
