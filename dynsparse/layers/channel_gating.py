"""Per-input channel gating of timm ResNet blocks (FBS): each input runs only the channels its gate keeps.

`FBSBasicBlock` and `FBSBottleneck` are timm's ``BasicBlock`` / ``Bottleneck`` with the same children plus
one `dynsparse.gates.FBSGate` per gated set of internal channels, in a child ``gate`` (an ``nn.ModuleDict``
keyed by the producing conv: ``gate.conv1`` gates ``conv1``'s outputs, ``gate.conv2`` a Bottleneck's ``conv2``
outputs), so the state dict keeps every timm key and adds only ``*.gate.*`` keys. The residual width is never
gated, so blocks stay independent.

* **Gated channels.** BasicBlock: ``conv1``'s outputs (= ``conv2``'s inputs). Bottleneck: ``conv2``'s outputs
  (= ``conv3``'s inputs) and, by default (``bottleneck_conv1=True``), ``conv1``'s outputs too, so the 3×3
  ``conv2`` shrinks in both its input and output channels (FBS's quadratic saving).
* **Decisions up front.** Every gate of a block reads the block's input (its global average pool), so all
  of a block's decisions are known before its first conv. FBS predicts each layer from that layer's own input;
  for a Bottleneck's ``gate.conv2`` we read the block input instead (one pooling, and a batch can be planned
  whole: grouped by decision or by the union of kept channels).
* **Inference** (eval mode) gathers, per input, the kept filters of the producing conv with their BatchNorm
  statistics and affine, and the matching input slices of the consuming conv; the kept channels are scaled
  by their saliencies after the activation (FBS's ``ReLU(π · BN(conv x)) = π · ReLU(BN(conv x))`` for
  ``π ≥ 0``). A batch is run by `strategy` (see `FBSBlockMixin.strategy`); the runners are in
  `dynsparse.layers.channel_kernels`.
* **Training** computes every channel and multiplies by the gate's output (``π`` on kept channels, 0
  elsewhere), so the gradient reaches the saliency weights.

`gate_channels_` installs the gates (``ds.sparsify_(model, {"channels": {"gate": "fbs", "keep": 0.5}})``
routes here), `channel_spec` gives the arguments that rebuild them (saved by ``ds.convert(static=False)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from timm.layers import DropPath
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn

from ..errors import ConfigError, GateError, UnsupportedModuleError
from ..gates.base import InputDependentGate
from ..gates.channel_gates import CHANNEL_GATES
from ..modules import adopt, capturing, first_param, is_stateless, place_like
from ..sparsify import _patterns, _selected
from .channel_kernels import FoldCache, _masked, _run_batch

__all__ = ["CHANNEL_GATES", "FBSBasicBlock", "FBSBottleneck", "channel_spec", "gate_channels_"]

STRATEGIES = ("auto", "group", "loop", "union", "grouped_conv", "masked")


class FBSBlockMixin:
    """Shared forward of the FBS blocks. ``_stages``: ``(conv, norm, element-wise children)``; ``gate[conv]``.

    Attributes:
        strategy: How an eval batch runs: ``"auto"`` (default: one gathered run when every input made the same
            decisions, else the rule of `_auto`: the union of kept channels on small maps or when it is small,
            else one gathered run per group of equal decisions or per input),
            ``"group"`` (one gathered run per distinct decision), ``"loop"`` (one per input), ``"union"``
            (the union of every input's kept channels, zeros for the others), ``"grouped_conv"`` (per-input
            gathered weights stacked into one grouped conv), ``"masked"`` (dense convs, masked: no saving;
            for checking). Every strategy gives the same outputs up to float rounding.
    """

    _stages: tuple[tuple[str, str, tuple[str, ...]], ...]
    _last: tuple[str, str]
    _out_act: str
    strategy: str = "auto"

    def gates(self) -> list[tuple[str, InputDependentGate | None]]:
        """``(conv, gate or None)`` per stage."""
        return [(c, self.gate[c] if c in self.gate else None) for c, *_ in self._stages]  # noqa: SIM401

    def forward(self, x: Tensor) -> Tensor:
        ss = x.mean((2, 3))
        stages = [(getattr(self, c), getattr(self, n), [getattr(self, p) for p in post]) for c, n, post in self._stages]
        gates = [g for _, g in self.gates()]
        last = (getattr(self, self._last[0]), getattr(self, self._last[1]))
        if self.training or self.strategy == "masked" or capturing():  # export / jit.trace: no data-dependent widths
            mults = [None if g is None else g(ss) for g in gates]
            y = _masked(x, stages, mults, last)
        else:
            if self.strategy not in STRATEGIES:
                raise ConfigError(
                    f"{type(self).__name__}.strategy: one of {', '.join(STRATEGIES)} expected, got {self.strategy!r}"
                )
            decisions = [(None, None) if g is None else g.decide(ss) for g in gates]
            shortcut = None
            if self.se is None and (self.drop_path is None or type(self.drop_path) in (nn.Identity, DropPath)):
                # nothing between the last norm and the residual add in eval: the runner adds the shortcut
                shortcut = self.downsample(x) if self.downsample is not None else x
            y = _run_batch(x, stages, decisions, last, self.strategy, shortcut, self._fold_cache())
            if shortcut is not None:
                return getattr(self, self._out_act)(y)
        return self._tail(x, y)

    def _fold_cache(self) -> FoldCache | None:
        """This block's folded BatchNorm (see `channel_kernels.FoldCache`), checked against the norms; None under
        autograd."""
        if torch.is_grad_enabled():
            return None
        if "_bn_folds" not in self.__dict__:
            self.__dict__["_bn_folds"] = FoldCache()
        return self.__dict__["_bn_folds"].refresh()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_bn_folds", None)  # derived tensors: rebuilt on the next eval forward
        return state

    def _tail(self, x: Tensor, y: Tensor) -> Tensor:
        """The block's end after the last norm (which the runners apply, folded into the last conv where cheaper)."""
        if self.se is not None:
            y = self.se(y)
        if self.drop_path is not None:
            y = self.drop_path(y)
        shortcut = self.downsample(x) if self.downsample is not None else x
        return getattr(self, self._out_act)(y + shortcut)


def _why_not(host: nn.Module, stages, last: tuple[str, str]) -> str | None:
    """Why ``host`` cannot be run by the gathered forward, or None."""
    aa = getattr(host, "aa", None)
    if aa is not None and not isinstance(aa, nn.Identity):
        return f"anti-aliasing ({type(aa).__name__}) on the gated channels is not supported"
    convs = [c for c, *_ in stages] + [last[0]]
    norms = [n for _, n, *_ in stages] + [last[1]]
    for c in convs:
        m = getattr(host, c)
        plain = m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str) and m.bias is None
        if type(m) is not nn.Conv2d or not plain:
            return f"{c} must be a plain nn.Conv2d (groups=1, zero padding, no bias), got {m!r}"
    for n in norms:
        m = getattr(host, n)
        if type(m) is not nn.BatchNorm2d or not m.track_running_stats:
            return f"{n} must be an nn.BatchNorm2d with running statistics, got {type(m).__name__}"
    for _, _, post in stages:
        for p in post:
            if not is_stateless(getattr(host, p)):
                return (
                    f"{p} ({type(getattr(host, p)).__name__}) holds parameters; only element-wise modules may sit there"
                )
    return None


class FBSBasicBlock(FBSBlockMixin, BasicBlock):
    """timm ``BasicBlock`` whose ``conv1`` outputs are gated per input by ``gate.conv1`` (see the module doc)."""

    #: The class the integration tables know it as (`dynsparse.integrations.tables.host_type`), so its residual branch
    #: gets and closes ``layers`` gates as a BasicBlock's.
    host_class: ClassVar[type[nn.Module]] = BasicBlock
    _stages = (("conv1", "bn1", ("drop_block", "act1", "aa")),)
    _last = ("conv2", "bn2")
    _out_act = "act2"

    @classmethod
    def from_module(cls, block: BasicBlock, gates: dict[str, InputDependentGate]) -> FBSBasicBlock:
        """An `FBSBasicBlock` sharing ``block``'s children and parameters, with ``gates`` (``{"conv1": gate}``)."""
        return _adopt(block, cls, gates)


class FBSBottleneck(FBSBlockMixin, Bottleneck):
    """timm ``Bottleneck`` with ``conv2``'s outputs gated (``gate.conv2``), optionally ``conv1``'s (``gate.conv1``)."""

    host_class: ClassVar[type[nn.Module]] = Bottleneck  # as FBSBasicBlock's
    _stages = (("conv1", "bn1", ("act1",)), ("conv2", "bn2", ("drop_block", "act2", "aa")))
    _last = ("conv3", "bn3")
    _out_act = "act3"

    @classmethod
    def from_module(cls, block: Bottleneck, gates: dict[str, InputDependentGate]) -> FBSBottleneck:
        """An `FBSBottleneck` sharing ``block``'s children, with ``gates`` (``{"conv2": g}`` or also ``"conv1"``)."""
        return _adopt(block, cls, gates)


def _adopt(block: nn.Module, cls: type, gates: dict[str, InputDependentGate]) -> nn.Module:
    known = [c for c, *_ in cls._stages]
    if not gates or any(c not in known for c in gates):
        raise ConfigError(f"{cls.__name__}: gates must be keyed by some of {known}, got {sorted(gates)}")
    new = adopt(block, cls)
    new.gate = nn.ModuleDict({c: gates[c] for c in known if c in gates})
    return new


_TWINS = {BasicBlock: FBSBasicBlock, Bottleneck: FBSBottleneck}


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f, m) for f, m in model.named_modules() if type(m) in _TWINS or isinstance(m, FBSBlockMixin)]


def gate_channels_(
    model: nn.Module,
    gate: str = "fbs",
    keep: float = 0.5,
    blocks: str | Sequence[int | str] = "all",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    bottleneck_conv1: bool = True,
    strategy: str = "auto",
    **gate_kwargs: Any,
) -> nn.Module:
    """Gate the internal channels of a timm ResNet's blocks per input (in place); returns ``model``.

    Args:
        model: A timm ResNet-family model (``BasicBlock`` / ``Bottleneck`` blocks).
        gate: A name of `CHANNEL_GATES` (``"fbs"``).
        keep: Fraction of the gated channels each input keeps, in (0, 1] (the run-time knob).
        blocks: ``"all"``, or block indices (in ``named_modules`` order of the ResNet blocks) or block fqns.
        include: fqn globs; only matching blocks are gated.
        exclude: fqn globs; matching blocks are not gated.
        bottleneck_conv1: Also gate a Bottleneck's ``conv1`` outputs (``gate.conv1``), not only ``conv2``'s.
        strategy: How eval batches run (see `FBSBlockMixin.strategy`).
        **gate_kwargs: Gate options (``weight``, ``init_std`` of `dynsparse.gates.FBSGate`).

    Raises:
        ConfigError: an unknown gate (with suggestions), a bad ``keep``, ``blocks`` or option.
        UnsupportedModuleError: the model has no ResNet block, or a chosen block cannot be gated (names it; the
            model itself being a block cannot be swapped in place).

    Examples:
        >>> import timm, dynsparse as ds
        >>> m = ds.sparsify_(timm.create_model("resnet10t"), {"channels": {"gate": "fbs", "keep": 0.5}})
        >>> type(m.layer1[0]).__name__, m.layer1[0].gate["conv1"].num_kept()
        ('FBSBasicBlock', 32)
    """
    cls = CHANNEL_GATES.get(gate)
    if strategy not in STRATEGIES:
        raise ConfigError(f"channels.strategy: one of {', '.join(STRATEGIES)} expected, got {strategy!r}")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise ConfigError(f"channels.keep: a fraction in (0, 1] expected, got {keep!r}")
    if not isinstance(bottleneck_conv1, bool):
        raise ConfigError(f"channels.bottleneck_conv1: true or false expected, got {bottleneck_conv1!r}")
    found = _blocks(model)
    if not found:
        from .base import GatedLayer

        static = next(
            (f for f, m in model.named_modules() if isinstance(m, GatedLayer) and m.dimension == "channels"), None
        )
        reason = (
            f"its blocks have static channel gates already ({static}); convert them first (ds.convert), then add "
            "per-input ones"
            if static is not None
            else "per-input channel gates need timm ResNet BasicBlock/Bottleneck blocks"
        )
        raise UnsupportedModuleError("", type(model).__name__, "channels", reason)
    chosen = _choose(found, blocks, include, exclude)
    for fqn, block in chosen:
        if not fqn:
            reason = "the root module itself cannot be swapped"
            raise UnsupportedModuleError(fqn, type(block).__name__, "channels", reason)
        if isinstance(block, FBSBlockMixin):
            raise UnsupportedModuleError(
                fqn, type(block).__name__, "channels", "it already has per-input channel gates"
            )
        twin = _TWINS[type(block)]
        reason = _why_not(block, twin._stages, twin._last)
        if reason is not None:
            raise UnsupportedModuleError(fqn, type(block).__name__, "channels", reason)
    built = []  # every gate is built before any block changes, so a bad gate option changes nothing
    for fqn, block in chosen:
        if type(block) is BasicBlock:
            built.append(
                (
                    fqn,
                    FBSBasicBlock.from_module(
                        block, {"conv1": _make(cls, gate, fqn, block, "conv1", keep, gate_kwargs)}
                    ),
                )
            )
        else:
            gs = {
                c: _make(cls, gate, fqn, block, c, keep, gate_kwargs)
                for c in ("conv1", "conv2")[not bottleneck_conv1 :]
            }
            built.append((fqn, FBSBottleneck.from_module(block, gs)))
    for fqn, new in built:
        if strategy != "auto":
            new.strategy = strategy
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def _make(cls, name: str, fqn: str, block: nn.Module, conv: str, keep: float, kwargs: dict) -> InputDependentGate:
    p = first_param(block)
    dd = {"device": p.device if p is not None else None, "dtype": p.dtype if p is not None else None}
    try:
        gate = cls(block.conv1.in_channels, getattr(block, conv).out_channels, keep=keep, **kwargs, **dd)
    except (TypeError, ConfigError, GateError) as e:
        raise ConfigError(f"channels: bad option for gate {name!r} at {fqn!r}: {e}") from None
    return place_like(gate, block)


def _choose(found, blocks, include, exclude) -> list[tuple[str, nn.Module]]:
    inc, exc = _patterns(include, "channels.include"), _patterns(exclude, "channels.exclude")
    if blocks == "all":
        chosen = list(found)
    else:
        items = list(blocks) if isinstance(blocks, Sequence) and not isinstance(blocks, str) else [blocks]
        names = [f for f, _ in found]
        chosen = []
        for b in items:
            if isinstance(b, int) and not isinstance(b, bool) and 0 <= b < len(found):
                chosen.append(found[b])
            elif isinstance(b, str) and b in names:
                chosen.append(found[names.index(b)])
            else:
                raise ConfigError(
                    f"channels.blocks: 'all', block indices in [0, {len(found)}) or block fqns "
                    f"({', '.join(names[:4])}, ...) expected, got {b!r}"
                )
        twice = sorted({f for f, _ in chosen if [g for g, _ in chosen].count(f) > 1})
        if twice:  # an index and its fqn, or one index twice: the block would get its gates twice
            raise ConfigError(f"channels.blocks: each block once, got {blocks!r} (twice: {', '.join(twice)})")
    chosen = [(f, m) for f, m in chosen if _selected(f, inc, exc)]
    if not chosen:
        raise ConfigError("channels: the blocks / include / exclude options leave no block to gate")
    return chosen


def channel_spec(model: nn.Module) -> dict | None:
    """The `gate_channels_` arguments that rebuild ``model``'s per-input channel gates, or None when it has none.

    Raises:
        ConfigError: gates with different settings (one kind and one setting per model can be saved).
    """
    found = [(f, m) for f, m in model.named_modules() if isinstance(m, FBSBlockMixin)]
    if not found:
        return None
    gates = [g for _, m in found for _, g in m.gates() if g is not None]
    settings = {(type(g), g.keep, g.weight, g.init_std) for g in gates}
    conv1 = {"conv1" in m.gate for _, m in found if isinstance(m, FBSBottleneck)}
    strategies = {m.strategy for _, m in found}
    if len(settings) > 1 or len(conv1) > 1 or len(strategies) > 1:
        raise ConfigError("channels: per-input channel gates with different settings cannot be saved in one plan yet")
    g = gates[0]
    name = next(n for n in CHANNEL_GATES.names() if CHANNEL_GATES.get(n) is type(g))
    return {
        "gate": name,
        "keep": g.keep,
        "blocks": [f for f, _ in found],
        "bottleneck_conv1": conv1.pop() if conv1 else True,
        "strategy": strategies.pop(),
        "weight": g.weight,
        "init_std": g.init_std,
    }
